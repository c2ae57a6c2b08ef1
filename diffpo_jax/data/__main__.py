"""`python -m diffpo_jax.data build|distill ...`: build a trajectory dataset.

  build --source SRC [--source SRC ...] --out DIR    scored responses, ranked (data/trajectories.py).
        SRC: a .jsonl/.json or .parquet file, or a hub dataset id ("org/name" or "org/name:split",
        default train)
  distill --prompts FILE --out DIR [--model M] ...   a model's own greedy answers and samples
                                                     (pipelines/self_distill.py)
Prints a summary of the manifest; errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from diffpo_jax.data.trajectories import TrajectoryDataError, build
from diffpo_jax.pipelines import self_distill


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffpo_jax.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="scored responses -> ranked trajectories (array_record + manifest.json)")
    b.add_argument("--source", action="append", required=True, help="file or hub id[:split]; repeat to pool sources")
    b.add_argument("--out", required=True, help="output directory (written to a temporary name, then renamed)")
    b.add_argument("--prompt-field", default="prompt")
    b.add_argument("--responses-field", default="all_generated_responses")
    b.add_argument("--scores-field", default="all_rm_scores")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    self_distill.add_parser(commands)
    args = parser.parse_args(argv)
    try:
        if args.command == "distill":
            manifest = self_distill.run_command(args)
        else:
            manifest = build(
                args.source,
                args.out,
                prompt_field=args.prompt_field,
                responses_field=args.responses_field,
                scores_field=args.scores_field,
                overwrite=args.overwrite,
            )
    except TrajectoryDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, prompts = manifest["dropped_rows"], manifest["dropped_prompts"]
    print(f"{args.out}: {manifest['kept']} prompts, {manifest['responses_per_prompt']['total']} responses")
    for label, dropped in (("rows", rows), ("prompts", prompts)):
        for reason, entry in dropped["reasons"].items():
            if entry["count"]:
                print(f"  dropped {entry['count']} {label}: {reason} (first: {', '.join(entry['first_ids'])})")
    print(
        f"  merged duplicate responses: {manifest['merged_duplicate_responses']},"
        f" prompts whose best score is tied: {manifest['best_score_ties']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
