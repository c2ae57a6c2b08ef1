"""How exact is Jacobi refinement in bfloat16? Token agreement of bf16 Jacobi with bf16 AR greedy and with
fp32 greedy, on the embedded SmolLM2 (or `--model`).

    python -m bench.bf16_agreement [--model SPEC] [--prompts 32] [--max-new-tokens 64] [--block-size 16] [--results DIR]

In exact arithmetic Jacobi decoding returns the greedy answer token for token (decoding/jacobi.py). In
bf16 a W-token pass and a one-token AR step run the same weights through matmuls of other shapes, so
their logits round differently, and where two tokens are nearly tied the argmax can flip; from that
token on the answers differ. Drafts: the fp32 model's own temperature-0.7 answers to the first
`--prompts` prompts of bench/data/self_distill_prompts.jsonl (every 4th: the four question templates
alike). Per pair of decoders: answers identical, and the mean fraction of the reference answer's tokens
before the first difference (1.0 when identical). fp32 Jacobi against fp32 AR is the control (1.0).
Writes bench/results/bf16_agreement.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from bench import common

PROMPTS = Path(__file__).resolve().parent / "data" / "self_distill_prompts.jsonl"
BATCH = 8


def agreement(answers: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(fraction identical, mean fraction of each reference answer before the first difference)."""
    identical, prefix = 0, 0.0
    for a, r in zip(answers, reference):
        identical += a == r
        same = next((k for k, (x, y) in enumerate(zip(a, r)) if x != y), min(len(a), len(r)))
        prefix += 1.0 if a == r else same / max(len(r), 1)
    return identical / len(reference), prefix / len(reference)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.bf16_agreement", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=None, help="anything diffpo_jax.sources.load_model accepts (default: embedded SmolLM2)"
    )
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    common.add_results_option(ap)
    args = ap.parse_args(argv)
    import jax

    from diffpo_jax.decoding.batching import Decoder
    from diffpo_jax.sources import load_model

    records = [json.loads(line) for line in PROMPTS.read_text().splitlines()][::4][: args.prompts]
    answers, drafts = {}, None
    for dtype in ("float32", "bfloat16"):
        decoder = Decoder(load_model(args.model, dtype=dtype), batch_size=BATCH, max_new_tokens=args.max_new_tokens)
        prompts = [decoder.prompt_tokens(r["prompt"]) for r in records]
        batches = range(0, len(prompts), BATCH)
        if drafts is None:
            keys = jax.random.split(jax.random.key(0), len(prompts))
            drafts = [
                o.tokens + [decoder.end_of_turn]
                for lo in batches
                for o in decoder.sample(prompts[lo : lo + BATCH], keys[lo : lo + BATCH], temperature=0.7, top_p=1.0)
            ]
        answers[f"{dtype} AR"] = [
            o.tokens
            for lo in batches
            for o in decoder.sample(
                prompts[lo : lo + BATCH],
                jax.random.split(jax.random.key(0), len(prompts[lo : lo + BATCH])),
                temperature=0.0,
                top_p=1.0,
            )
        ]
        answers[f"{dtype} Jacobi"] = [
            o.tokens
            for lo in batches
            for o in decoder.refine(prompts[lo : lo + BATCH], drafts[lo : lo + BATCH], block_size=args.block_size)
        ]
        print(f"{dtype}: done", flush=True)
    pairs = [
        ("float32 Jacobi", "float32 AR"),
        ("bfloat16 Jacobi", "bfloat16 AR"),
        ("bfloat16 AR", "float32 AR"),
        ("bfloat16 Jacobi", "float32 AR"),
    ]
    rows = [[a, b, *agreement(answers[a], answers[b])] for a, b in pairs]
    body = "\n".join(
        [
            common.header(
                "bf16 agreement of Jacobi refinement", "bf16_agreement", "bench.bf16_agreement", argv, common.machine()
            ),
            f"{args.model or 'SmolLM2-135M-Instruct (embedded)'}, {len(records)} prompts, drafts = its fp32 temperature-0.7 answers, max_new_tokens "
            f"{args.max_new_tokens}, block {args.block_size}, batch {BATCH}.\n",
            common.table(["decoder", "against", "answers identical", "tokens before the first difference"], rows),
        ]
    )
    common.report(args.results, "bf16_agreement", body)
    return {f"{a} vs {b}": (i, p) for a, b, i, p in rows}


if __name__ == "__main__":
    main()
