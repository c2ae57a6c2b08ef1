"""Self-distillation trajectories (CLLM's recipe; no reward model): a model's own answers, ranked by how
far they are from its greedy answer.

    python -m diffpo_jax.data distill --prompts prompts.jsonl --out DIR [--model M]
        [--temperatures 1.0,0.7] [--samples 1] [--jacobi-states K] [--jacobi-block 16]
        [--max-new-tokens 256] [--batch-size 8] [--seed 0]

Per prompt, y(T) is the model's greedy answer and y(0..T-1) are its samples, hottest first, and with
`--jacobi-states K` also up to K intermediate Jacobi states on the way from each sample to the greedy
answer (CLLM's training data: the contexts Jacobi decoding actually sees, a correct prefix followed by
guesses). Each answer set is decoded as `python -m diffpo_jax.generate` (or `refine --trajectory`) decodes
it, through the same `Decoder` and record loop (records/loop.py: jsonl format, batched with row refill,
streamed through OUT.partial, resumable; a sample's key is generate's), written under DIR.work/:
  greedy.jsonl                 temperature 0: y(T), the file `generate --temperature 0` writes
  options.json                 the options below; a rerun with other options stops (delete the folder)
  t{TEMP}-s{K}.jsonl           sample K at temperature TEMP, seeded with `seed` + the run's position in
                               this list (greedy: `seed`)
  t{TEMP}-s{K}.jacobi.jsonl    --jacobi-states: that sample refined with `--trajectory` (block
                               `--jacobi-block`); of a refinement in P passes, the states after passes
                               round(linspace(0, P - 2, K)) (distinct; the last pass gives the answer)
  scored.jsonl                 one row per prompt: prompt, all_generated_responses, all_rm_scores, where a
                               response's score is minus its temperature (greedy 0); the state
                               after pass p of P of a sample at temperature t scores -t (1 - (p+1)/P)
and `scored.jsonl` is built into DIR by `trajectories.build`, so ranking, merging and the manifest are
the reward-ranked path's: responses ascending by (score, text) puts the hottest samples first and the
greedy answer last; a sample equal to the greedy answer merges into it, and a prompt whose samples all
equal its greedy answer is dropped as `fewer_than_2_distinct_responses` (counted in the manifest). The
manifest's `self_distill` entry records the model, temperatures, seeds and lengths. A rerun with the
same options resumes every unfinished answer set; the work directory is kept (it is the data's
provenance) and can be deleted once DIR exists. Devices and layout: the decoding CLIs' defaults
(decoding/devices.py: all local devices on the data axis on GPU/TPU, one device on CPU).

Use it to teach a model to refine its OWN drafts quickly (Jacobi decoding then reaches the greedy answer
in fewer passes); use reward-ranked responses (`data build`) to teach alignment (y(T) = the best-scored
response, which the model's greedy answer is not).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from diffpo_jax.data.trajectories import TrajectoryDataError, build
from diffpo_jax.decoding import devices
from diffpo_jax.decoding.batching import Decoder, Output
from diffpo_jax.records.formats import FormatError, Record, generated_output, read_records, refined_output
from diffpo_jax.records.loop import decode_records, sample_keys
from diffpo_jax.records.output import open_output
from diffpo_jax.sources import ModelSourceError

WINDOW = 256  # records the record loop takes at a time (generate's and refine's default --sort-window)


def runs(temperatures: list[float], samples: int, seed: int) -> list[tuple[str, float, int]]:
    """(file name, temperature, seed) of every answer set: greedy first, then each sample."""
    out = [("greedy.jsonl", 0.0, seed)]
    for t in temperatures:
        for k in range(samples):
            out.append((f"t{t:g}-s{k}.jsonl", t, seed + len(out)))
    return out


def distill(
    prompts: Path,
    out_dir: Path,
    *,
    model: str | None = None,
    temperatures: list[float] = (1.0, 0.7),
    samples: int = 1,
    jacobi_states: int = 0,
    jacobi_block: int = 16,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
    loaded=None,
    log=print,
) -> dict[str, Any]:
    """Build the self-distilled dataset of `prompts` into `out_dir` (module doc); returns the manifest.
    `loaded`: an already loaded model to use instead of `model`."""
    from diffpo_jax.sources import load_model

    temperatures = list(temperatures)
    if not temperatures or any(t <= 0 for t in temperatures) or samples < 1:
        raise TrajectoryDataError("self-distillation needs temperatures > 0 and samples >= 1")
    if jacobi_states < 0 or jacobi_block < 1:
        raise TrajectoryDataError("--jacobi-states must be >= 0 and --jacobi-block >= 1")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise TrajectoryDataError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    records = read_records(prompts, "jsonl", with_drafts=False)  # fail on bad prompts before loading
    work = out_dir.with_name(out_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    plan = runs(temperatures, samples, seed)
    options = {
        "prompts": str(prompts),
        "model": model,
        "runs": plan,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "dtype": dtype,
        "jacobi_states": jacobi_states,
        "jacobi_block": jacobi_block,
    }
    options = json.loads(json.dumps(options))
    recorded = work / "options.json"
    if recorded.exists() and json.loads(recorded.read_text()) != options:
        raise TrajectoryDataError(f"{recorded}: written by a run with other options; delete {work} to start over")
    recorded.write_text(json.dumps(options, indent=1) + "\n")
    mesh = devices.decode_mesh(None, model, dtype)
    devices.check_rows(mesh, batch_size)
    loaded = loaded or load_model(model, dtype=dtype, mesh=mesh)
    decoder = Decoder(loaded, batch_size=batch_size, max_new_tokens=max_new_tokens, mesh=mesh)
    for name, temperature, run_seed in plan:
        if (work / name).exists():
            log(f"{work / name}: done")
            continue
        summary = _sample_file(decoder, records, work / name, temperature, run_seed, model, dtype)
        log(f"{work / name}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    answers: list[list[tuple[str, float]]] = [[] for _ in records]  # per prompt: (text, score)
    for name, t, _ in plan:
        for i, rec in enumerate(read_records(work / name, "jsonl", with_drafts=True)):
            answers[i].append((rec.drafts[0], -t))
        if jacobi_states and t > 0:
            states = _jacobi_states(work, name, decoder, model, jacobi_states, jacobi_block, dtype, log)
            for i, row in enumerate(states):
                answers[i] += [(text, -t * (1 - frac)) for text, frac in row]
    scored = work / "scored.jsonl"
    tmp = scored.with_name(scored.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for rec, pairs in zip(records, answers):
            row = {
                "prompt": rec.prompt,
                "all_generated_responses": [text for text, _ in pairs],
                "all_rm_scores": [score for _, score in pairs],
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(scored)
    provenance = {
        "prompts": str(prompts),
        "model": loaded.source,
        "dtype": dtype,
        "max_new_tokens": max_new_tokens,
        "runs": [{"file": name, "temperature": t, "seed": s} for name, t, s in plan],
        "jacobi_states": jacobi_states,
        "jacobi_block": jacobi_block,
        "score": "minus the sampling temperature (greedy 0): hottest sample = y(0), greedy answer = y(T); "
        "Jacobi state after pass p of P of a sample at temperature t: -t (1 - (p+1)/P)",
    }
    return build([str(scored)], out_dir, overwrite=overwrite, extra={"self_distill": provenance})


def _sample_file(
    decoder: Decoder, records: list[Record], path: Path, temperature: float, seed: int, model: str | None, dtype: str
) -> dict[str, Any]:
    """`records` answered into the jsonl file `path` (each gets its `draft`) as `generate --temperature
    temperature --seed seed` answers them: the same keys (records/loop.py `sample_keys`), the whole window through
    the decoder's slots with row refill."""

    def decode(indices: list[int], turn: int, _recs, prompt_ids: list[list[int]]) -> list[Output]:
        return decoder.sample(prompt_ids, sample_keys(seed, indices, turn), temperature=temperature, top_p=1.0)

    def answered(rec: Record, outputs: list[Output]) -> dict[str, Any]:
        return generated_output("jsonl", rec, [o.text for o in outputs], "")  # (jsonl records no model id)

    options = {
        "model": model,
        "temperature": temperature,
        "seed": seed,
        "max_new_tokens": decoder.max_new_tokens,
        "dtype": dtype,
    }
    return _decode_file(decoder, records, path, options, decode, answered, max(WINDOW, decoder.batch_size))


