"""The output file of the decoding and scoring CLIs, resumable and shared by processes.

`ResumableOutput` streams results to OUT.partial (a header line with the run's options, then one line per
finished record holding its index and a fingerprint of its input) and writes OUT by rename once every record
is done, with OUT.done (the options, a digest of the input and one of OUT) beside it; a rerun resumes from the
partial file after checking that it belongs to the same input and options. A rerun on a finished OUT of the
same options and input decodes nothing (`OutputComplete`); OUT or partial files of other options or input, or
an OUT of unknown origin, are refused, naming what differs, unless `overwrite` (then they are redone).
Several processes share one output: each appends to its own partial file, and process 0 writes OUT in input
order (`open_output` opens it for this run's processes, after `check_output` made sure they all see its
folder). Every path may be a URL (gs://...; etils.epath, paths.as_path): an object cannot be appended to, so
there the partial file grows by part objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

from etils import epath

from diffpo_jax.paths import as_path, is_url
from diffpo_jax.records.formats import FormatError, Record, read_output


class OutputComplete(Exception):
    """OUT is already the finished output of the same options and input: nothing to do (the CLIs exit 0);
    str() is the line to print."""


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike, overwrite: bool) -> None:
    """Before any work: refuse an output that is the input file (the results would replace it) unless
    `overwrite`, an output that is a folder, and a URL whose filesystem package is not installed (gs://:
    gcsfs, requirements-gcs.txt), input or output."""
    a, b = os.fspath(as_path(input_path)), os.fspath(as_path(output_path))
    same = a == b if is_url(a) or is_url(b) else os.path.realpath(a) == os.path.realpath(b)
    if not overwrite and same:
        raise FormatError(f"{output_path}: is the input file; pass --overwrite to replace it with the results")
    _reachable(input_path)
    if _reachable(output_path).is_dir():
        raise FormatError(f"{output_path}: is a folder; --output names the file to write")


def _reachable(path: str | os.PathLike) -> epath.Path:
    """`path`, once its filesystem answered (a URL's backend is imported at the first call)."""
    path = as_path(path)
    try:
        path.exists()
    except ImportError as e:  # fsspec: "Please install gcsfs to access Google Storage"
        hint = "; pip install -r requirements-gcs.txt" if os.fspath(path).startswith("gs://") else ""
        raise FormatError(f"{path}: cannot be reached: {e}{hint}") from None
    return path


def _fingerprint(raw: Any) -> str:
    return hashlib.sha1(json.dumps(raw, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def content_digest(path: str | os.PathLike) -> str:
    """A file's content as a short string, for options whose file matters by what it holds (--questions)."""
    return "sha1:" + hashlib.sha1(as_path(path).read_bytes()).hexdigest()


def _write_whole(path: epath.Path, text: str) -> None:
    """`text` into `path`, which holds either its old content or all of `text` at any moment (a kill never
    leaves it cut short): a local file through a temp file renamed over it; an object appears whole when
    its upload ends, so a URL is written directly (a rename there would be a copy and a delete)."""
    if is_url(path):
        path.write_text(text, encoding="utf-8")
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _differences(then: Any, now: dict[str, Any]) -> str:
    """The options that differ, as "name then, now value; ..."."""
    then = then if isinstance(then, dict) else {}

    def show(options, k):
        return json.dumps(options[k], ensure_ascii=False) if k in options else "unset"

    unset = object()
    keys = [k for k in {**then, **now} if then.get(k, unset) != now.get(k, unset)]
    return "; ".join(f"{k} {show(then, k)}, now {show(now, k)}" for k in keys)


class ResumableOutput:
    """OUT.partial while running (header {"options"}, then {"index", "source": fingerprint, "output"} per
    finished record, rewritten at each start through a temp file); OUT, written to a temp name and renamed,
    once all records are done, then OUT.done ({"options", "input": digest of the records' fingerprints,
    "records", "output": digest of OUT}).

    Opening: OUT there with an OUT.done of the same options and input that matches it -> `OutputComplete`
    (unless `overwrite`: redone). Any other OUT (other options or input, changed since, or no OUT.done) is
    refused unless `overwrite`, or unless partial files of this run exist (it had begun replacing OUT).
    Partial files of other options or input are refused, naming what differs; `overwrite` discards them.

    Several processes (`process` of `processes`, with `barrier(name)` a barrier over them; the output's
    folder shared, which `open_output` checks): process p appends to its own file, OUT.partial
    (p = 0) or OUT.partial.p; each reads every partial file there at start (what earlier runs finished,
    with any process count), and takes every processes-th record of the rest as its own (`todo`);
    `finish` has process 0 write OUT, in input order, from all the partial files.

    OUT a URL: an object cannot be appended to, and rewriting it whole at each record would upload
    O(records^2) bytes. There the records appended since the last write go, at most every
    `flush_every_s` seconds (at an append) and at `finish`, into a new part object OUT.partial[.p].part-K
    (the header, then those lines: each part reads like a partial file), so a killed run redoes at most
    its last window and `flush_every_s` seconds. A reopening merges a process's parts into its partial
    file. OUT itself is written directly: an object appears whole when its upload ends, where a rename
    would be a copy and a delete."""

    def __init__(
        self,
        path: str | os.PathLike,
        fmt: str,
        records: list[Record],
        options: dict[str, Any],
        *,
        process: int = 0,
        processes: int = 1,
        barrier: Callable[[str], None] = lambda name: None,
        flush_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        overwrite: bool = False,
    ):
        self.path, self.fmt, self.records, self.barrier = as_path(path), fmt, records, barrier
        self.process = process
        self.header = json.loads(json.dumps({"options": options}))  # as it reads back
        self.partial = self._partial_file(process)
        self.marker = self.path.with_name(self.path.name + ".done")
        self._url, self.flush_every_s, self._clock = is_url(self.path), flush_every_s, clock
        self._sources = [_fingerprint(r.raw) for r in records]
        conflict = None if overwrite else self._existing_output()
        done, own_rows, own_parts, stale, began = self._read_partials(discard=overwrite)
        if conflict and not began:  # partial files of this run: it began replacing OUT
            raise FormatError(f"{self.path}: {conflict}; pass --overwrite to replace it")
        barrier("resumable-output-read")  # every process has read the files before any writes one
        if process == 0:  # OUT is to be replaced: its OUT.done goes first
            for f in stale + ([self.marker] if self.marker.exists() else []):
                f.unlink(missing_ok=True)
        barrier("resumable-output-cleared")
        self.done: dict[int, dict] = {i: done[i] for i in sorted(done)}
        self.todo: list[int] = [i for i in range(len(records)) if i not in done][process::processes]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_whole(self.partial, "".join(line + "\n" for line in [json.dumps(self.header), *own_rows]))
        for part in own_parts:  # merged into the partial file just written
            part.unlink()
        self._file = None
        self._pending: list[str] = []  # URL: the lines not in a part yet
        self._parts, self._last = 0, clock()

    def _partial_file(self, process: int) -> epath.Path:
        return self.path.with_name(self.path.name + ".partial" + (f".{process}" if process else ""))

    def _partial_files(self) -> list[epath.Path]:
        """OUT.partial and OUT.partial.<p> of any p, and their parts (.part-K), whichever exist."""
        if not self.path.parent.is_dir():
            return []
        name = re.compile(re.escape(self.path.name + ".partial") + r"(\.\d+)?(\.part-\d+)?")
        return sorted((f for f in self.path.parent.iterdir() if name.fullmatch(f.name)), key=lambda f: f.name)

    def _input_digest(self) -> str:
        return hashlib.sha1("\n".join(self._sources).encode()).hexdigest()

    def _existing_output(self) -> str | None:
        """What makes an existing OUT other than this run's finished output (None: no OUT). The same options
        and input, OUT unchanged since: `OutputComplete`."""
        if not self.path.exists():
            return None
        try:
            written = json.loads(self.marker.read_text(encoding="utf-8")) if self.marker.exists() else None
        except json.JSONDecodeError:
            written = None
        if not isinstance(written, dict):
            return f"already exists, with no {self.marker.name} naming the options and input it was written from"
        if written.get("options") != self.header["options"]:
            return f"written with other options ({_differences(written.get('options'), self.header['options'])})"
        if written.get("input") != self._input_digest():
            then, now = written.get("records"), len(self.records)
            return f"written from another input ({then} records, now {now})" + (
                ": the same count, other records" if then == now else ""
            )
        if written.get("output") != hashlib.sha1(self.path.read_bytes()).hexdigest():
            return f"changed since it was written (it no longer matches {self.marker.name})"
        raise OutputComplete(f"{self.path}: already complete (the same options and input); pass --overwrite to redo it")

    def _read_partials(
        self, discard: bool = False
    ) -> tuple[dict[int, dict], list[str], list[epath.Path], list[epath.Path], bool]:
        """The outputs in all partial files by record index; this process's record lines (whole ones) and
        part files; the files of other options or input to discard: with `discard`, or when they hold no
        record (a run stopped before its first, e.g. by a wrong --model: nothing to lose), else refused;
        whether any file is this run's."""
        done, own, own_parts, stale, began = {}, [], [], [], False
        for f in self._partial_files():
            lines = f.read_text(encoding="utf-8").splitlines()
            try:
                rows = [json.loads(line) for line in lines]
            except json.JSONDecodeError:
                # Only the last line can be cut short (a run killed mid-write): that record is redone.
                lines = lines[:-1]
                rows = [json.loads(line) for line in lines]
            problem = self._mismatch(rows)
            if problem and (discard or len(rows) <= 1):
                stale.append(f)
                continue
            if problem:
                raise FormatError(f"{f}: {problem}; pass --overwrite to start over")
            began = True
            done |= {row["index"]: row["output"] for row in rows[1:]}
            if f.name == self.partial.name or f.name.startswith(self.partial.name + ".part-"):
                own += lines[1:]
                own_parts += [f] if f.name != self.partial.name else []
        return done, own, own_parts, stale, began

    def _mismatch(self, rows: list[Any]) -> str | None:
        """Why the rows of a partial file are not this run's (None: they are)."""
        if not rows or rows[0] != self.header:
            then = rows[0].get("options") if rows and isinstance(rows[0], dict) else None
            why = _differences(then, self.header["options"]) if rows else "no header"
            return f"written by a run with other options ({why})"
        for row in rows[1:]:
            i = row.get("index")
            if not isinstance(i, int) or not 0 <= i < len(self.records):
                return f"record index {i} is not in the input's {len(self.records)} records"
            if row.get("source") != self._sources[i]:
                return f"record {i} does not match {self.records[i].where}"
        return None

    def append(self, index: int, output: dict[str, Any]) -> None:
        """The output of record `index` (0-based in the input); flushed to this process's file at once
        (a URL's: kept for the next part)."""
        row = {"index": index, "source": self._sources[index], "output": output}
        line = json.dumps(row, ensure_ascii=False)
        if self._url:
            self._pending.append(line)
            self.flush(force=False)
        else:
            if self._file is None:
                self._file = self.partial.open("a", encoding="utf-8")
            self._file.write(line + "\n")
            self._file.flush()
        self.done[index] = output

    def flush(self, force: bool = True) -> None:
        """URL: the lines appended since the last part into a new part object (unless `force` is False
        and the last was written less than flush_every_s ago). A local file has them all already."""
        if not self._pending or not force and self._clock() - self._last < self.flush_every_s:
            return
        part = self.partial.with_name(f"{self.partial.name}.part-{self._parts:06d}")
        part.write_text("".join(line + "\n" for line in [json.dumps(self.header), *self._pending]), encoding="utf-8")
        self._pending, self._parts, self._last = [], self._parts + 1, self._clock()

    def finish(self) -> list[dict[str, Any]]:
        """Write OUT (all records, input order) by rename (a URL: directly), then OUT.done, and remove the
        partial files; returns the outputs.

        With several processes: after every process's records are written, process 0 writes OUT from all
        the partial files; every process returns once OUT is there."""
        if self._file is not None:
            self._file.close()
        self.flush()
        self.barrier("resumable-output-done")
        if self.process == 0:
            done = self._read_partials()[0]
            if len(done) != len(self.records):
                raise FormatError(f"{self.partial}: {len(done)} of {len(self.records)} records done")
            outputs = [done[i] for i in range(len(self.records))]
            if self.fmt == "alpaca_eval":
                text = json.dumps(outputs, indent=2, ensure_ascii=False) + "\n"
            else:
                text = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in outputs)
            _write_whole(self.path, text)
            written = {
                "options": self.header["options"],
                "input": self._input_digest(),
                "records": len(self.records),
                "output": hashlib.sha1(text.encode("utf-8")).hexdigest(),
            }
            _write_whole(self.marker, json.dumps(written, ensure_ascii=False) + "\n")
            for f in self._partial_files():
                f.unlink()
        self.barrier("resumable-output-written")
        return outputs if self.process == 0 else [o for _, o in read_output(self.path, self.fmt)]


def check_output(path) -> None:
    """Several processes: fail in seconds unless all see the folder of the output file `path` (local or
    URL), with the token file OUTPUT.shared-check (distributed.check_shared_folder); nothing with one."""
    from diffpo_jax.distributed import check_shared_folder

    path = as_path(path)
    check_shared_folder(path.with_name(path.name + ".shared-check"), f"--output {path}")


def open_output(
    path, fmt: str, records: list[Record], options: dict[str, Any], overwrite: bool = False
) -> ResumableOutput:
    """The output file (local or URL) of a CLI run, shared by this run's processes (one with a single
    process): each takes a share of the records no earlier run finished, and process 0 writes the file.
    Checks first that the processes share its folder (`check_output`). `overwrite`: ResumableOutput's."""
    import jax

    from diffpo_jax.paths import sync

    check_output(path)
    return ResumableOutput(
        path,
        fmt,
        records,
        options,
        process=jax.process_index(),
        processes=jax.process_count(),
        barrier=sync,
        overwrite=overwrite,
    )
