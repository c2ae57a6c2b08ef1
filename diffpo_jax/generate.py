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
streamed and resumed as in `refine`; bad input exits 2 with a one-line message, or with `--on-error skip`
goes out as the input record plus `error` (as in `refine`). `--mesh`, `--dtype` and several processes
as in `refine`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffpo_jax import distributed, record_loop
from diffpo_jax.data.formats import (
    FORMATS,
    FormatError,
    check_output_path,
    generated_output,
    read_records,
    sampled_output,
)
from diffpo_jax.decoding import devices
from diffpo_jax.decoding import plan as decode_plan
from diffpo_jax.distributed import DistributedError
from diffpo_jax.paths import as_path
from diffpo_jax.sources import ModelSourceError

# the options a resumed run must share with the run that wrote OUTPUT.partial (not --batch-size: the
# outputs do not depend on it)
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m diffpo_jax.generate", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        default=None,
        help="base model: hub id, HF folder, .gguf, Orbax dir, PEFT adapter folder; default: embedded SmolLM2",
    )
    ap.add_argument(
        "--base", help="the base model of a PEFT adapter --model (default: the one its adapter_config.json names)"
    )
    ap.add_argument("--input", type=as_path, help="required, except with --plan")
    ap.add_argument("--output", type=as_path, help="required, except with --plan")
    ap.add_argument("--format", choices=FORMATS, default="jsonl")
    ap.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per decode call")
    ap.add_argument("--num-samples", type=int, default=1, help="answers per prompt (> 1: jsonl `samples`)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-id", help="generator / model_id written to alpaca_eval and mt_bench records")
    devices.add_arguments(ap)
    record_loop.add_arguments(
        ap,
        "decode N records at a time through --batch-size slots with row refill (a finished "
        "row's slot takes the next record), written in input order (default 256; <= "
        "--batch-size: batches of consecutive records, each until its longest answer is done)",
    )
    ap.add_argument(
        "--overwrite", action="store_true", help="allow --output to be the --input file (replaced at the end)"
    )
    distributed.add_arguments(ap)
    decode_plan.add_arguments(ap)
    args = ap.parse_args(argv)
    if not args.plan and (args.input is None or args.output is None):
        ap.error("--input and --output are required (except with --plan)")
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.num_samples < 1:
        ap.error("--max-new-tokens, --batch-size and --num-samples must be >= 1")
    if args.num_samples > 1 and args.format != "jsonl":
        ap.error("--num-samples > 1 needs --format jsonl (the only format with a `samples` field)")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        ap.error("--temperature must be >= 0 and --top-p in (0, 1]")
    return args


def run(args: argparse.Namespace, loaded=None) -> dict:
    """Generate drafts for args.input into args.output; returns the summary. `loaded`: an already loaded model to use instead of args.model."""
    from tqdm import tqdm

    from diffpo_jax.decoding.batching import Decoder
    from diffpo_jax.sources import load_model

    mesh = devices.decode_mesh(args.mesh, args.base or args.model, args.dtype)
    devices.check_rows(mesh, args.batch_size * args.num_samples)  # before the model loads
    check_output_path(args.input, args.output, args.overwrite)
    records = read_records(args.input, args.format, with_drafts=False)
    options = record_loop.run_options(args, RESUME_OPTIONS)
    out = record_loop.open_output(args.output, args.format, records, options)
    loaded = loaded or load_model(args.model, base=args.base, dtype=options["dtype"], mesh=mesh)
    model_id = args.model_id or Path(loaded.source).stem
    k = args.num_samples
    decoder = Decoder(loaded, batch_size=args.batch_size * k, max_new_tokens=args.max_new_tokens, mesh=mesh)
    totals = {"rows": 0, "tokens": 0}
    # the bar counts this process's decoded turns (records come out a window at a time)
    bar = tqdm(total=sum(records[i].num_turns for i in out.todo), unit="turn", desc="generate", dynamic_ncols=True)
    start = time.perf_counter()

    def decode(indices: list[int], turn: int, _recs, prompts):
        """Per record: (its index, its k Outputs), the k samples of a prompt in adjacent rows."""
        keys = record_loop.sample_keys(args.seed, indices, turn, k)
        outputs = decoder.sample(
            [p for p in prompts for _ in range(k)], keys, temperature=args.temperature, top_p=args.top_p
        )
        return [(i, outputs[j * k : (j + 1) * k]) for j, i in enumerate(indices)]

    def progress(results):
        outputs = [o for _, samples in results for o in samples]
        totals["rows"] += len(outputs)
        totals["tokens"] += sum(o.stats["tokens"] for o in outputs)
        bar.set_postfix(tok_s=f"{totals['tokens'] / (time.perf_counter() - start):.1f}")
        bar.update(len(results))

    def build(rec, turns):
        if k == 1:
            return generated_output(args.format, rec, [samples[0].text for _, samples in turns], model_id)
        ((i, samples),) = turns  # jsonl: one turn
        return sampled_output(rec, [o.text for o in samples], [[args.seed, i, 0, s] for s in range(k)])

    def history(_rec, _turn, result):
        return result[1][0].text

    # A window's records go to the decoder together: its slots decode them with row refill (a finished
    # row's slot takes the next row), or one batch when the window is no larger than --batch-size.
    skipped = record_loop.decode_records(
        decoder,
        records,
        out,
        decode,
        history,
        build,
        progress,
        batch_size=max(args.sort_window, args.batch_size),
        on_error=args.on_error,
        window=args.sort_window,
    )
    bar.update(bar.total - bar.n)  # turns of skipped records
    bar.close()
    out.finish()
    elapsed = time.perf_counter() - start
    return {
        "devices": devices.describe(mesh),
        "records": len(records),
        "skipped": skipped,
        "turns_generated": totals["rows"],
        "tokens": totals["tokens"],
        "seconds": round(elapsed, 1),
        "tokens_per_s": round(totals["tokens"] / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan:
        return decode_plan.main(args, "generate")
    try:
        distributed.initialize_from_args(args)
        summary = run(args)
    except (FormatError, ModelSourceError, devices.MeshError, DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    if distributed.is_main_process():
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
