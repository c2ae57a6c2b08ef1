"""The output file of the decoding and scoring CLIs, resumable and shared by processes.

`ResumableOutput` streams results to OUT.partial (a header line with the run's options, then one line per
finished record holding its index and a fingerprint of its input) and writes OUT by rename once every record
is done; a rerun resumes from the partial file after checking that it belongs to the same input and options.
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


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an output that is the input file (the results would replace it) unless `overwrite`."""
    a, b = os.fspath(as_path(input_path)), os.fspath(as_path(output_path))
    same = a == b if is_url(a) or is_url(b) else os.path.realpath(a) == os.path.realpath(b)
    if not overwrite and same:
        raise FormatError(f"{output_path}: is the input file; pass --overwrite to replace it with the results")


def _fingerprint(raw: Any) -> str:
    return hashlib.sha1(json.dumps(raw, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ResumableOutput:
    """OUT.partial while running (header {"options"}, then {"index", "source": fingerprint, "output"} per
    finished record); OUT, written to a temp name and renamed, once all records are done.

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
    ):
        self.path, self.fmt, self.records, self.barrier = as_path(path), fmt, records, barrier
        self.process = process
        self.header = json.loads(json.dumps({"options": options}))  # as it reads back
        self.partial = self._partial_file(process)
        self._url, self.flush_every_s, self._clock = is_url(self.path), flush_every_s, clock
        done, own_rows, own_parts = self._read_partials()
        barrier("resumable-output-read")  # every process has read the files before any writes one
        self.done: dict[int, dict] = {i: done[i] for i in sorted(done)}
        self.todo: list[int] = [i for i in range(len(records)) if i not in done][process::processes]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial.write_text("".join(line + "\n" for line in [json.dumps(self.header), *own_rows]), encoding="utf-8")
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

    def _read_partials(self) -> tuple[dict[int, dict], list[str], list[epath.Path]]:
        """The outputs in all partial files by record index; this process's record lines (whole ones) and
        part files."""
        done, own, own_parts = {}, [], []
        for f in self._partial_files():
            lines = f.read_text(encoding="utf-8").splitlines()
            try:
                rows = [json.loads(line) for line in lines]
            except json.JSONDecodeError:
                # Only the last line can be cut short (a run killed mid-write): that record is redone.
                lines = lines[:-1]
                rows = [json.loads(line) for line in lines]
            if not rows or rows[0] != self.header:
                raise FormatError(
                    f"{f}: written by a run with other options ({rows[0] if rows else 'no header'}); "
                    "delete it to start over"
                )
            for row in rows[1:]:
                i = row.get("index")
                if not isinstance(i, int) or not 0 <= i < len(self.records):
                    raise FormatError(f"{f}: record index {i} is not in the input's {len(self.records)} records")
                if row.get("source") != _fingerprint(self.records[i].raw):
                    raise FormatError(
                        f"{f}: record {i} does not match {self.records[i].where}; delete it to start over"
                    )
                done[i] = row["output"]
            if f.name == self.partial.name or f.name.startswith(self.partial.name + ".part-"):
                own += lines[1:]
                own_parts += [f] if f.name != self.partial.name else []
        return done, own, own_parts

    def append(self, index: int, output: dict[str, Any]) -> None:
        """The output of record `index` (0-based in the input); flushed to this process's file at once
        (a URL's: kept for the next part)."""
        row = {"index": index, "source": _fingerprint(self.records[index].raw), "output": output}
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
        """Write OUT (all records, input order) by rename (a URL: directly) and remove the partial files;
        returns the outputs.

        With several processes: after every process's records are written, process 0 writes OUT from all
        the partial files; every process returns once OUT is there."""
        if self._file is not None:
            self._file.close()
        self.flush()
        self.barrier("resumable-output-done")
        if self.process == 0:
            done, _, _ = self._read_partials()
            if len(done) != len(self.records):
                raise FormatError(f"{self.partial}: {len(done)} of {len(self.records)} records done")
            outputs = [done[i] for i in range(len(self.records))]
            if self.fmt == "alpaca_eval":
                text = json.dumps(outputs, indent=2, ensure_ascii=False) + "\n"
            else:
                text = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in outputs)
            if self._url:
                self.path.write_text(text, encoding="utf-8")
            else:
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(text, encoding="utf-8")
                tmp.replace(self.path)
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


def open_output(path, fmt: str, records: list[Record], options: dict[str, Any]) -> ResumableOutput:
    """The output file (local or URL) of a CLI run, shared by this run's processes (one with a single
    process): each takes a share of the records no earlier run finished, and process 0 writes the file.
    Checks first that the processes share its folder (`check_output`)."""
    import jax

    from diffpo_jax.paths import sync

    check_output(path)
    return ResumableOutput(
        path, fmt, records, options, process=jax.process_index(), processes=jax.process_count(), barrier=sync
    )
