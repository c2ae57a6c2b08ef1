"""Which answers `python -m diffpo_jax.score` scores in each record, and what it writes back.

Formats (input order and every input field kept):
  jsonl         `prompt` or `messages`, and the answer fields: strings (generate's `draft`, refine's
                `refined`), or lists of strings (generate --num-samples' `samples`). Default fields: the
                ones of draft, refined present in the first record. Output: `scores` {FIELD: float, or a
                list for list fields}; ArmoRM adds `objectives` {FIELD: {name: float}} (lists for list
                fields); classifiers with several labels add `logits`. Existing `scores` of other fields
                are kept. --best-of-n (one list field): `best_of_n` {field, index, score, response}.
  alpaca_eval   a JSON list of {instruction, output, ...}; default fields: draft, output present.
  mt_bench      FastChat answer records + --questions question.jsonl; a field is a list of turns in
                choices[0] (`turns`, refine's `draft_turns`); the whole conversation is scored once,
                after its last answer. Default fields: draft_turns, turns present.
  trajectories  `data build` source rows: a prompt and a list of responses; the output gains the scores
                list (default `all_rm_scores`) that `data build` reads.
Problems are `FormatError`s naming the file, the record and the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from diffpo_jax.chat import Messages, as_messages
from diffpo_jax.paths import as_path
from diffpo_jax.records.formats import FormatError, Record, jsonl_records, read_records
from diffpo_jax.reward.scorer import Score

SCORE_FORMATS = ("jsonl", "alpaca_eval", "mt_bench", "trajectories")
DEFAULT_FIELDS = {
    "jsonl": ("draft", "refined"),
    "alpaca_eval": ("draft", "output"),
    "mt_bench": ("draft_turns", "turns"),
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """How to read a file's answers: its format, the answer fields, trajectories' field names."""

    fmt: str
    fields: tuple[str, ...]
    prompt_field: str = "prompt"
    responses_field: str = "all_generated_responses"
    scores_field: str = "all_rm_scores"


def read_score_records(path: str | os.PathLike, fmt: str, questions: str | os.PathLike | None) -> list[Record]:
    """The records of `path` (local or URL) to score."""
    if fmt == "mt_bench":
        return read_records(path, fmt, with_drafts=True, questions=questions)
    if fmt != "trajectories":
        return read_records(path, fmt, with_drafts=False)
    records = [Record(rec, where, None, [], []) for where, rec in jsonl_records(as_path(path))]
    if not records:
        raise FormatError(f"{path}: no records")
    return records


def default_fields(fmt: str, first: Record, given: str | None) -> tuple[str, ...]:
    """--fields, or the format's answer fields present in the first record."""
    if fmt == "trajectories":
        return ()
    if given:
        return tuple(f.strip() for f in given.split(",") if f.strip())
    raw = first.raw["choices"][0] if fmt == "mt_bench" else first.raw
    fields = tuple(f for f in DEFAULT_FIELDS[fmt] if f in raw)
    if not fields:
        raise FormatError(
            f"{first.where}: none of the answer fields {', '.join(DEFAULT_FIELDS[fmt])} is present; "
            "name them with --fields"
        )
    return fields


def _strings(where: str, value: Any, field: str, lists_only: bool = False) -> list[str]:
    if isinstance(value, str) and not lists_only:
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    what = "a non-empty list of strings" if lists_only else "a string or a non-empty list of strings"
    raise FormatError(f"{where}: field '{field}' ({what}) is missing")


def _prompt(where: str, value: Any, field: str) -> str | Messages:
    if isinstance(value, str) and value.strip():
        return value
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    ):
        return value
    raise FormatError(f"{where}: field '{field}' (a string or a list of {{role, content}}) is missing")


def items(layout: Layout, rec: Record) -> list[tuple[str, str | Messages, str]]:
    """(field, prompt, answer) for every answer of `rec` to score, fields in order, list entries in order."""
    if not isinstance(rec.raw, dict):
        raise FormatError(f"{rec.where}: expected a JSON object")
    if layout.fmt == "trajectories":
        prompt = _prompt(rec.where, rec.raw.get(layout.prompt_field), layout.prompt_field)
        field = layout.responses_field
        return [(field, prompt, r) for r in _strings(rec.where, rec.raw.get(field), field, lists_only=True)]
    out = []
    for field in layout.fields:
        if layout.fmt == "mt_bench":
            turns = _strings(rec.where, rec.raw["choices"][0].get(field), f"choices[0].{field}", lists_only=True)
            if len(turns) != rec.num_turns:
                raise FormatError(f"{rec.where}: choices[0].{field} has {len(turns)} answers for {rec.num_turns} turns")
            messages = list(as_messages(rec.prompt))
            for answer, user in zip(turns[:-1], rec.followups):
                messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": user}]
            out.append((field, messages, turns[-1]))
        else:
            out += [(field, rec.prompt, a) for a in _strings(rec.where, rec.raw.get(field), field)]
    return out


def check_best_of_n(layout: Layout, records: list[Record]) -> None:
    """--best-of-n: one field, a list of answers in every record."""
    if layout.fmt != "jsonl" or len(layout.fields) != 1:
        raise FormatError(
            f"--best-of-n scores one list field of jsonl records (e.g. --fields samples), "
            f"got {', '.join(layout.fields) or 'none'}"
        )
    (field,) = layout.fields
    for rec in records:
        if not isinstance(rec.raw.get(field), list):
            raise FormatError(f"{rec.where}: field '{field}' (a list of answers, for --best-of-n) is missing")


def is_list_field(layout: Layout, rec: Record, field: str) -> bool:
    return layout.fmt == "trajectories" or (layout.fmt != "mt_bench" and isinstance(rec.raw.get(field), list))


def check_finite(rec: Record, field: str, score: Score) -> None:
    values = [score.score, *(score.logits or []), *(score.objectives or {}).values()]
    if not all(math.isfinite(v) for v in values):
        raise FormatError(
            f"{rec.where}: field '{field}': the reward model gave a non-finite score ({score.score}); "
            "nothing written for it (try --dtype float32)"
        )


def scored_output(layout: Layout, rec: Record, scores: list[tuple[str, Score]], best_of_n: bool) -> dict[str, Any]:
    """`rec` with its scores (one (field, Score) per item of `items`, same order)."""
    out = dict(rec.raw)
    if layout.fmt == "trajectories":
        return out | {layout.scores_field: [s.score for _, s in scores]}
    by_field: dict[str, list[Score]] = {}
    for field, s in scores:
        by_field.setdefault(field, []).append(s)

    def per_field(get):
        return {
            f: ([get(s) for s in ss] if is_list_field(layout, rec, f) else get(ss[0])) for f, ss in by_field.items()
        }

    out["scores"] = dict(rec.raw.get("scores") or {}) | per_field(lambda s: s.score)
    if scores[0][1].objectives is not None:
        out["objectives"] = dict(rec.raw.get("objectives") or {}) | per_field(lambda s: s.objectives)
    if scores[0][1].logits is not None:
        out["logits"] = dict(rec.raw.get("logits") or {}) | per_field(lambda s: s.logits)
    if best_of_n:
        ((field, ss),) = by_field.items()
        best = max(range(len(ss)), key=lambda i: ss[i].score)  # the first of equal best scores
        out["best_of_n"] = {"field": field, "index": best, "score": ss[best].score, "response": rec.raw[field][best]}
    return out
