"""The skeleton the answer-file CLIs share (generate, refine: `decode_arguments`, `start_decode`,
`finish_decode`; score too: `run_options`, `main`): arguments, the run's prologue (mesh, output checks, record
reading, the resumable output, the model), the record loop with its progress bar, and `main` (--plan,
jax.distributed, errors as one line with exit 2, the summary from process 0). Each CLI keeps only what is its
own: its options, its decode call, what it writes per record and its summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

from diffpo_jax import distributed
from diffpo_jax.decoding import devices
from diffpo_jax.decoding import plan as decode_plan
from diffpo_jax.distributed import DistributedError
from diffpo_jax.paths import as_path
from diffpo_jax.records.formats import FORMATS, FormatError, Record, read_records
from diffpo_jax.records.loop import ON_ERROR, decode_records
from diffpo_jax.records.output import OutputComplete, ResumableOutput, check_output_path, content_digest, open_output
from diffpo_jax.reward.functions import RewardFunctionError
from diffpo_jax.sources import ModelSourceError

ERRORS = (FormatError, ModelSourceError, devices.MeshError, DistributedError, RewardFunctionError)  # exit 2

OVERWRITE_HELP = (
    "replace an existing --output (also the --input file itself), redoing it, and discard partial files of "
    "other options or input; without it the same command on a finished output says 'already complete', "
    "and an output of other options or input is refused"
)

# The options of every answer-file CLI that cannot change what --output holds: a run that differs only in
# these resumes, or is 'already complete'. Each CLI's RESUME_OPTIONS plus its own such list must name
# every option of its parser (tests/test_records.py walks them), so a new option is placed knowingly.
NEUTRAL_OPTIONS = (
    "help",
    "input",  # checked by content: each record's fingerprint (records/output.py), not by name
    "output",  # the file itself
    "overwrite",  # whether an existing output may be replaced
    "mesh",  # where rows run, not what they compute (tests: the same bytes on 1 or 8 devices); resumable on any
    "coordinator",  # processes: each takes a share of the same records; a rerun resumes with any count
    "num_processes",
    "process_id",
)
# generate / refine also: scheduling and --plan (which prints a plan and writes nothing)
DECODE_NEUTRAL_OPTIONS = NEUTRAL_OPTIONS + (
    "sort_window",  # which records share a decoder call: rows are independent, sampled by input index
    "plan",
    "device_memory",
    "prompt_len",
)


def decode_arguments(ap: argparse.ArgumentParser, *, model_help: str, model_default: str | None, window_help: str):
    """The arguments generate and refine share; the CLI adds its own between `ap`'s creation and this call."""
    ap.add_argument("--model", default=model_default, help=model_help)
    ap.add_argument(
        "--base", help="the base model of a PEFT adapter --model (default: the one its adapter_config.json names)"
    )
    ap.add_argument("--input", type=as_path, help="required, except with --plan")
    ap.add_argument("--output", type=as_path, help="required, except with --plan")
    ap.add_argument("--format", choices=FORMATS, default="jsonl")
    devices.add_arguments(ap)
    ap.add_argument("--sort-window", type=int, default=256, metavar="N", help=window_help)
    ap.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="stop",
        help="a record that cannot be decoded (prompt past the context): stop with its line (default), "
        "or write it out with an `error` field and go on",
    )
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    distributed.add_arguments(ap)
    decode_plan.add_arguments(ap)


