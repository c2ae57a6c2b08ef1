"""Does training teach? The loss ablation (paper Table 5 spirit) on a small model, refinement measured.

    python -m bench.consistency [--preset tiny] [--steps 120] [--holdout 8] [--train-rows N] [--only NAME ...]
        [key=value ...]

Every variant trains the same model from the same init on the same trajectories (the train preset's
data, `--holdout` prompts held out by the trainer's split) for the same steps, with held-out evaluation
every `--eval-every` steps (training/evaluation.py). After training, the same evaluator refines the
y(t) drafts of the TRAINING prompts (every (prompt, y(t)) pair, or the first `--train-rows`), from y(t)
by Jacobi decoding with the trained weights: passes per token, fraction whose fixed point is y(T), distinct-token fraction (the
collapse signal). Variants: AR only (w = 0), consistency only (no L_AR), w in {1, 10, 100, 1000} with
the KL on the draft's positions (`loss.con_positions=draft`), the paper's setting (w = 1000 on all
positions), w = 1 / 1000 with the KL gradient projected off the AR gradient where they conflict
(`loss.con_gradient=project`, training/step.py), and w = 1 with the KL gradient rescaled to the AR
gradient's norm every step (`loss.con_gradient=balance`). Writes bench/results/NAME.md (NAME:
`consistency-PRESET`, or `--section`) and bench/figures/NAME.png (dashes as underscores; held-out L_AR and
passes per token against step, per variant).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bench.common import add_results_option, figure, header, machine, report, table

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "AR only (w=0)": ["loss.con_weight=0"],
    "con only (w=1000, draft)": ["loss.ar_weight=0", "loss.con_weight=1000", "loss.con_positions=draft"],
    "w=1 draft": ["loss.con_weight=1", "loss.con_positions=draft"],
    "w=10 draft": ["loss.con_weight=10", "loss.con_positions=draft"],
    "w=100 draft": ["loss.con_weight=100", "loss.con_positions=draft"],
    "w=1000 draft": ["loss.con_weight=1000", "loss.con_positions=draft"],
    "w=1000 all (paper)": ["loss.con_weight=1000", "loss.con_positions=all"],
    "w=1 draft, balanced": ["loss.con_weight=1", "loss.con_positions=draft", "loss.con_gradient=balance"],
    "w=1 draft, projected": ["loss.con_weight=1", "loss.con_positions=draft", "loss.con_gradient=project"],
    "w=1000 draft, projected": ["loss.con_weight=1000", "loss.con_positions=draft", "loss.con_gradient=project"],
    "w=1000 all (paper), projected": ["loss.con_weight=1000", "loss.con_positions=all", "loss.con_gradient=project"],
}


def run_variant(preset: str, overrides: list[str], out: Path, train_rows: int | None) -> dict:
    """Train one variant into `out`; returns {"curve": eval lines, "train_refine": metrics on the first
    `train_rows` (training prompt, y(t)) pairs, or all of them when None}."""
    from flax import nnx

    from diffpo_jax.data.loader import RecordEncoder
    from diffpo_jax.sharding import make_mesh
    from diffpo_jax.sources import load_model
    from diffpo_jax.training.config import load_config
    from diffpo_jax.training.evaluation import make_evaluator, read_records
    from diffpo_jax.training.trainer import train

    cfg = load_config(ROOT / "configs" / "train" / f"{preset}.yaml", [f"output_dir={out}", *overrides])
    train(cfg, log=lambda line: print(f"  {line}", flush=True))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    held = set(json.loads((out / "eval_ids.json").read_text()))
    data_dir = out / "data" if (out / "data").is_dir() else Path(cfg.data)
    train_records = [r for r in read_records(data_dir) if r["id"] not in held]
    loaded = load_model(str(out))  # what refine --model RUN_DIR loads
    graphdef, state = nnx.split(loaded.model)
    encoder = RecordEncoder.for_tokenizer(loaded.tokenizer, cfg.prompt_len, cfg.response_len)
    stops = loaded.stop_tokens
    evaluate = make_evaluator(
        cfg.eval,
        cfg.loss,
        train_records,
        encoder,
        graphdef,
        make_mesh(cfg.mesh),
        stop_tokens=stops,
        max_rows=sum(len(r["others"]) for r in train_records) if train_rows is None else train_rows,
    )
    return {
        "curve": [m for m in lines if "eval_ar" in m],
        "train_refine": evaluate(nnx.to_pure_dict(state)),
        "lengths": (cfg.prompt_len, cfg.response_len),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.consistency", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help="configs/train/PRESET.yaml")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--holdout", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=30)
    ap.add_argument(
        "--train-rows", type=int, help="refine the first N (training prompt, y(t)) pairs after training (default: all)"
    )
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS), metavar="NAME", help="variant names (default: all)")
    add_results_option(ap)
    ap.add_argument("--section", help="the run's name: results file and figure (default: consistency-PRESET)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="train config overrides for every variant")
    args = ap.parse_args(argv)
    line = machine()
    common = [
        f"max_steps={args.steps}",
        f"num_epochs={10**4}",
        f"eval.holdout_prompts={args.holdout}",
        f"eval.every={args.eval_every}",
        "save_every=100000",
        "tensorboard=false",
        "log_every=30",
        *args.overrides,
    ]
    results = {}
    work = Path(tempfile.mkdtemp(prefix="consistency-"))
    try:
        for i, (name, overrides) in enumerate(VARIANTS.items()):
            if args.only and name not in args.only:
                continue
            print(f"{name}: {overrides}", flush=True)
            results[name] = run_variant(args.preset, common + overrides, work / f"v{i}", args.train_rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = args.section or f"consistency-{args.preset}"
    plot = figure(
        args.results,
        section,
        {name: r["curve"] for name, r in results.items()},
        "refinement cost (lower = faster)",
        "held-out L_AR",
    )
    rows = []
    for name, r in results.items():
        end, start, t = r["curve"][-1], r["curve"][0], r["train_refine"]
        rows.append(
            [
                name,
                start["eval_ar"],
                end["eval_ar"],
                end["eval_passes_per_token"],
                end["eval_distinct"],
                t["eval_ar"],
                t["eval_passes_per_token"],
                t["eval_equal_best"],
                t["eval_distinct"],
            ]
        )
    body = header(f"Consistency ablation, preset {args.preset}", section, "bench.consistency", argv, line)
    p, n = next(iter(results.values()))["lengths"]
    body += (
        f"\n{args.steps} steps per variant, P = {p}, N = {n}, same init and data; {args.holdout} prompts held out. Held-out: "
        "the trainer's eval at the last step. Train prompts: "
        + (
            "every (prompt, y(t)) pair"
            if args.train_rows is None
            else f"the first {args.train_rows} (prompt, y(t)) pairs"
        )
        + " of the training split refined from y(t). passes/tok = Jacobi passes per "
        "committed token; = y(T): fixed point is y(T); distinct = distinct tokens / tokens per answer (collapse: ~1/length).\n\n"
    )
    body += table(
        [
            "variant",
            "held-out L_AR at 0",
            "held-out L_AR",
            "held-out passes/tok",
            "held-out distinct",
            "train L_AR",
            "train passes/tok",
            "train = y(T)",
            "train distinct",
        ],
        rows,
    )
    body += f"\n\n{plot}\n"
    report(args.results, section, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
