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
                               `--jacobi-block`); of its intermediate states (the last pass gives the
                               answer), up to K spread over noise levels (`spread_states`; a state's noise:
                               the share of the greedy answer's tokens it does not hold yet)
  drafts-{K}.jsonl (.jacobi)   --drafts: the K-th given draft file's drafts (and their Jacobi states)
  scored.jsonl                 one row per prompt: prompt, all_generated_responses, all_rm_scores, where a
                               response's score is minus its temperature (greedy 0, a given draft 1); a
                               Jacobi state of an answer at temperature t scores -t x its noise
and `scored.jsonl` is built into DIR by `trajectories.build`, so ranking, merging and the manifest are
the reward-ranked path's: responses ascending by (score, text) puts the hottest samples first and the
greedy answer last; a sample equal to the greedy answer merges into it, and a prompt whose samples all
equal its greedy answer is dropped as `fewer_than_2_distinct_responses` (counted in the manifest). The
manifest's `self_distill` entry records the model, temperatures, seeds and lengths. A rerun with the
same options resumes every unfinished answer set; the work directory is kept (it is the data's
provenance) and can be deleted once DIR exists. Devices and layout: the decoding CLIs' defaults
(decoding/devices.py: all local devices on the data axis on GPU/TPU, one device on CPU).

Drafts (`--drafts FILE`, repeatable; DiffPO's stage B): the answers come from other models' answer files
(`generate` outputs of the same prompts, in order) instead of the model's samples, and with --jacobi-states
the states are those the model (a trained refiner) passes through when it refines them at inference, from
the draft to its fixed point (its greedy answer, at R = 0). `--drop-repetitive` leaves out prompts whose
greedy answer repeats itself (REPEATS_RULE; counted in the manifest's `self_distill` entry): on such fixed
points a consistency term teaches the loop, not the answer.

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
    drafts: list[Path] = (),
    drop_repetitive: bool = False,
    overwrite: bool = False,
    loaded=None,
    log=print,
) -> dict[str, Any]:
    """Build the self-distilled dataset of `prompts` into `out_dir` (module doc); returns the manifest.
    `drafts`: answer files of other models (module doc, "Drafts") used instead of the model's own samples.
    `loaded`: an already loaded model to use instead of `model`."""
    from diffpo_jax.sources import load_model

    temperatures = [] if drafts else list(temperatures)
    if not drafts and (not temperatures or any(t <= 0 for t in temperatures) or samples < 1):
        raise TrajectoryDataError("self-distillation needs temperatures > 0 and samples >= 1")
    if jacobi_states < 0 or jacobi_block < 1:
        raise TrajectoryDataError("--jacobi-states must be >= 0 and --jacobi-block >= 1")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise TrajectoryDataError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    records = read_records(prompts, "jsonl", with_drafts=False)  # fail on bad prompts before loading
    draft_sets = [_read_drafts(Path(path), records) for path in drafts]
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
        "drafts": [str(path) for path in drafts],
        "drop_repetitive": drop_repetitive,
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
    greedy = [rec.drafts[0] for rec in read_records(work / "greedy.jsonl", "jsonl", with_drafts=True)]
    answers: list[list[tuple[str, float]]] = [[(g, 0.0)] for g in greedy]  # per prompt: (text, score)
    answer_sets = [(name, t) for name, t, _ in plan[1:]] + [(f"drafts-{k}.jsonl", 1.0) for k in range(len(drafts))]
    for k, texts in enumerate(draft_sets):
        _write_drafts(work / f"drafts-{k}.jsonl", records, texts)
    for name, t in answer_sets:
        for i, rec in enumerate(read_records(work / name, "jsonl", with_drafts=True)):
            answers[i].append((rec.drafts[0], -t))
        if jacobi_states:
            states = _jacobi_states(work, name, decoder, model, jacobi_states, jacobi_block, dtype, greedy, log)
            for i, row in enumerate(states):
                answers[i] += [(text, -t * noise) for text, noise in row]
    repetitive = [i for i, g in enumerate(greedy) if drop_repetitive and repeats(decoder.draft_tokens(g)[:-1])]
    scored = work / "scored.jsonl"
    tmp = scored.with_name(scored.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i, (rec, pairs) in enumerate(zip(records, answers)):
            if i in repetitive:
                continue
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
        "drafts": [str(path) for path in drafts],
        "score": "minus the sampling temperature (greedy 0; a given draft 1): hottest sample = y(0), greedy answer "
        "= y(T); a Jacobi state of a sample at temperature t: -t x its noise (share of the greedy answer's "
        "tokens it does not hold yet)",
        "dropped_repetitive_fixed_points": {
            "count": len(repetitive),
            "first_lines": [i + 1 for i in repetitive[:5]],
            "rule": REPEATS_RULE if drop_repetitive else "off",
        },
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
    work: Path, name: str, decoder: Decoder, model: str | None, k: int, block: int, dtype: str, greedy: list[str], log
) -> list[list[tuple[str, float]]]:
    """Per record of the answer file `name`: up to k (state text, noise) of its Jacobi refinement, spread over
    noise levels (`spread_states`)."""
    out = work / name.replace(".jsonl", ".jacobi.jsonl")
    if not out.exists():
        summary = _refine_file(decoder, read_records(work / name, "jsonl", with_drafts=True), out, block, model, dtype)
        log(f"{out}: " + ", ".join(f"{key} {v}" for key, v in summary.items()))
    rows = []
    for line, fixed in zip(out.read_text(encoding="utf-8").splitlines(), greedy):
        trajectory = json.loads(line)["stats"]["trajectory"]
        target = decoder.draft_tokens(fixed)
        rows.append(
            spread_states(trajectory[:-1], [noise(decoder.draft_tokens(t), target) for t in trajectory[:-1]], k)
        )
    return rows


def noise(state: list[int], fixed: list[int]) -> float:
    """The share of the fixed point's tokens that `state` does not hold at their positions (0: the fixed point)."""
    held = sum(a == b for a, b in zip(state, fixed))
    return round(1 - held / max(len(fixed), 1), 4)


def spread_states(states: list[str], noises: list[float], k: int) -> list[tuple[str, float]]:
    """Up to k (state, noise) of a refinement's intermediate states, spread over their noise levels: the
    distinct states with noise > 0 ordered from the noisiest (ties: the earlier pass first), then the picks
    round(linspace(0, n - 1, k)) of that order (fewer when they coincide)."""
    seen, ranked = set(), []
    for p in sorted(range(len(states)), key=lambda p: (-noises[p], p)):
        if noises[p] > 0 and states[p] not in seen:
            seen.add(states[p])
            ranked.append((states[p], noises[p]))
    picks = sorted({round(x) for x in np.linspace(0, len(ranked) - 1, k)}) if ranked else []
    return [ranked[p] for p in picks]


REPEATS_RULE = "a run of 1..8 tokens repeated 4 or more times in a row (CLLM's detect_repetitive_patterns)"


def repeats(tokens: list[int], max_period: int = 8, times: int = 4) -> bool:
    """True when some run of 1..max_period tokens occurs `times` or more times back to back (REPEATS_RULE)."""
    for period in range(1, max_period + 1):
        run = 0
        for i in range(period, len(tokens)):
            run = run + 1 if tokens[i] == tokens[i - period] else 0
            if run >= period * (times - 1):
                return True
    return False


def _read_drafts(path: Path, records: list[Record]) -> list[str]:
    """The first draft of each record of the answer file `path`, whose prompts must be `records`' in order."""
    drafted = read_records(path, "jsonl", with_drafts=True)
    if len(drafted) != len(records):
        raise TrajectoryDataError(f"{path}: {len(drafted)} records, the prompts file has {len(records)}")
    for line, (rec, want) in enumerate(zip(drafted, records), 1):
        if rec.prompt != want.prompt:
            raise TrajectoryDataError(f"{path}:{line}: prompt differs from the prompts file's line {line}")
    return [rec.drafts[0] for rec in drafted]


def _write_drafts(path: Path, records: list[Record], texts: list[str]) -> None:
    """The drafts as the jsonl answer file the record loop reads (prompt + draft), written once."""
    if path.exists():
        return
    tmp = path.with_name(path.name + ".tmp")
    rows = (
        {("prompt" if isinstance(r.prompt, str) else "messages"): r.prompt, "draft": t} for r, t in zip(records, texts)
    )
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


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
    d.add_argument(
        "--drafts",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="an answer file of another model (jsonl: the prompts' records with `draft`) used instead of the "
        "model's own samples; repeat for several (stage B: a refiner's Jacobi states from a base's drafts)",
    )
    d.add_argument("--drop-repetitive", action="store_true", help="drop prompts whose greedy answer repeats itself")
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
            drafts=args.drafts,
            drop_repetitive=args.drop_repetitive,
            overwrite=args.overwrite,
        )
    except (FormatError, ModelSourceError, devices.MeshError) as e:
        raise TrajectoryDataError(str(e)) from None
