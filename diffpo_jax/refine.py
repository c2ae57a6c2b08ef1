"""python -m diffpo_jax.refine: refine drafts into the DiffPO model's greedy answers by Jacobi decoding.

  python -m diffpo_jax.refine --input drafts.jsonl --output refined.jsonl [--model DIFFPO [--base BASE]]
      [--format jsonl|alpaca_eval|mt_bench] [--questions question.jsonl] [--history refined|draft]
      [--block-size 32] [--max-new-tokens 256] [--max-iterations N] [--batch-size 8]
      [--hold-draft-prefix R | random:R] [--no-realign] [--trajectory] [--dtype float32|bfloat16] [--mesh D,F,T]
      [--sort-window 256] [--on-error stop|skip] [--overwrite]
  python -m diffpo_jax.refine --plan DEVICES[/HOSTS] [--device-memory GIB] [--model M] [--prompt-len 1024] [options]

DIFFPO: any --model (sources.py); by default `embedded-refiner`, the DiffPO refiner trained for this project
(a LoRA adapter in diffpo_jax/refiner/ on the embedded SmolLM2; README). Formats: see `diffpo_jax.records.formats`. Results stream to OUTPUT.partial; a rerun resumes from it;
OUTPUT appears by rename when every record is done. The same command on a finished OUTPUT decodes nothing
("already complete", exit 0); other options or input there, or an OUTPUT it did not write, exit 2 naming
what differs, unless --overwrite (records/output.py). Bad input exits 2 with a one-line message; every
record's prompt is checked before the first forward, and with `--on-error skip` a record that cannot be
refined is written out with an `error` field instead (counted in the summary). Devices and dtype
(`--mesh`, `--dtype`; defaults: all local devices data-parallel and bfloat16 on GPU/TPU, one device and
float32 on CPU): decoding/devices.py; the summary names them. Several processes (launch/, or
--coordinator/--num-processes/--process-id): each refines every P-th record left over its own devices
and process 0 writes OUTPUT (records/output.py); a rerun resumes with any process count.
"""

from __future__ import annotations

import argparse
import sys
import time

from diffpo_jax import distributed
from diffpo_jax.paths import as_path
from diffpo_jax.records import cli
from diffpo_jax.records.formats import read_output, refined_output, refined_pairs

# the options a resumed run (or a rerun on a finished OUTPUT) must share with the run that wrote it
RESUME_OPTIONS = (
    "model",
    "base",
    "format",
    "questions",  # by content (cli.run_options)
    "history",
    "block_size",
    "realign",
    "max_new_tokens",
    "max_iterations",
    "hold_draft_prefix",
    "dtype",
    "trajectory",
    "on_error",
)
# the options that cannot change OUTPUT (records/cli.py); every other option is in RESUME_OPTIONS
NEUTRAL_OPTIONS = cli.DECODE_NEUTRAL_OPTIONS + (
    "batch_size",  # rows are refined independently (the pass cap is per row)
    "show",  # prints records of the finished output
)


def hold_spec(text: str) -> int | str:
    """--hold-draft-prefix: R (int) or "random:R"."""
    value = text.removeprefix("random:")
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected R or random:R with R an integer >= 0, got {text!r}")
    return text if text.startswith("random:") else int(value)


def hold_max(spec: int | str) -> int:
    return spec if isinstance(spec, int) else int(spec.removeprefix("random:"))