def check_decode_arguments(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.plan and (args.input is None or args.output is None):
        ap.error("--input and --output are required (except with --plan)")


def run_options(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The options `names` of a CLI run, which a resumed run must share, with the dtype resolved
    (devices.default_dtype: call it after jax.distributed starts, as it asks the backend) and --questions
    by its content (call it after the records were read: a missing file is a FormatError there)."""

    def value(name):
        if name == "dtype":
            return devices.default_dtype(args.dtype)
        if name == "questions" and args.questions is not None:
            return content_digest(args.questions)
        return getattr(args, name)

    return {k: value(k) for k in names}


@dataclasses.dataclass
class DecodeRun:
    """What `start_decode` set up for a generate / refine run."""

    mesh: Any
    records: list[Record]
    out: ResumableOutput
    loaded: Any  # sources.LoadedModel
    decoder: Any  # decoding.batching.Decoder
    bar: Any  # tqdm over this process's turns
    start: float


def start_decode(
    args: argparse.Namespace,
    kind: str,
    *,
    rows: int,
    resume_options: tuple[str, ...],
    with_drafts: bool,
    questions=None,
    loaded=None,
) -> DecodeRun:
    """The prologue of a decode run: the mesh (checked against `rows`, the decoder's batch, before the model
    loads), the output path, every input record, the resumable output (its options `resume_options`), the
    model (`loaded`, or args.model on args.base) and a Decoder of `rows` rows; the progress bar counts this
    process's turns (records come out a window at a time)."""
    from tqdm import tqdm

    from diffpo_jax.decoding.batching import Decoder
    from diffpo_jax.sources import load_model

    mesh = devices.decode_mesh(args.mesh, args.base or args.model, args.dtype)
    devices.check_rows(mesh, rows)
    check_output_path(args.input, args.output, args.overwrite)
    records = read_records(args.input, args.format, with_drafts=with_drafts, questions=questions)
    options = run_options(args, resume_options)
    out = open_output(args.output, args.format, records, options, overwrite=args.overwrite)
    loaded = loaded or load_model(args.model, base=args.base, dtype=options["dtype"], mesh=mesh)
    decoder = Decoder(loaded, batch_size=rows, max_new_tokens=args.max_new_tokens, mesh=mesh)
    bar = tqdm(total=sum(records[i].num_turns for i in out.todo), unit="turn", desc=kind, dynamic_ncols=True)
    return DecodeRun(mesh, records, out, loaded, decoder, bar, time.perf_counter())


def finish_decode(
    run: DecodeRun, args: argparse.Namespace, decode, history, build, progress, *, batch_size: int
) -> dict:
    """The record loop over `run` (records/loop.py: `decode_records` with the CLI's callbacks, a window's
    records `batch_size` to a decoder call), then the output finished; the summary's common part."""
    skipped = decode_records(
        run.decoder,
        run.records,
        run.out,
        decode,
        history,
        build,
        progress,
        batch_size=batch_size,
        on_error=args.on_error,
        window=args.sort_window,
    )
    run.bar.update(run.bar.total - run.bar.n)  # turns of skipped records
    run.bar.close()
    run.out.finish()
    return {"devices": devices.describe(run.mesh), "records": len(run.records), "skipped": skipped}


def main(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], dict],
    kind: str | None,
    report: Callable[[argparse.Namespace, dict], None],
) -> int:
    """A CLI's main: `--plan` (decode CLIs: `kind` "generate" / "refine"), else jax.distributed and `run`;
    the errors of bad input, devices or processes print one line and exit 2. Every process `report`s its
    summary (generate / refine: its own share; score's covers all, so it reports on process 0 only), and
    process 0, which wrote the output, says so. An output already complete: one line, exit 0."""
    if kind and args.plan:
        return decode_plan.main(args, kind)
    try:
        distributed.initialize_from_args(args)
        summary = run(args)
    except OutputComplete as e:
        if distributed.is_main_process():
            print(e)
        return 0
    except ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(args, summary)
    if distributed.is_main_process():
        print(f"wrote {args.output}")
    return 0


def side_by_side(draft: str, refined: str, width: int = 48, titles: tuple[str, str] = ("draft", "refined")) -> str:
    """Two wrapped columns under `titles`, draft | refined."""

    def wrap(text):
        return [w for line in text.splitlines() or [""] for w in textwrap.wrap(line, width) or [""]]

    left, right = wrap(draft), wrap(refined)
    rows = [titles, ("-" * width, "-" * width)] + list(itertools.zip_longest(left, right, fillvalue=""))
    return "\n".join(f"{a:<{width}} | {b}" for a, b in rows)


def print_summary(_args: argparse.Namespace, summary: dict) -> None:
    print("summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
