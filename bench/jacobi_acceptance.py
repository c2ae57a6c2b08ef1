"""Where the Jacobi passes go: tokens committed per pass when a model refines its drafts (per-position acceptance).

    python -m bench.jacobi_acceptance --work WORK --runs RUN_DIR [RUN_DIR ...] [--train-prompts N]
        [--max-new-tokens 32] [--section NAME]

For the untrained SmolLM2-135M-Instruct and each trained run of bench/self_distill.py (WORK is its
--work folder): the held-out prompts' temperature-0.7 samples and as many training prompts' samples
(bench.self_distill.held_and_seen), refined by the decoder `refine` uses (batch 8, block 16, realign on)
with the trajectory kept (the state after each pass). After pass k the answer's first c_k tokens are
settled: c_k = the largest j such that this state's text and every later one's start with the text of
the final answer's first j tokens (the last pass settles the whole answer, stop token included); pass k
committed c_k - c_{k-1}.
A pass always commits the token after the settled prefix (its context is right); every further token is
one predicted right although the context holds a wrong guess, which is what the consistency loss trains.
So per model and draft set: tokens the first pass commits (the draft's agreeing prefix, realigned) and,
over the later passes, the share committing >= 2, >= 3, >= 4 tokens and their mean: the acceptance at
offsets 1, 2, 3 past the frontier.
Writes bench/results/NAME.md (NAME: `--section`, default jacobi-acceptance).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import add_results_option, header, machine, report, table
from bench.self_distill import BATCH, BLOCK, held_and_seen


def settled(tokenizer, ids: list[int], total: int, states: list[str]) -> list[int]:
    """c_k per pass (module doc): answer tokens settled after each state; the last pass settles `total`."""
    prefixes = [tokenizer.decode(ids[:j], skip_special_tokens=True) for j in range(len(ids) + 1)]
    agree = [max(j for j, text in enumerate(prefixes) if state.startswith(text)) for state in states[:-1]] + [total]
    return [min(agree[k:]) for k in range(len(agree))]  # settled: agrees in this state and every later one


def commits(decoder, rows: list[dict]) -> tuple[list[int], list[int]]:
    """(tokens committed by each row's first pass, tokens committed by every later pass) refining `rows`."""
    first, later = [], []
    for lo in range(0, len(rows), BATCH):
        batch = rows[lo : lo + BATCH]
        outputs = decoder.refine(
            [decoder.prompt_tokens(r["prompt"]) for r in batch],
            [decoder.draft_tokens(r["draft"]) for r in batch],
            block_size=BLOCK,
            trajectory=True,
        )
        for o in outputs:
            c = settled(decoder.tokenizer, o.tokens, o.stats["tokens"], o.stats["trajectory"])
            assert len(c) == o.stats["passes"], (c, o.stats)
            steps = [b - a for a, b in zip([0, *c], c)]
            first.append(steps[0])
            later += steps[1:]
    return first, later


def summary(first: list[int], later: list[int]) -> list:
    share = [sum(s >= k for s in later) / max(len(later), 1) for k in (2, 3, 4)]
    passes, tokens = len(first) + len(later), sum(first) + sum(later)
    return [sum(first) / len(first), len(later), *share, sum(later) / max(len(later), 1), passes / tokens]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.jacobi_acceptance", description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="bench/self_distill.py's --work folder")
    ap.add_argument(
        "--runs", type=Path, nargs="+", required=True, help="trained run dirs (the first one's held-out ids)"
    )
    ap.add_argument("--train-prompts", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    add_results_option(ap)
    ap.add_argument(
        "--section", default="jacobi-acceptance", help="the run's name: its results file (default: %(default)s)"
    )
    args = ap.parse_args(argv)
    from diffpo_jax.decoding.batching import Decoder
    from diffpo_jax.sources import load_model

    line = machine()
    held, seen = held_and_seen(args.work, args.runs[0], args.train_prompts)
    rows = []
    for name, source in {"untrained": None, **{d.name: str(d) for d in args.runs}}.items():
        decoder = Decoder(load_model(source), batch_size=BATCH, max_new_tokens=args.max_new_tokens)
        for label, drafts in (("held-out", held), ("training prompts", seen)):
            rows.append([name, f"{label} ({len(drafts)})", *summary(*commits(decoder, drafts))])
            print(rows[-1], flush=True)
    body = header("Jacobi acceptance per pass", args.section, "bench.jacobi_acceptance", argv, line)
    body += (
        "\nTemperature-0.7 samples refined from the draft (batch 8, block 16, realign on); a pass commits the "
        "token after the settled prefix for free, each further one is predicted right after a wrong guess.\n\n"
    )
    body += table(
        [
            "model",
            "drafts",
            "first pass: tokens",
            "later passes",
            ">= 2 tokens",
            ">= 3",
            ">= 4",
            "tokens per later pass",
            "passes/tok",
        ],
        rows,
    )
    report(args.results, args.section, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
