"""Reward scoring speed: diffpo-jax's `Scorer` against transformers' sequence classifier on the same weights.

  python -m bench.score_speed [--model SPEC] [--answers 64] [--batch-size 8] [--torch-threads N]
      [--results DIR]

The reward model is --model's decoder (default: the embedded SmolLM2-135M) with a random `score` head
(Linear(hidden -> 1), seed 0), saved as an HF *ForSequenceClassification folder, so both sides load the
same file. Inputs: the prompts of examples/trajectories.jsonl with answers of 1..8 of its responses
joined (varied lengths), chat-templated by the RM's tokenizer. Both sides score the same rows in the
same length-sorted batches of --batch-size, fp32: ours right-padded to its length buckets (reward/scorer.py; one compile
per bucket, reported separately as the first pass minus the steady pass), transformers right-padded to
the batch's longest row with an attention mask. Scores must agree within 1e-3. tokens/s counts real
(unpadded) tokens; the steady figure is the best of --repeats passes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench import common

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "trajectories.jsonl"
TOLERANCE = 1e-3


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.score_speed", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        default=None,
        help="the backbone: a causal LM with a tokenizer that transformers loads (default: embedded SmolLM2)",
    )
    ap.add_argument("--answers", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="steady passes (best is reported)")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="default: all cores")
    common.add_results_option(ap)
    return ap.parse_args(argv)


def answers(n: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    responses = [r for row in rows for r in row["all_generated_responses"]]
    return [
        (rows[i % len(rows)]["prompt"], " ".join(responses[(i * 7 + k) % len(responses)] for k in range(1 + i % 8)))
        for i in range(n)
    ]


def save_reward_model(loaded, folder: Path):
    """The causal LM's decoder + a random score head, as an HF sequence classifier (returned, in torch)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    lm = AutoModelForCausalLM.from_pretrained(**loaded.reference, dtype=torch.float32)
    pad = loaded.tokenizer.pad_token_id
    config = AutoConfig.for_model(
        **(
            lm.config.to_dict()
            | {"num_labels": 1, "pad_token_id": pad, "id2label": {0: "LABEL_0"}, "label2id": {"LABEL_0": 0}}
        )
    )
    config.architectures = [type(lm).__name__.replace("ForCausalLM", "ForSequenceClassification")]
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).eval()
    rm.model.load_state_dict(lm.model.state_dict())
    with torch.no_grad():
        rm.score.weight.normal_(0.0, 0.05)
    rm.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return rm


def batches(rows, size: int) -> list[list[int]]:
    """Row indices, sorted by length, in batches of `size` (the order both sides score in)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    return [order[b : b + size] for b in range(0, len(order), size)]


def torch_scores(rm, rows: list[tuple[list[int], int]], batch: int, pad: int) -> tuple[np.ndarray, float]:
    import torch

    out = np.zeros(len(rows), np.float32)
    start = time.perf_counter()
    with torch.no_grad():
        for idx in batches(rows, batch):
            ids_rows = [rows[i][0] for i in idx]
            width = max(map(len, ids_rows))
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for j, r in enumerate(ids_rows):
                ids[j, : len(r)], mask[j, : len(r)] = torch.tensor(r), 1
            out[idx] = rm(ids, attention_mask=mask).logits[:, 0].numpy()
    return out, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.torch_threads)
    from diffpo_jax.reward.loading import load_reward_model
    from diffpo_jax.reward.scorer import Scorer, length_bucket
    from diffpo_jax.sources import load_model

    machine = common.machine()
    base = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        reference = save_reward_model(base, Path(tmp))
        loaded = load_reward_model(tmp)
    scorer = Scorer(loaded, batch_size=args.batch_size)
    rows = [scorer.row(p, a) for p, a in answers(args.answers)]
    tokens = sum(len(ids) for ids, _ in rows)

    def ours():
        start = time.perf_counter()
        scores = scorer.score(rows)
        return np.asarray([s.score for s in scores]), time.perf_counter() - start

    got, first = ours()
    steady_ours = min(ours()[1] for _ in range(args.repeats))
    torch_scores(reference, rows[: args.batch_size], args.batch_size, scorer.pad_id)  # warm-up
    runs = [torch_scores(reference, rows, args.batch_size, scorer.pad_id) for _ in range(args.repeats)]
    expect, steady_torch = runs[0][0], min(t for _, t in runs)
    diff = float(np.abs(got - expect).max())
    if diff > TOLERANCE:
        raise SystemExit(f"scores differ from transformers' by {diff:.3g} (> {TOLERANCE})")
    buckets = sorted({length_bucket(max(len(rows[i][0]) for i in chunk)) for chunk in batches(rows, scorer.batch_size)})
    table = common.table(
        ["method", "answers", "tokens", "seconds", "tokens/s", "vs transformers"],
        [
            ["diffpo-jax Scorer", len(rows), tokens, steady_ours, tokens / steady_ours, steady_torch / steady_ours],
            ["transformers sequence classifier", len(rows), tokens, steady_torch, tokens / steady_torch, 1.0],
        ],
    )
    body = (
        common.header("Reward scoring speed", "score_speed", "bench.score_speed", argv, machine)
        + f"- reward model: {base.source} decoder + random score head; batch {args.batch_size}, fp32, "
        f"length buckets {', '.join(map(str, buckets))} (ours; transformers pads to each batch's longest row)\n"
        + f"- scores equal: max abs difference {diff:.2e}\n"
        + f"- diffpo-jax compile (first pass - steady pass): {first - steady_ours:.1f} s\n\n"
        + table
        + "\n"
    )
    common.report(args.results, "score_speed", body)
    return {"max_abs_diff": diff, "ours_s": steady_ours, "torch_s": steady_torch, "tokens": tokens}


if __name__ == "__main__":
    main()
