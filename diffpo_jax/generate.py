"""python -m diffpo_jax.generate: draft answers from a base model, in the formats `refine` reads.

  python -m diffpo_jax.generate --input prompts.jsonl --output drafts.jsonl [--model BASE]
      [--format jsonl|alpaca_eval|mt_bench] [--temperature 0.7] [--top-p 1.0] [--max-new-tokens 256]
      [--batch-size 8] [--seed 0] [--model-id NAME] [--dtype float32|bfloat16] [--overwrite]

jsonl adds `draft`; alpaca_eval sets `output` and `generator`; mt_bench reads FastChat question.jsonl
and writes answer records (turn 2 sees the generated turn 1). Sampling is reproducible: batch i draws
with fold_in(PRNGKey(seed), i), so a resumed run gives the same drafts. Output is streamed and resumed
as in `refine`; bad input exits 2 with a one-line message.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffpo_jax.data.formats import FORMATS, FormatError, ResumableOutput, check_output_path, generated_output, read_records
from diffpo_jax.sources import ModelSourceError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m diffpo_jax.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="base model: hub id, HF folder, .gguf, Orbax dir; default: embedded SmolLM2")
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--format", choices=FORMATS, default="jsonl")
    ap.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-id", help="generator / model_id written to alpaca_eval and mt_bench records")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--overwrite", action="store_true", help="allow --output to be the --input file (replaced at the end)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        ap.error("--max-new-tokens and --batch-size must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        ap.error("--temperature must be >= 0 and --top-p in (0, 1]")
    return args


def run(args: argparse.Namespace, loaded=None) -> dict:
    """Generate drafts for args.input into args.output; returns the summary. `loaded`: an already loaded model to use instead of args.model."""
    import jax
    from tqdm import tqdm

    from diffpo_jax.decoding.batching import Decoder, decode_records
    from diffpo_jax.sources import load_model

    check_output_path(args.input, args.output, args.overwrite)
    records = read_records(args.input, args.format, with_drafts=False)
    options = {k: getattr(args, k) for k in ("model", "format", "temperature", "top_p", "max_new_tokens",
                                             "batch_size", "seed", "model_id", "dtype")}  # fmt: skip
    out = ResumableOutput(args.output, args.format, records, options)
    loaded = loaded or load_model(args.model, dtype=args.dtype)
    model_id = args.model_id or Path(loaded.source).stem
    decoder = Decoder(loaded, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    key = jax.random.key(args.seed)
    totals = {"rows": 0, "tokens": 0}
    bar = tqdm(total=len(records), initial=out.done, unit="rec", desc="generate", dynamic_ncols=True)
    start = time.perf_counter()

    def decode(batch: int, turn: int, _recs, prompts):
        return decoder.sample(prompts, jax.random.fold_in(jax.random.fold_in(key, batch), turn),
                              temperature=args.temperature, top_p=args.top_p)  # fmt: skip

    def progress(outputs):
        totals["rows"] += len(outputs)
        totals["tokens"] += sum(o.stats["tokens"] for o in outputs)
        bar.set_postfix(tok_s=f"{totals['tokens'] / (time.perf_counter() - start):.1f}")

    def build(rec, outputs):
        bar.update(1)
        return generated_output(args.format, rec, [o.text for o in outputs], model_id)

    decode_records(decoder, records, out, decode, lambda _r, _t, o: o.text, build, progress)
    bar.close()
    out.finish()
    elapsed = time.perf_counter() - start
    return {
        "records": len(records),
        "turns_generated": totals["rows"],
        "tokens": totals["tokens"],
        "seconds": round(elapsed, 1),
        "tokens_per_s": round(totals["tokens"] / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (FormatError, ModelSourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
