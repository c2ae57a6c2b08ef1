"""The record formats of `python -m diffpo_jax.generate` and `python -m diffpo_jax.refine` (and what `score` reads).

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
turns, and (refine) one draft per turn. The output file is written by output.py. Every path may be a URL
(gs://...; etils.epath, paths.as_path).

Every problem with the input is a `FormatError` whose str() is one line naming the file, the line or
record, and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from typing import Any

from etils import epath

from diffpo_jax.chat import Messages, as_messages
from diffpo_jax.jsonl import JsonlError, read_jsonl
from diffpo_jax.paths import as_path

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
