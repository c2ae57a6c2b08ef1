"""Does training make a real model refine its own drafts faster? SmolLM2-135M on its self-distilled trajectories.

    python -m bench.self_distill [--steps 120] [--eval-every 40] [--holdout 32] [--max-new-tokens 32]
        [--jacobi-states K] [--train-prompts N] [--block 16] [--runs NAME ...] [--work out/self_distill] [key=value ...]

1. Data: `data distill` (diffpo_jax/pipelines/self_distill.py) with the embedded, untrained SmolLM2-135M-
   Instruct on bench/data/self_distill_prompts.jsonl (256 prompts: 4 question templates x 64 topics,
   written for this benchmark): y(T) = its greedy answer, y(0), y(1) = its samples at temperature 1.0
   and 0.7, `--max-new-tokens` tokens each, and with `--jacobi-states K` up to K intermediate Jacobi
   states from each sample to the greedy answer (CLLM's trajectories). Kept in WORK (resumable;
   reused by a rerun; generate outputs already in WORK/data.work are reused). `--train-prompts N`
   trains on the first N non-held-out prompts only (WORK/data-trainN, built from the same answers): many
   epochs over few prompts, to ask whether the objective teaches the skill on drafts it has seen.
2. Training (RUNS; `--runs` picks some): the smollm2-135m preset (fp32, lr 1e-5, batch 8) with w = 0
   (AR only), w = 1 and w = 0.1 with the KL on the draft's positions, w = 1 and 0.3 with the KL on the
   frontier (training/loss.py), and w = 1 on the draft's positions with the KL gradient projected off
   the AR gradient where they conflict (`loss.con_gradient=project`, training/step.py), and the KL
   gradient rescaled to 0.3 times the AR gradient's norm every step on the draft's positions and to 1 times
   it on the frontier's 16 or 2 positions (`loss.con_gradient=balance`; the latter also at 5x the preset's
   learning rate), and w = 1 on the frontier's 2 positions unbalanced; same init, data,
   order and steps (default: w = 0, w = 1 and w = 0.1 on the draft's positions); `--holdout` prompts held out by the trainer's
   split, evaluated every `--eval-every` steps (training/evaluation.py: held-out L_AR and Jacobi
   refinement of the held-out y(t) drafts). A run dir that holds a finished run is reused.
3. Refinement, per model (untrained and each trained one): the held-out prompts' temperature-0.7 samples
   refined by the decoder `refine` uses (batch 8, window `--block`, default 16; a finished run is reused,
   so a rerun with another --block only refines), and AR greedy of the same weights on the same prompts
   (batch 8), both timed after a warm-up batch, and both again one row at a time on the first 8 of them
   (the latency case Jacobi decoding is for): passes per token, tokens per pass, refine tokens/s over AR
   tokens/s, passes per token on as many TRAINING prompts' temperature-0.7 samples
   (drafts the model was trained on: does the objective teach the skill at all, held-out or not?),
   how often the fixed point equals the UNTRAINED model's greedy answer and
   the model's own greedy answer (Jacobi decoding is exact, so the latter should be 100%), distinct-
   token fraction (collapse signal), and a few answers side by side.
Writes bench/results/self-distill.md and bench/figures/self_distill.png (held-out passes per token and
L_AR against step, every run); with --jacobi-states, bench/results/self-distill-jacobi.md and
bench/figures/self_distill_jacobi.png; `--section NAME` names the run otherwise (NAME.md, and NAME.png
with dashes as underscores) so a run of some of the RUNS can sit beside the full one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import add_results_option, figure, header, machine, report, table

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "bench" / "data" / "self_distill_prompts.jsonl"
RUNS = {  # name: (run dir under WORK, overrides of the smollm2-135m preset)
    "AR only (w=0)": ("ar-only", ["loss.con_weight=0"]),
    "w=1, draft": ("w1-draft", ["loss.con_weight=1", "loss.con_positions=draft"]),
    "w=0.1, draft": ("w0.1-draft", ["loss.con_weight=0.1", "loss.con_positions=draft"]),
    "w=1, frontier": ("w1-frontier", ["loss.con_weight=1", "loss.con_positions=frontier"]),
    "w=0.3, frontier": ("w0.3-frontier", ["loss.con_weight=0.3", "loss.con_positions=frontier"]),
    "w=1, draft, projected": (
        "w1-draft-proj",
        ["loss.con_weight=1", "loss.con_positions=draft", "loss.con_gradient=project"],
    ),
    "w=0.3, draft, balanced": (
        "w0.3-draft-bal",
        ["loss.con_weight=0.3", "loss.con_positions=draft", "loss.con_gradient=balance"],
    ),
    "w=1, frontier, balanced": (
        "w1-frontier-bal",
        ["loss.con_weight=1", "loss.con_positions=frontier", "loss.con_gradient=balance"],
    ),
    "w=1, frontier 2": ("w1-frontier2", ["loss.con_weight=1", "loss.con_positions=frontier", "loss.con_window=2"]),
    "w=1, frontier 2, balanced": (
        "w1-frontier2-bal",
        ["loss.con_weight=1", "loss.con_positions=frontier", "loss.con_window=2", "loss.con_gradient=balance"],
    ),
    "w=1, frontier 2, balanced, lr 5e-5": (
        "w1-frontier2-bal-lr5e-5",
        [
            "loss.con_weight=1",
            "loss.con_positions=frontier",
            "loss.con_window=2",
            "loss.con_gradient=balance",
            "optimizer.learning_rate=5e-5",
        ],
    ),
}
DEFAULT_RUNS = ["AR only (w=0)", "w=1, draft", "w=0.1, draft"]  # the presets' objective, w = 0 and w ~ w* of this data
BATCH, BLOCK, SHOW, TIMED = 8, 16, 4, 8


def train_run(overrides: list[str], out: Path, steps: int) -> list[dict]:
    """Train the smollm2-135m preset with `overrides` for `steps` steps into `out` (kept: a rerun reuses
    a finished run); its eval lines."""
    from diffpo_jax.training.config import load_config
    from diffpo_jax.training.trainer import train

    metrics = out / "metrics.jsonl"
    if not (out / "checkpoints" / str(steps)).exists():
        cfg = load_config(ROOT / "configs" / "train" / "smollm2-135m.yaml", [f"output_dir={out}", *overrides])
        train(cfg, log=lambda line: print(f"  {line}", flush=True))
    return [m for m in map(json.loads, metrics.read_text().splitlines()) if "eval_ar" in m]


def training_subset(data: Path, holdout: int, n: int) -> Path:
    """The dataset of `data`'s `holdout` held-out prompts (the trainer's split) and its first `n` other
    prompts in prompt-file order, built from the same scored answers into data-train{n} (kept)."""
    from diffpo_jax.data.trajectories import build, record_id
    from diffpo_jax.training.evaluation import holdout_split, read_records

    out = data.with_name(f"{data.name}-train{n}")
    if out.exists():
        return out
    records = read_records(data)
    _, held_idx = holdout_split(records, holdout)
    held = {records[i]["id"] for i in held_idx}
    lines = data.with_name(data.name + ".work").joinpath("scored.jsonl").read_text().splitlines()
    ids = [record_id(json.loads(line)["prompt"]) for line in lines]
    keep = held | set([i for i in ids if i not in held][:n])
    scored = out.with_name(out.name + ".scored.jsonl")
    scored.write_text("".join(line + "\n" for line, i in zip(lines, ids) if i in keep))
    extra = json.loads((data / "manifest.json").read_text())["self_distill"]
    build(
        [str(scored)], out, extra={"self_distill": extra, "subset": f"{holdout} held-out + first {n} prompts of {data}"}
    )
    return out


def held_and_seen(work: Path, run_dir: Path, train_prompts: int = 0) -> tuple[list[dict], list[dict]]:
    """({prompt, draft} of the temperature-0.7 sample) of the held-out prompts of `run_dir` (its
    eval_ids.json), and of as many training prompts (at most `train_prompts` when set), in prompt order."""
    from diffpo_jax.data.trajectories import record_id
    from diffpo_jax.records.formats import read_records

    held_ids = set(json.loads((run_dir / "eval_ids.json").read_text()))
    samples = read_records(work / "data.work" / "t0.7-s0.jsonl", "jsonl", with_drafts=True)
    held = [{"prompt": r.prompt, "draft": r.drafts[0]} for r in samples if record_id(r.prompt) in held_ids]
    seen = [{"prompt": r.prompt, "draft": r.drafts[0]} for r in samples if record_id(r.prompt) not in held_ids]
    return held, seen[: min(len(held), train_prompts or len(held))]


def decode_all(
    decoder, prompts: list[list[int]], drafts: list[list[int]] | None, block: int = BLOCK
) -> tuple[list, float]:
    """(outputs, seconds): refine `drafts` with a `block`-token window (or AR greedy when None) in
    decoder.batch_size batches, after one untimed warm-up batch."""
    import jax

    b = decoder.batch_size

    def run(lo):
        p = prompts[lo : lo + b]
        if drafts is None:
            return decoder.sample(p, jax.random.split(jax.random.key(0), len(p)), temperature=0.0, top_p=1.0)
        return decoder.refine(p, drafts[lo : lo + b], block_size=block)

    run(0)
    start = time.perf_counter()
    outputs = [o for lo in range(0, len(prompts), b) for o in run(lo)]
    return outputs, time.perf_counter() - start


def compare(
    models: dict[str, str | None], held: list[dict], seen: list[dict], max_new_tokens: int, block: int = BLOCK
) -> tuple[dict, dict]:
    """Per model: refinement and AR figures on the held-out drafts, passes per token on the `seen` (training)
    drafts; and the answers per model."""
    from diffpo_jax.decoding.batching import Decoder
    from diffpo_jax.sources import load_model

    figures, answers, reference = {}, {}, None
    for name, source in models.items():
        print(f"compare: {name}", flush=True)
        loaded = load_model(source)
        decoder = Decoder(loaded, batch_size=BATCH, max_new_tokens=max_new_tokens)
        prompts = [decoder.prompt_tokens(r["prompt"]) for r in held]
        drafts = [decoder.draft_tokens(r["draft"]) for r in held]
        refined, refine_s = decode_all(decoder, prompts, drafts, block)
        refined_seen, _ = decode_all(
            decoder,
            [decoder.prompt_tokens(r["prompt"]) for r in seen],
            [decoder.draft_tokens(r["draft"]) for r in seen],
            block,
        )
        greedy, ar_s = decode_all(decoder, prompts, None)
        single = Decoder(loaded, batch_size=1, max_new_tokens=max_new_tokens)  # latency: one row at a time
        refined_1, refine_1_s = decode_all(single, prompts[:TIMED], drafts[:TIMED], block)
        greedy_1, ar_1_s = decode_all(single, prompts[:TIMED], None)
        reference = reference or [o.tokens for o in greedy]  # the untrained model comes first
        tokens = sum(o.stats["tokens"] for o in refined)
        passes = sum(o.stats["passes"] for o in refined)
        figures[name] = {
            "passes_per_token": passes / tokens,
            "tokens_per_pass": tokens / passes,
            "seen_passes_per_token": (
                sum(o.stats["passes"] for o in refined_seen) / sum(o.stats["tokens"] for o in refined_seen)
            ),
            "refine_tok_s": tokens / refine_s,
            "ar_tok_s": sum(o.stats["tokens"] for o in greedy) / ar_s,
            "equal_untrained_greedy": sum(o.tokens == g for o, g in zip(refined, reference)) / len(held),
            "equal_own_greedy": sum(o.tokens == g.tokens for o, g in zip(refined, greedy)) / len(held),
            "distinct": sum(len(set(o.tokens)) / max(len(o.tokens), 1) for o in refined) / len(held),
        }
        figures[name]["speedup"] = figures[name]["refine_tok_s"] / figures[name]["ar_tok_s"]
        figures[name]["speedup_1"] = (sum(o.stats["tokens"] for o in refined_1) / refine_1_s) / (
            sum(o.stats["tokens"] for o in greedy_1) / ar_1_s
        )
        answers[name] = [o.text for o in refined]
        print(f"  {figures[name]}", flush=True)
    return figures, answers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.self_distill", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--holdout", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=Path, default=PROMPTS)
    ap.add_argument("--jacobi-states", type=int, default=0)
    ap.add_argument(
        "--block", type=int, default=BLOCK, help="Jacobi window of the refinement table (training keeps %(default)s)"
    )
    ap.add_argument("--train-prompts", type=int, default=0, help="train on the first N non-held-out prompts only")
    ap.add_argument(
        "--runs",
        nargs="+",
        choices=list(RUNS),
        default=DEFAULT_RUNS,
        help="runs to train (default: %(default)s, ~75 min on 2 cores, data included)",
    )
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "self_distill")
    add_results_option(ap)
    ap.add_argument(
        "--section", help="the run's name: results file and figure (default: self-distill, or self-distill-jacobi)"
    )
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="train config overrides for every run")
    args = ap.parse_args(argv)
    from diffpo_jax.pipelines.self_distill import distill

    line = machine()
    n = args.max_new_tokens
    data = args.work / "data"
    if not data.exists():
        distill(
            args.prompts,
            data,
            temperatures=[1.0, 0.7],
            max_new_tokens=n,
            batch_size=16,
            jacobi_states=args.jacobi_states,
        )
    if args.train_prompts:
        data = training_subset(data, args.holdout, args.train_prompts)
    manifest = json.loads((data / "manifest.json").read_text())
    common = [
        f"data={data}",
        f"max_steps={args.steps}",
        "num_epochs=1000",
        f"response_len={n}",
        "prompt_len=64",
        "global_batch_size=8",
        "grad_accum=1",
        f"eval.holdout_prompts={args.holdout}",
        f"eval.every={args.eval_every}",
        f"eval.max_rows={2 * args.holdout}",
        f"eval.block_size={BLOCK}",
        "save_every=100000",
        "tensorboard=false",
        "log_every=5",
        *args.overrides,
    ]
    curves, run_dirs = {}, {}
    for name, (folder, overrides) in RUNS.items():
        if name not in args.runs:
            continue
        print(f"train: {name}", flush=True)
        run_dirs[name] = args.work / (folder + (f"-train{args.train_prompts}" if args.train_prompts else ""))
        curves[name] = train_run(common + overrides, run_dirs[name], args.steps)

    held, seen = held_and_seen(args.work, next(iter(run_dirs.values())), args.train_prompts)
    models = {"untrained": None, **{name: str(d) for name, d in run_dirs.items()}}
    figures, answers = compare(models, held, seen, n, args.block)

    section = args.section or ("self-distill-jacobi" if args.jacobi_states else "self-distill")
    plot = figure(
        args.results, section, curves, "refining own samples (lower = faster)", "held-out L_AR on the greedy answers"
    )
    title = "Self-distillation on SmolLM2-135M" + (
        f", with {args.jacobi_states} Jacobi states per sample" if args.jacobi_states else ""
    )
    body = header(title, section, "bench.self_distill", argv, line)
    body += (
        f"\nData: {manifest['kept']} prompts ({manifest['responses_per_prompt']['total']} distinct responses;"
        f" dropped: {manifest['dropped_prompts']['total']} prompts whose samples all equal the greedy answer),"
        f" {n} new tokens. Training: {args.steps} steps x 8 rows, {args.holdout} prompts held out. "
        f"Refinement below: the {len(held)} held-out prompts' temperature-0.7 samples, batch {BATCH}, block "
        f"{args.block} (and the first {len(seen)} training prompts' samples, column 'training prompts');"
        f" AR greedy on the same prompts and batch; tokens/s after a warm-up batch; batch 1: the first {TIMED} "
        "of them one at a time.\n\n"
    )
    rows = []
    for name, f in figures.items():
        curve = curves.get(name) or [next(iter(curves.values()))[0]]  # untrained: the runs' step-0 eval
        rows.append(
            [
                name,
                curve[-1]["eval_ar"],
                f["passes_per_token"],
                f["seen_passes_per_token"],
                f["tokens_per_pass"],
                f["refine_tok_s"],
                f["ar_tok_s"],
                f["speedup"],
                f["speedup_1"],
                f["equal_untrained_greedy"],
                f["equal_own_greedy"],
                f["distinct"],
            ]
        )
    body += table(
        [
            "model",
            "held-out L_AR",
            "passes/tok",
            "passes/tok (training prompts)",
            "tok/pass",
            "refine tok/s",
            "AR tok/s",
            "refine / AR (batch 8)",
            f"refine / AR (batch 1, {TIMED} rows)",
            "= untrained greedy",
            "= own greedy",
            "distinct",
        ],
        rows,
    )
    base = figures["untrained"]["passes_per_token"]
    body += "\n\nHeld-out passes per token relative to the untrained model: " + ", ".join(
        f"{name} {f['passes_per_token'] / base - 1:+.1%}" for name, f in figures.items() if name != "untrained"
    )
    seen_base = figures["untrained"]["seen_passes_per_token"]
    body += "; on the training prompts' samples: " + ", ".join(
        f"{name} {f['seen_passes_per_token'] / seen_base - 1:+.1%}"
        for name, f in figures.items()
        if name != "untrained"
    )
    body += (
        f"\n\nHeld-out evaluation during training (trainer: the first {2 * args.holdout} (held-out prompt, y(t)) "
        "rows in record order; the held-out L_AR column above is its last figure):\n\n"
    )
    body += table(
        ["run", "step", "L_AR", "L_Con", "passes/tok", "= y(T)", "distinct"],
        [
            [
                name,
                m["step"],
                m["eval_ar"],
                m["eval_con"],
                m["eval_passes_per_token"],
                m["eval_equal_best"],
                m["eval_distinct"],
            ]
            for name, curve in curves.items()
            for m in curve
        ],
    )
    body += f"\n\n{plot}\n\nAnswers (held-out, refined from the temperature-0.7 sample):\n"
    for i, rec in enumerate(held[:SHOW]):
        body += f"\n- **{rec['prompt']}**\n  - draft: {json.dumps(rec['draft'])}\n"
        body += "".join(f"  - {name}: {json.dumps(answers[name][i])}\n" for name in models)
    report(args.results, section, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
