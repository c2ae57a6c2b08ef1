"""python -m diffpo_jax.verify: compare diffpo-jax logits with transformers (PyTorch) on the same weights.

Reward models (*ForSequenceClassification) compare their scores instead: each prompt + response through
the RM's chat template, ours as one padded batch (reward/scorer.py), transformers' one row at a time;
fp32 passes when every score is within --atol.

Loads --model in diffpo-jax and in transformers (fp32 reference), runs both on chat-templated prompts
(each followed by a reference answer, so positions go past the prompt), and prints per prompt the max
abs logit difference, mean KL(reference || ours) and top-1 agreement. The diffpo-jax side runs all
prompts as one right-padded batch, so padding is exercised too. Exits 1 when outside tolerance:
  float32: max abs diff <= --atol (default 1e-3) and top-1 agreement 100%
  bfloat16: top-1 agreement >= 95% (the max abs diff is reported, not checked): bf16 rounding flips a
  few near-tie argmaxes, and which ones moves with any reordering of a matmul's sums
  (bench/bf16_agreement.py measures it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from diffpo_jax.chat import prompt_ids, response_ids
from diffpo_jax.jsonl import read_jsonl

BUILTIN = [
    ("What is the capital of France?", "The capital of France is Paris, which is also its largest city."),
    ("Write a haiku about the sea.", "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."),
    (
        "Explain what a hash table is in two sentences.",
        "A hash table stores key-value pairs in an array, using a hash function to turn each key into an index. "
        "Lookups, inserts and deletes take constant time on average.",
    ),
    (
        "Give me three tips for sleeping better.",
        "1. Keep a regular schedule.\n2. Avoid screens an hour before bed.\n3. Keep your bedroom cool and dark.",
    ),
    (
        "How do I reverse a list in Python?",
        "Use `my_list.reverse()` to reverse it in place, or `my_list[::-1]` for a reversed copy.",
    ),
]
DEFAULT_ATOL = {"float32": 1e-3, "bfloat16": float("inf")}
DEFAULT_MIN_TOP1 = {"float32": 1.0, "bfloat16": 0.95}


def read_prompts(path: Path) -> list[tuple[str, str]]:
    rows = []
    for where, rec in read_jsonl(path):  # JsonlError is a ValueError: main reports it
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise ValueError(f"{where}: field 'prompt' (a string) is missing")
        rows.append((rec["prompt"], rec.get("response", "")))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def token_rows(tokenizer, prompts: list[tuple[str, str]], vocab_size: int) -> list[list[int]]:
    if tokenizer is None:  # weights-only folder: fixed random ids of varied lengths
        rng = np.random.default_rng(0)
        return [list(rng.integers(0, vocab_size, n)) for n in (17, 40, 64, 100)]
    return [prompt_ids(tokenizer, p) + response_ids(tokenizer, r) for p, r in prompts]


def compare(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """ours, ref: [T, V] logits of one sequence."""
    ours, ref = ours.astype(np.float64), ref.astype(np.float64)
    log_p = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    log_q = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return {
        "max_abs_diff": float(np.abs(ours - ref).max()),
        "mean_kl": float(kl.mean()),
        "top1": float(np.mean(ours.argmax(-1) == ref.argmax(-1))),
    }


def jax_logits(loaded, rows: list[list[int]]) -> list[np.ndarray]:
    import jax.numpy as jnp
    from flax import nnx

    length = max(map(len, rows))
    tokens = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    logits, _ = nnx.jit(lambda m, t, p, k: m(t, p, k))(
        loaded.model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)
    )
    logits = np.asarray(logits.astype(jnp.float32))
    return [logits[i, : len(r)] for i, r in enumerate(rows)]


def load_reference(loaded):
    """transformers' fp32 model over the same weights (eager attention: Gemma-2's soft-cap needs it)."""
    if not loaded.reference:
        raise ValueError(
            f"{loaded.source}: an Orbax checkpoint, which transformers cannot read: export it first "
            f"(python -m diffpo_jax.convert to-hf {loaded.source} OUT) and verify OUT"
        )
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        **loaded.reference, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def reference_logits(reference, rows: list[list[int]]) -> list[np.ndarray]:
    """Each sequence alone, unpadded: the plainest possible reference."""
    import torch

    with torch.no_grad():
        return [reference(torch.tensor([r])).logits[0].float().numpy() for r in rows]


def check(loaded, reference, prompts: list[tuple[str, str]], atol: float, min_top1: float) -> tuple[list[dict], bool]:
    rows = token_rows(loaded.tokenizer, prompts, loaded.cfg.vocab_size)
    pairs = zip(jax_logits(loaded, rows), reference_logits(reference, rows), rows)
    results = [compare(ours, ref) | {"tokens": len(r)} for ours, ref, r in pairs]
    return results, all(r["max_abs_diff"] <= atol and r["top1"] >= min_top1 for r in results)


def check_reward(loaded, prompts: list[tuple[str, str]], atol: float) -> tuple[list[dict], bool]:
    """Our reward scores against transformers' AutoModelForSequenceClassification on the same weights."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from diffpo_jax.reward.scorer import Scorer

    if loaded.head.kind == "armorm":
        raise ValueError(
            f"{loaded.source}: ArmoRM's hub modeling code does not import in transformers 5, so there is "
            "no reference to compare with here (tests/armorm_reference.py is the test suite's)"
        )
    scorer = Scorer(loaded, batch_size=len(prompts))
    if loaded.tokenizer is None:
        rows = [(ids, 0) for ids in token_rows(None, prompts, loaded.cfg.vocab_size)]
    else:
        rows = [scorer.row(p, r) for p, r in prompts]
    reference = AutoModelForSequenceClassification.from_pretrained(
        **loaded.reference, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    results = []
    with torch.no_grad():
        for (ids, _), s in zip(rows, scorer.score(rows)):
            ref = reference(torch.tensor([ids])).logits[0].numpy()
            got = np.asarray(s.logits if s.logits is not None else [s.score])
            results.append(
                {
                    "tokens": len(ids),
                    "score": float(got[0]),
                    "reference": float(ref[0]),
                    "max_abs_diff": float(np.abs(got - ref).max()),
                }
            )
    return results, all(r["max_abs_diff"] <= atol for r in results)


def reward_main(args, atol: float) -> int:
    from diffpo_jax.reward.loading import load_reward_model

    prompts = read_prompts(args.prompts) if args.prompts else BUILTIN
    results, ok = check_reward(load_reward_model(args.model, dtype=args.dtype), prompts, atol)
    print(f"{'#':>3} {'tokens':>6} {'score':>10} {'reference':>10} {'max_abs_diff':>13}")
    for i, r in enumerate(results):
        print(f"{i:>3} {r['tokens']:>6} {r['score']:>10.4f} {r['reference']:>10.4f} {r['max_abs_diff']:>13.3e}")
    print(f"{'PASS' if ok else 'FAIL'}: reward model, {args.dtype}, tolerance max_abs_diff <= {atol:g}")
    return 0 if ok else 1


def is_reward_model(spec: str | None) -> bool:
    from diffpo_jax.reward.model import HeadConfig, NotARewardModelError
    from diffpo_jax.sources import ModelSourceError, open_checkpoint

    try:
        HeadConfig.from_hf(open_checkpoint(spec)[0].hf_config())
    except (NotARewardModelError, ModelSourceError):  # not one, or not loadable: the LM path says why
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffpo_jax.verify", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        default=None,
        help="hub id, HF folder, .gguf file (not an Orbax dir: export it first); default: the embedded SmolLM2",
    )
    ap.add_argument("--prompts", type=Path, help="JSONL, one {'prompt': str, 'response'?: str} per line")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--atol", type=float, help="max abs logit difference allowed (default: 1e-3 in float32)")
    ap.add_argument("--min-top1", type=float, help="top-1 agreement required (default: 1.0 float32, 0.98 bfloat16)")
    args = ap.parse_args(argv)
    from diffpo_jax.sources import ModelSourceError, load_model

    atol = DEFAULT_ATOL[args.dtype] if args.atol is None else args.atol
    min_top1 = DEFAULT_MIN_TOP1[args.dtype] if args.min_top1 is None else args.min_top1
    try:
        if args.model and is_reward_model(args.model):
            return reward_main(args, atol)
        prompts = read_prompts(args.prompts) if args.prompts else BUILTIN
        loaded = load_model(args.model, dtype=args.dtype)
        results, ok = check(loaded, load_reference(loaded), prompts, atol, min_top1)
    except (ModelSourceError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'#':>3} {'tokens':>6} {'max_abs_diff':>13} {'mean_kl':>10} {'top1':>7}")
    for i, r in enumerate(results):
        print(f"{i:>3} {r['tokens']:>6} {r['max_abs_diff']:>13.3e} {r['mean_kl']:>10.2e} {r['top1']:>7.2%}")
    print(f"{'PASS' if ok else 'FAIL'}: {args.dtype}, tolerance max_abs_diff <= {atol:g}, top-1 >= {min_top1:.0%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