def hold_lens(spec: int | str, indices: list[int]) -> list[int] | None:
    """Per record (0-based input index): its held draft tokens under random:R (uniform 0..R, drawn from the
    index alone, so any batching, process count or resume gives the same), or None for a fixed R."""
    import numpy as np

    if isinstance(spec, int):
        return None
    return [int(np.random.default_rng(i).integers(0, hold_max(spec) + 1)) for i in indices]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m diffpo_jax.refine", description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=as_path, help="mt_bench: FastChat question.jsonl")
    ap.add_argument(
        "--history",
        choices=["refined", "draft"],
        default="refined",
        help="mt_bench: the turn-1 answer turn 2 sees (draft = the official script)",
    )
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-iterations", type=int, help="cap on Jacobi passes per row (default: max-new-tokens)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--hold-draft-prefix",
        type=hold_spec,
        default=0,
        metavar="R | random:R",
        help="keep the first R draft tokens fixed; random:R: a uniform 0..R per record, drawn from its "
        "index (the official DiffPO script holds random:12)",
    )
    ap.add_argument("--no-realign", dest="realign", action="store_false", help="no n-gram re-alignment to the draft")
    ap.add_argument(
        "--trajectory",
        action="store_true",
        help="jsonl: stats.trajectory = the response after each Jacobi pass (the intermediate states)",
    )
    ap.add_argument(
        "--show", type=int, default=0, metavar="K", help="print the first K drafts and refinements side by side"
    )
    cli.decode_arguments(
        ap,
        model_help="DiffPO model: hub id, HF folder, .gguf, Orbax dir, PEFT adapter folder; default: embedded-refiner, "
        "the DiffPO refiner trained for this project (README) on the embedded SmolLM2",
        model_default="embedded-refiner",
        window_help="refine N records at a time through --batch-size slots with row refill (a finished row's "
        "slot takes the next record), written in input order (default 256; <= --batch-size: "
        "batches of consecutive records, each until its slowest row is done)",
    )
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    cli.check_decode_arguments(ap, args)
    for name in ("block_size", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= hold_max(args.hold_draft_prefix) <= args.max_new_tokens:
        ap.error("--hold-draft-prefix must be in [0, --max-new-tokens]")
    if args.max_iterations is not None and args.max_iterations < 1:
        ap.error("--max-iterations must be >= 1")
    if args.trajectory and args.format != "jsonl":
        ap.error("--trajectory needs --format jsonl (the only format that keeps stats)")
    return args


def run(args: argparse.Namespace, loaded=None) -> dict:
    """Refine args.input into args.output; returns the summary. `loaded`: an already loaded model to use
    instead of args.model."""
    job = cli.start_decode(
        args,
        "refine",
        rows=args.batch_size,
        resume_options=RESUME_OPTIONS,
        with_drafts=True,
        questions=args.questions,
        loaded=loaded,
    )
    decoder = job.decoder
    totals = {"rows": 0, "tokens": 0, "passes": 0, "committed": 0, "converged": 0}

    def decode(indices: list[int], turn: int, recs, prompts):
        drafts = [decoder.draft_tokens(r.drafts[turn]) for r in recs]
        return decoder.refine(
            prompts,
            drafts,
            block_size=args.block_size,
            max_iterations=args.max_iterations,
            hold_draft_prefix=hold_max(args.hold_draft_prefix),
            hold_lens=hold_lens(args.hold_draft_prefix, indices),
            realign=args.realign,
            trajectory=args.trajectory,
        )

    def progress(outputs):
        for o in outputs:
            totals["rows"] += 1
            totals["tokens"] += o.stats["tokens"]
            totals["passes"] += o.stats["passes"]
            totals["converged"] += o.stats["converged"]
        elapsed = time.perf_counter() - job.start
        job.bar.set_postfix(
            tok_s=f"{totals['tokens'] / elapsed:.1f}", passes_tok=f"{totals['passes'] / max(totals['tokens'], 1):.3f}"
        )
        job.bar.update(len(outputs))

    def build(rec, outputs):
        return refined_output(args.format, rec, [o.text for o in outputs], [o.stats for o in outputs])

    def history(rec, turn, output):
        return output.text if args.history == "refined" else rec.drafts[turn]

    # A window's records go to the decoder together: its batch_size slots refine them with row refill
    # (one batch at a time with --trajectory, or when the window is no larger than a batch).
    per_call = args.batch_size if args.trajectory else max(args.sort_window, args.batch_size)
    summary = cli.finish_decode(job, args, decode, history, build, progress, batch_size=per_call)
    elapsed = time.perf_counter() - job.start
    return summary | {
        "turns_refined": totals["rows"],
        "tokens": totals["tokens"],
        "passes": totals["passes"],
        "passes_per_token": round(totals["passes"] / max(totals["tokens"], 1), 4),
        "converged": f"{totals['converged']}/{totals['rows']}",
        "seconds": round(elapsed, 1),
        "tokens_per_s": round(totals["tokens"] / elapsed, 1),
    }


def show(path, fmt: str, k: int) -> None:
    """The first k records of the output file, drafts and refinements side by side."""
    for _, rec in read_output(path, fmt)[:k]:
        title, pairs = refined_pairs(fmt, rec)
        print(f"\n=== {title}")
        for draft, refined in pairs:
            print(cli.side_by_side(draft, refined))
        for key in ("error", "stats"):
            if key in rec:
                print(f"{key}: {rec[key]}")


def report(args: argparse.Namespace, summary: dict) -> None:
    """Process 0 shows the first --show records of the output it wrote; every process its own summary."""
    if distributed.is_main_process():
        show(args.output, args.format, args.show)
    print()  # a blank line between the records shown and the summary
    cli.print_summary(args, summary)


def main(argv: list[str] | None = None) -> int:
    return cli.main(parse_args(argv), run, "refine", report)


if __name__ == "__main__":
    sys.exit(main())