def _refine_file(
    decoder: Decoder, records: list[Record], path: Path, block: int, model: str | None, dtype: str
) -> dict[str, Any]:
    """`records` (with drafts) refined into the jsonl file `path` as `refine --trajectory --block-size block`
    refines them (one batch at a time; stats.trajectory: the response after each pass)."""

    def decode(_indices, turn: int, recs: list[Record], prompt_ids: list[list[int]]) -> list[Output]:
        drafts = [decoder.draft_tokens(r.drafts[turn]) for r in recs]
        return decoder.refine(prompt_ids, drafts, block_size=block, trajectory=True)

    def refined(rec: Record, outputs: list[Output]) -> dict[str, Any]:
        return refined_output("jsonl", rec, [o.text for o in outputs], [o.stats for o in outputs])

    options = {
        "model": model,
        "block_size": block,
        "max_new_tokens": decoder.max_new_tokens,
        "dtype": dtype,
        "trajectory": True,
    }
    return _decode_file(decoder, records, path, options, decode, refined, decoder.batch_size)


def _decode_file(
    decoder: Decoder,
    records: list[Record],
    path: Path,
    options: dict[str, Any],
    decode: Callable[..., list[Output]],
    answered: Callable[[Record, list[Output]], dict],
    batch_size: int,
) -> dict[str, Any]:
    """Decode `records` into the jsonl file `path` through the record loop the decoding CLIs use (`decode`,
    `answered`: its decode and build callbacks), resuming path.partial when it was written with the same
    `options`; returns the summary."""
    from tqdm import tqdm

    out = open_output(path, "jsonl", records, options)
    bar = tqdm(total=len(out.todo), unit="record", desc=path.name, dynamic_ncols=True)
    outputs: list[Output] = []
    start = time.perf_counter()

    def progress(decoded: list[Output]) -> None:
        outputs.extend(decoded)
        bar.update(len(decoded))

    decode_records(
        decoder,
        records,
        out,
        decode,
        lambda _rec, _turn, o: o.text,
        answered,
        progress,
        batch_size=batch_size,
        window=WINDOW,
    )
    bar.close()
    out.finish()
    elapsed = time.perf_counter() - start
    tokens = sum(o.stats["tokens"] for o in outputs)
    summary = {"devices": devices.describe(decoder.mesh), "records": len(records), "tokens": tokens}
    if outputs and "passes" in outputs[0].stats:
        summary["passes_per_token"] = round(sum(o.stats["passes"] for o in outputs) / max(tokens, 1), 4)
    return summary | {"seconds": round(elapsed, 1), "tokens_per_s": round(tokens / elapsed, 1)}


