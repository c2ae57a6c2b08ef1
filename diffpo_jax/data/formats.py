"""Input and output record formats shared by `python -m diffpo_jax.generate` and `python -m diffpo_jax.refine`.

Formats (the same three for both CLIs):
  jsonl        one object per line with `prompt` (string) or `messages` (chat list); refine also needs
               `draft`. generate adds `draft` (with K > 1 samples per prompt: `samples` and `sample_keys`
               instead); refine adds `refined` and `stats`. Every input field is kept.
  alpaca_eval  a JSON list of {instruction, output, generator, ...}. generate sets `output` and
               `generator`; refine moves `output` to `draft`, puts the refined text in `output` and
               appends `+diffpo` to `generator`.
  mt_bench     FastChat llm_judge. generate reads question.jsonl and writes answer records
               {question_id, answer_id, model_id, choices: [{index, turns}], tstamp}; refine reads answer
               records plus `--questions question.jsonl`, refines turn by turn and appends `+diffpo` to
               model_id (the drafts are kept as choices[0].draft_turns).

A `Record` is one input record as a conversation: the first turn's prompt, the user messages of later
turns, and (refine) one draft per turn. `ResumableOutput` streams results to OUT.partial (a header line
with the run's options, then one line per finished record holding its index and a fingerprint of its
input) and writes OUT by rename once every record is done; a rerun resumes from the partial file after
checking that it belongs to the same input and options. Several processes share one output: each
appends to its own partial file, and process 0 writes OUT in input order. Every path may be a URL
(gs://...; etils.epath, paths.as_path): an object cannot be appended to, so there the partial file grows
by part objects (`ResumableOutput`).

Every problem with the input is a `FormatError` whose str() is one line naming the file, the line or
record, and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from etils import epath

from diffpo_jax.chat import Messages, as_messages
from diffpo_jax.jsonl import JsonlError, read_jsonl
from diffpo_jax.paths import as_path, is_url

FORMATS = ("jsonl", "alpaca_eval", "mt_bench")
SUFFIX = "+diffpo"


class FormatError(Exception):
    """Bad input or output file; str() is the one-line message for the user."""


@dataclasses.dataclass
class Record:
    raw: dict[str, Any]  # the input record as read
    where: str  # "file:line" or "file: record i", for messages
    prompt: str | Messages  # the first turn's prompt
    followups: list[str]  # user messages of the turns after the first (mt_bench)
    drafts: list[str]  # one per turn (refine inputs); empty for generate inputs

    @property
    def num_turns(self) -> int:
        return 1 + len(self.followups)


def turn_prompt(record: Record, turn: int, answers: list[str]) -> str | Messages:
    """The prompt of `turn` (0-based): the first prompt, then each earlier answer and the next user message."""
    if turn == 0:
        return record.prompt
    messages = list(as_messages(record.prompt))
    for answer, user in zip(answers[:turn], record.followups[:turn]):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": user}]
    return messages


# ------------------------------------------------------------------------------------------ reading


def jsonl_records(path: epath.Path) -> list[tuple[str, Any]]:
    """("PATH:LINE", value) of every line of a JSONL file (local or URL); problems are FormatErrors."""
    try:
        return list(read_jsonl(path))
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e})") from None
    except JsonlError as e:
        raise FormatError(str(e)) from None


def _json_list(path: epath.Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(data, list):
        raise FormatError(f"{path}: expected a JSON list of records (alpaca_eval format)")
    return [(f"{path}: record {i}", rec) for i, rec in enumerate(data)]


def _field(where: str, rec: Any, name: str, kind: type, what: str) -> Any:
    if not isinstance(rec, dict):
        raise FormatError(f"{where}: expected a JSON object")
    if not isinstance(rec.get(name), kind):
        raise FormatError(f"{where}: field '{name}' ({what}) is missing")
    return rec[name]


def _messages(where: str, rec: Any) -> str | Messages:
    if not isinstance(rec, dict):
        raise FormatError(f"{where}: expected a JSON object")
    if isinstance(rec.get("prompt"), str):
        return rec["prompt"]
    msgs = rec.get("messages")
    ok = (
        isinstance(msgs, list)
        and msgs
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )
    )
    if not ok:
        raise FormatError(f"{where}: field 'prompt' (a string) or 'messages' (a list of {{role, content}}) is missing")
    return msgs


def _string_list(where: str, value: Any, name: str) -> list[str]:
    if not (isinstance(value, list) and value and all(isinstance(t, str) for t in value)):
        raise FormatError(f"{where}: field '{name}' (a non-empty list of strings) is missing")
    return value


def read_records(
    path: str | os.PathLike, fmt: str, *, with_drafts: bool, questions: str | os.PathLike | None = None
) -> list[Record]:
    """The records of `path` (local or URL) in order. with_drafts: refine inputs (each needs its draft(s));
    else generate inputs (mt_bench: `path` is question.jsonl). mt_bench refine inputs need `questions`."""
    path = as_path(path)
    records = []
    if fmt == "jsonl":
        for where, rec in jsonl_records(path):
            prompt = _messages(where, rec)
            drafts = [_field(where, rec, "draft", str, "a string")] if with_drafts else []
            records.append(Record(rec, where, prompt, [], drafts))
    elif fmt == "alpaca_eval":
        for where, rec in _json_list(path):
            instruction = _field(where, rec, "instruction", str, "a string")
            drafts = [_field(where, rec, "output", str, "a string")] if with_drafts else []
            records.append(Record(rec, where, instruction, [], drafts))
    elif fmt == "mt_bench":
        if not with_drafts:
            for where, rec in jsonl_records(path):
                _field(where, rec, "question_id", (int, str), "an int or string")
                turns = _string_list(where, rec.get("turns"), "turns")
                records.append(Record(rec, where, turns[0], turns[1:], []))
        else:
            if questions is None:
                raise FormatError("--questions question.jsonl is required with --format mt_bench")
            by_id = {}
            for where, rec in jsonl_records(as_path(questions)):
                qid = _field(where, rec, "question_id", (int, str), "an int or string")
                by_id[qid] = _string_list(where, rec.get("turns"), "turns")
            for where, rec in jsonl_records(path):
                qid = _field(where, rec, "question_id", (int, str), "an int or string")
                _field(where, rec, "model_id", str, "a string")
                choices = _field(where, rec, "choices", list, "a list")
                if not choices or not isinstance(choices[0], dict):
                    raise FormatError(f"{where}: field 'choices' (a list of {{index, turns}}) is empty")
                drafts = _string_list(where, choices[0].get("turns"), "choices[0].turns")
                if qid not in by_id:
                    raise FormatError(f"{where}: question_id {qid!r} has no question in {questions}")
                turns = by_id[qid]
                if len(turns) != len(drafts):
                    raise FormatError(
                        f"{where}: choices[0].turns has {len(drafts)} answers but question {qid!r} has {len(turns)} turns"
                    )
                records.append(Record(rec, where, turns[0], turns[1:], drafts))
    else:
        raise FormatError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if not records:
        raise FormatError(f"{path}: no records")
    return records


# ------------------------------------------------------------------------------------------ output records


def refined_output(fmt: str, record: Record, refined: list[str], stats: list[dict]) -> dict[str, Any]:
    """The output record for `record` refined turn by turn into `refined` (per-turn `stats`)."""
    rec = dict(record.raw)
    if fmt == "jsonl":
        return rec | {"refined": refined[0], "stats": stats[0]}
    if fmt == "alpaca_eval":
        return rec | {
            "output": refined[0],
            "draft": record.drafts[0],
            "generator": f"{rec.get('generator', '')}{SUFFIX}",
        }
    choice = dict(rec["choices"][0]) | {"turns": refined, "draft_turns": record.drafts}
    return rec | {"model_id": rec["model_id"] + SUFFIX, "choices": [choice] + rec["choices"][1:], "tstamp": time.time()}


def read_output(path: str | os.PathLike, fmt: str) -> list[tuple[str, Any]]:
    """(where, record) of each record of an output file of `fmt` (local or URL)."""
    return _json_list(as_path(path)) if fmt == "alpaca_eval" else jsonl_records(as_path(path))


def refined_pairs(fmt: str, output: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    """(a title, [(draft, refined) per turn]) of a record `refined_output` wrote; no pairs for a record
    written with an `error` (refine --on-error skip)."""
    if fmt == "jsonl":
        title = output.get("prompt") or output["messages"][-1]["content"]
        return title, [] if "error" in output else [(output["draft"], output["refined"])]
    if fmt == "alpaca_eval":
        return output["instruction"], [] if "error" in output else [(output["draft"], output["output"])]
    choice = output["choices"][0]
    return f"question {output['question_id']}", [] if "error" in output else list(
        zip(choice["draft_turns"], choice["turns"])
    )


def generated_output(fmt: str, record: Record, answers: list[str], model_id: str) -> dict[str, Any]:
    """The output record for `record` answered (turn by turn) with `answers` by `model_id`."""
    if fmt == "jsonl":
        return dict(record.raw) | {"draft": answers[0]}
    if fmt == "alpaca_eval":
        return dict(record.raw) | {"output": answers[0], "generator": model_id}
    return {
        "question_id": record.raw["question_id"],
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "choices": [{"index": 0, "turns": answers}],
        "tstamp": time.time(),
    }


def sampled_output(record: Record, samples: list[str], sample_keys: list[list[int]]) -> dict[str, Any]:
    """The jsonl output record for `record` answered with several `samples`, sample k drawn with the key
    named by sample_keys[k] ([seed, record index, turn, k])."""
    return dict(record.raw) | {"samples": samples, "sample_keys": sample_keys}


# ------------------------------------------------------------------------------------------ writing


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
    folder shared, which record_loop.open_output checks): process p appends to its own file, OUT.partial
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
