"""python -m diffpo_jax.score: reward-model scores for the answers generate / refine write, or for trajectories.

  python -m diffpo_jax.score (--model RM | --reward MODULE:FUNCTION) --input FILE --output FILE
      [--format jsonl|alpaca_eval|mt_bench|trajectories] [--fields draft,refined] [--questions question.jsonl]
      [--prompt-field prompt] [--responses-field all_generated_responses] [--scores-field all_rm_scores]
      [--best-of-n] [--label 0] [--batch-size 8] [--dtype float32|bfloat16] [--mesh D,F,T] [--report FILE.md]
      [--overwrite]

RM: an HF folder or hub id of a Llama / Gemma-2 *ForSequenceClassification or of ArmoRM
(reward/model.py); its own tokenizer and chat template build the input (reward/inputs.py). Or
`--reward`: a Python reward function, `package.module:function` or `path/to/file.py:function`, called
TRL-style as function(prompts=[...], completions=[...]) -> one float per answer (reward/functions.py;
examples/rewards/vader.py is one); --batch-size answers per call, no devices. What each
format reads and writes: reward/records.py. The summary prints each field's mean score and, when two
one-answer fields are scored, the paired win rate of the second over the first with a bootstrap 95%
interval (`--report` writes it as a Markdown table). Results stream to OUTPUT.partial and resume, and a
finished OUTPUT is kept, as in `refine`; OUTPUT appears by rename at the end. Devices, dtype and several
processes as in `refine` (decoding/devices.py: `--mesh`, `--dtype`; each process scores its share of the
records, process 0 writes OUTPUT). Bad input exits 2 with a one-line message naming the file, record and field.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from diffpo_jax import distributed
from diffpo_jax.decoding import devices
from diffpo_jax.paths import as_path
from diffpo_jax.records import cli
from diffpo_jax.records.formats import FormatError
from diffpo_jax.records.output import check_output_path, open_output
from diffpo_jax.reward.functions import RewardFunctionError
from diffpo_jax.reward.records import SCORE_FORMATS

# the options a resumed run (or a rerun on a finished OUTPUT) must share with the run that wrote it
RESUME_OPTIONS = (
    "model",
    "reward",
    "format",
    "fields",
    "questions",  # by content (cli.run_options)
    "prompt_field",
    "responses_field",
    "scores_field",
    "best_of_n",
    "label",
    "dtype",
)
# the options that cannot change OUTPUT (records/cli.py); every other option is in RESUME_OPTIONS
NEUTRAL_OPTIONS = cli.NEUTRAL_OPTIONS + (
    "batch_size",  # each answer is scored alone (padding masked)
    "report",  # writes the summary to its own file
    "show",  # prints records of the finished output
)
RECORDS_PER_CHUNK = 16  # batches of rows scored between appends to OUTPUT.partial


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m diffpo_jax.score", description=__doc__.split("\n")[0])
    scorer = ap.add_mutually_exclusive_group(required=True)
    scorer.add_argument("--model", help="reward model: HF folder or hub id")
    scorer.add_argument("--reward", metavar="MODULE:FUNCTION", help="a Python reward function (module or file.py path)")
    ap.add_argument("--input", type=as_path, required=True)
    ap.add_argument("--output", type=as_path, required=True)
    ap.add_argument("--format", choices=SCORE_FORMATS, default="jsonl")
    ap.add_argument("--fields", help="comma-separated answer fields (default: the format's answer fields present)")
    ap.add_argument("--questions", type=as_path, help="mt_bench: FastChat question.jsonl")
    ap.add_argument("--prompt-field", default="prompt", help="trajectories: the prompt field")
    ap.add_argument("--responses-field", default="all_generated_responses", help="trajectories: the responses list")
    ap.add_argument("--scores-field", default="all_rm_scores", help="trajectories: the scores list written")
    ap.add_argument("--best-of-n", action="store_true", help="jsonl, one list field: keep its best-scored entry")
    ap.add_argument("--label", type=int, default=0, help="classifiers with several labels: the logit that is the score")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--report", type=as_path, help="write the summary as a Markdown table")
    ap.add_argument(
        "--show",
        type=int,
        default=0,
        metavar="K",
        help="jsonl with two one-answer fields: print the first K records' answers side by side with their scores",
    )
    ap.add_argument("--overwrite", action="store_true", help=cli.OVERWRITE_HELP)
    devices.add_arguments(ap)
    distributed.add_arguments(ap)
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    if args.best_of_n and args.format != "jsonl":
        ap.error("--best-of-n needs --format jsonl")
    if args.show and args.format != "jsonl":
        ap.error("--show needs --format jsonl")
    return args


def run(args: argparse.Namespace, loaded=None) -> dict:
    """Score args.input into args.output; returns the summary. `loaded`: an already loaded reward model."""
    from tqdm import tqdm

    from diffpo_jax.reward.functions import FunctionScorer
    from diffpo_jax.reward.inputs import InputError
    from diffpo_jax.reward.loading import load_reward_model
    from diffpo_jax.reward.records import (
        Layout,
        check_best_of_n,
        check_finite,
        default_fields,
        items,
        read_score_records,
        scored_output,
    )
    from diffpo_jax.reward.scorer import Scorer
    from diffpo_jax.reward.summary import summarize

    mesh = devices.decode_mesh(args.mesh, args.model, args.dtype, reward=True)  # sized by the reward model
    check_output_path(args.input, args.output, args.overwrite)
    records = read_score_records(args.input, args.format, args.questions)
    layout = Layout(
        args.format,
        default_fields(args.format, records[0], args.fields),
        args.prompt_field,
        args.responses_field,
        args.scores_field,
    )
    if args.best_of_n:
        check_best_of_n(layout, records)
    per_record = [items(layout, rec) for rec in records]  # every record checked before any work
    options = cli.run_options(args, RESUME_OPTIONS) | {"fields": list(layout.fields)}
    out_fmt = "alpaca_eval" if args.format == "alpaca_eval" else "jsonl"
    out = open_output(args.output, out_fmt, records, options, overwrite=args.overwrite)  # before the model loads
    if args.reward:
        scorer = FunctionScorer(args.reward, batch_size=args.batch_size)
    else:
        loaded = loaded or load_reward_model(args.model, dtype=options["dtype"], mesh=mesh)
        scorer = Scorer(loaded, batch_size=args.batch_size, label=args.label, mesh=mesh)
    rows_by_record = []
    for rec, its in zip(records, per_record):
        rows = []
        for field, prompt, answer in its:
            try:
                rows.append(scorer.row(prompt, answer))
            except InputError as e:
                raise FormatError(f"{rec.where}: field '{field}': {e}") from None
        rows_by_record.append(rows)
    bar = tqdm(total=len(out.todo), unit="rec", desc="score", dynamic_ncols=True)  # this process's records
    start, tokens = time.perf_counter(), 0
    chunk = RECORDS_PER_CHUNK * scorer.batch_size
    for first in range(0, len(out.todo), chunk):
        idx = out.todo[first : first + chunk]
        flat = [row for i in idx for row in rows_by_record[i]]
        try:
            scores = iter(scorer.score(flat))
        except RewardFunctionError as e:  # name the record and field of the row to blame
            i, (field, _, _) = [(i, it) for i in idx for it in per_record[i]][e.row]
            raise FormatError(f"{records[i].where}: field '{field}': {e}") from None
        if not args.reward:
            tokens += sum(len(ids) for ids, _ in flat)
        for i in idx:
            pairs = [(field, next(scores)) for field, _, _ in per_record[i]]
            for field, s in pairs:
                check_finite(records[i], field, s)
            out.append(i, scored_output(layout, records[i], pairs, args.best_of_n))
            bar.update(1)
    bar.close()
    outputs = out.finish()
    elapsed = time.perf_counter() - start
    return (
        summarize(*_collect(layout, records, outputs))
        | {
            "devices": devices.describe(mesh),
            "records": len(records),
            "answers": sum(map(len, per_record)),
            "seconds": round(elapsed, 2),
        }
        | ({} if args.reward else {"tokens_per_s": round(tokens / max(elapsed, 1e-9), 1)})
    )


def _collect(layout, records, outputs) -> tuple[dict[str, list[float]], tuple[str, str] | None]:
    """Scores per field over all output records, and the pair of one-answer fields for the win rate."""
    from diffpo_jax.reward.records import is_list_field

    if layout.fmt == "trajectories":
        return {layout.responses_field: [s for o in outputs for s in o[layout.scores_field]]}, None
    per_field = {f: [] for f in layout.fields}
    for o in outputs:
        for f in layout.fields:
            v = o["scores"][f]
            per_field[f] += v if isinstance(v, list) else [v]
    single = [f for f in layout.fields if not is_list_field(layout, records[0], f)]
    return per_field, (tuple(single) if len(single) == 2 == len(layout.fields) else None)


def show(path, summary: dict, k: int) -> None:
    """The first k records of a scored jsonl file whose two one-answer fields had a win rate: side by side, scored."""
    from diffpo_jax.records.formats import jsonl_records

    if not k or "win_rate" not in summary:
        return
    first, second = summary["win_rate"]["over"], summary["win_rate"]["of"]
    for _, rec in list(jsonl_records(path))[:k]:
        print(f"\n=== {rec.get('id', '')} {rec.get('prompt', '')}".rstrip())
        print(
            cli.side_by_side(
                rec[first],
                rec[second],
                titles=(f"{first} ({rec['scores'][first]:.3f})", f"{second} ({rec['scores'][second]:.3f})"),
            )
        )
    print()


def report(args: argparse.Namespace, summary: dict) -> None:
    """The summary covers every process's records: process 0 prints it (and writes --report)."""
    from diffpo_jax.reward.summary import markdown

    if not distributed.is_main_process():
        return

    show(args.output, summary, args.show)
    for field, s in summary["fields"].items():
        print(f"{field}: mean score {s['mean']:.4f} over {s['n']} answers")
    if "win_rate" in summary:
        w = summary["win_rate"]
        print(f"win rate of {w['of']} over {w['over']}: {w['rate']:.3f} (95% CI {w['ci95'][0]:.3f}-{w['ci95'][1]:.3f})")
    print(
        json.dumps(
            {k: summary[k] for k in ("devices", "records", "answers", "seconds", "tokens_per_s") if k in summary}
        )
    )
    if args.report:
        args.report.write_text(
            markdown(summary, f"Scores of {args.input} by {args.model or args.reward}"), encoding="utf-8"
        )
        print(f"wrote {args.report}")


def main(argv: list[str] | None = None) -> int:
    return cli.main(parse_args(argv), run, None, report)


if __name__ == "__main__":
    sys.exit(main())