def _jacobi_states(
    work: Path, name: str, decoder: Decoder, model: str | None, k: int, block: int, dtype: str, log
) -> list[list[tuple[str, float]]]:
    """Per record of the sample file `name`: up to k (state text, (p + 1) / P) of its Jacobi refinement."""
    out = work / name.replace(".jsonl", ".jacobi.jsonl")
    if not out.exists():
        summary = _refine_file(decoder, read_records(work / name, "jsonl", with_drafts=True), out, block, model, dtype)
        log(f"{out}: " + ", ".join(f"{key} {v}" for key, v in summary.items()))
    rows = []
    for line in out.read_text(encoding="utf-8").splitlines():
        trajectory = json.loads(line)["stats"]["trajectory"]
        passes = len(trajectory)
        picks = sorted({round(x) for x in np.linspace(0, passes - 2, k)}) if passes >= 2 else []
        rows.append([(trajectory[p], (p + 1) / passes) for p in picks])
    return rows


def add_parser(commands) -> None:
    d = commands.add_parser("distill", help="a model's greedy answers (y(T)) and samples (y(0..T-1)) -> trajectories")
    d.add_argument("--prompts", type=Path, required=True, help="jsonl with `prompt` or `messages` per line")
    d.add_argument("--out", type=Path, required=True, help="dataset directory; generate outputs go to OUT.work/")
    d.add_argument(
        "--model", default=None, help="hub id, HF folder, .gguf, Orbax or run dir; default: embedded SmolLM2"
    )
    d.add_argument("--temperatures", default="1.0,0.7", help="comma-separated sampling temperatures (> 0)")
    d.add_argument("--samples", type=int, default=1, help="samples per temperature")
    d.add_argument(
        "--jacobi-states",
        type=int,
        default=0,
        metavar="K",
        help="also up to K intermediate Jacobi states per sample (CLLM's trajectories)",
    )
    d.add_argument("--jacobi-block", type=int, default=16, help="Jacobi window for --jacobi-states")
    d.add_argument("--max-new-tokens", type=int, default=256)
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    d.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    try:
        temperatures = [float(t) for t in args.temperatures.split(",")]
    except ValueError:
        raise TrajectoryDataError(
            f"--temperatures {args.temperatures!r}: not a comma-separated list of numbers"
        ) from None
    try:
        return distill(
            args.prompts,
            args.out,
            model=args.model,
            temperatures=temperatures,
            samples=args.samples,
            jacobi_states=args.jacobi_states,
            jacobi_block=args.jacobi_block,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except (FormatError, ModelSourceError, devices.MeshError) as e:
        raise TrajectoryDataError(str(e)) from None
