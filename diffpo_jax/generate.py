"""python -m diffpo_jax.generate: draft answers from a base model, in the formats `refine` reads.

  python -m diffpo_jax.generate --input prompts.jsonl --output drafts.jsonl [--model BASE]
      [--format jsonl|alpaca_eval|mt_bench] [--temperature 0.7] [--top-p 1.0] [--max-new-tokens 256]
      [--batch-size 8] [--num-samples 1] [--seed 0] [--model-id NAME] [--dtype float32|bfloat16]
      [--mesh D,F,T] [--sort-window 256] [--on-error stop|skip] [--overwrite]
  python -m diffpo_jax.generate --plan DEVICES[/HOSTS] [--device-memory GIB] [--model M] [--prompt-len 1024] [options]

jsonl adds `draft`; alpaca_eval sets `output` and `generator`; mt_bench reads FastChat question.jsonl
and writes answer records (turn 2 sees the generated turn 1). `--num-samples K` > 1 (jsonl only) draws K
answers per prompt instead: each record gets `samples` (K strings, no `draft`) and `sample_keys`
([seed, record index, 0, k] for each sample k). --batch-size counts prompts: the decoder runs
batch_size * K rows at a time, and the rows of a --sort-window go through them with row refill.

Sampling is reproducible and per row: sample k of turn t of input record i (0-based) draws with the key
fold_in(fold_in(fold_in(jax.random.key(seed), i), t), k). So the outputs do not depend on --batch-size,
a resumed run gives the same outputs, and sample 0 of K is the K = 1 draft of the same seed. Output is
streamed and resumed, and a finished one kept, as in `refine`; bad input exits 2 with a one-line message,
or with `--on-error skip` goes out as the input record plus `error` (as in `refine`). `--mesh`, `--dtype`
and several processes as in `refine`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffpo_jax.records import cli
from diffpo_jax.records.formats import generated_output, sampled_output
from diffpo_jax.records.loop import sample_keys

# the options a resumed run (or a rerun on a finished OUTPUT) must share with the run that wrote it
RESUME_OPTIONS = (
    "model",
    "base",
    "format",
    "temperature",
    "top_p",
    "max_new_tokens",
    "num_samples",
    "seed",
    "model_id",
    "dtype",
    "on_error",
)
# the options that cannot change OUTPUT (records/cli.py); every other option is in RESUME_OPTIONS
NEUTRAL_OPTIONS = cli.DECODE_NEUTRAL_OPTIONS + (
    "batch_size",  # each row samples with its own key (module doc): the outputs do not depend on it
)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m diffpo_jax.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per decode call")
    ap.add_argument("--num-samples", type=int, default=1, help="answers per prompt (> 1: jsonl `samples`)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-id", help="generator / model_id written to alpaca_eval and mt_bench records")
    cli.decode_arguments(
        ap,
        model_help="base model: hub id, HF folder, .gguf, Orbax dir, PEFT adapter folder; default: embedded SmolLM2",
        model_default=None,
        window_help="decode N records at a time through --batch-size slots with row refill (a finished "
        "row's slot takes the next record), written in input order (default 256; <= "
        "--batch-size: batches of consecutive records, each until its longest answer is done)",
    )
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    cli.check_decode_arguments(ap, args)
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.num_samples < 1:
        ap.error("--max-new-tokens, --batch-size and --num-samples must be >= 1")
    if args.num_samples > 1 and args.format != "jsonl":
        ap.error("--num-samples > 1 needs --format jsonl (the only format with a `samples` field)")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        ap.error("--temperature must be >= 0 and --top-p in (0, 1]")
    return args


def run(args: argparse.Namespace, loaded=None) -> dict:
    """Generate drafts for args.input into args.output; returns the summary. `loaded`: an already loaded model
    to use instead of args.model."""
    k = args.num_samples
    job = cli.start_decode(
        args, "generate", rows=args.batch_size * k, resume_options=RESUME_OPTIONS, with_drafts=False, loaded=loaded
    )
    model_id = args.model_id or Path(job.loaded.source).stem
    totals = {"rows": 0, "tokens": 0}

    def decode(indices: list[int], turn: int, _recs, prompts):
        """Per record: (its index, its k Outputs), the k samples of a prompt in adjacent rows."""
        keys = sample_keys(args.seed, indices, turn, k)
        outputs = job.decoder.sample(
            [p for p in prompts for _ in range(k)], keys, temperature=args.temperature, top_p=args.top_p
        )
        return [(i, outputs[j * k : (j + 1) * k]) for j, i in enumerate(indices)]

    def progress(results):
        outputs = [o for _, samples in results for o in samples]
        totals["rows"] += len(outputs)
        totals["tokens"] += sum(o.stats["tokens"] for o in outputs)
        job.bar.set_postfix(tok_s=f"{totals['tokens'] / (time.perf_counter() - job.start):.1f}")
        job.bar.update(len(results))

    def build(rec, turns):
        if k == 1:
            return generated_output(args.format, rec, [samples[0].text for _, samples in turns], model_id)
        ((i, samples),) = turns  # jsonl: one turn
        return sampled_output(rec, [o.text for o in samples], [[args.seed, i, 0, s] for s in range(k)])

    def history(_rec, _turn, result):
        return result[1][0].text

    # A window's records go to the decoder together: its slots decode them with row refill (a finished
    # row's slot takes the next row), or one batch when the window is no larger than --batch-size.
    summary = cli.finish_decode(
        job, args, decode, history, build, progress, batch_size=max(args.sort_window, args.batch_size)
    )
    elapsed = time.perf_counter() - job.start
    return summary | {
        "turns_generated": totals["rows"],
        "tokens": totals["tokens"],
        "seconds": round(elapsed, 1),
        "tokens_per_s": round(totals["tokens"] / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    return cli.main(parse_args(argv), run, "generate", cli.print_summary)


if __name__ == "__main__":
    sys.exit(main())
