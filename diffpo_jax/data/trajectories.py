"""Building the alignment-trajectory dataset: scored responses per prompt -> one ranked record per prompt.

A source is a local JSON-lines file (`.jsonl`/`.json`), a local `.parquet` file, or a hub dataset id
("org/name", or "org/name:split"; default split train) loaded with `datasets.load_dataset` (the only
network access). Each source row holds a prompt (a string, or a list of {"role", "content"} messages),
a list of responses and a list of scores, under configurable field names whose defaults follow
`princeton-nlp/{gemma2,llama3}-ultrafeedback-armorm`.

Rows of all sources are pooled by prompt (the paper pools the responses of several models). Per prompt:
identical response texts are merged (keeping the highest score); responses are sorted ascending by
(score, text), so ties in score are broken by the response text in code-point order; the last one is
y(T) = "best" and the rest, ascending, are y(0..T-1) = "others". Prompts with fewer than 2 responses or
fewer than 2 distinct responses are dropped.

Output directory (written to a temporary sibling and renamed into place):
  trajectories-train.array_record-00000-of-00001   one record per prompt, JSON bytes
      {"id": str, "prompt": str | messages, "best": str, "others": [str, ...]}, sorted by id
  manifest.json                                     counts kept and dropped, reasons with the first
                                                    offending record ids ("source:line" for JSON
                                                    lines, 1-based; "source:row" for parquet and hub
                                                    rows, 0-based)
A record's id is the first 16 hex digits of sha256 over the prompt's canonical JSON, so ids and the
record order do not depend on the order of sources or rows: same inputs, byte-identical output.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffpo_jax.jsonl import JsonlError, read_jsonl
from diffpo_jax.paths import as_path, remove_tree, written_locally

DATA_FILE = "trajectories-train.array_record-00000-of-00001"
MANIFEST = "manifest.json"
FORMAT = "diffpo-trajectories/1"
FIRST_IDS = 5  # offending record ids kept per reason
TIE_BREAK = "responses sorted ascending by (score, text in code-point order); best = last"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.\[\]%:+-]+)?$")
_FILE_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}

# Why a source row is unusable (counted per row) ...
RECORD_REASONS = (
    "not_an_object",
    "missing_field",
    "bad_prompt",
    "empty_prompt",
    "bad_responses",
    "bad_scores",
    "non_numeric_score",
    "length_mismatch",
)
# ... and why a pooled prompt is dropped (counted per prompt; ids: its first row).
PROMPT_REASONS = ("fewer_than_2_responses", "fewer_than_2_distinct_responses")


class TrajectoryDataError(Exception):
    """Unreadable or unusable trajectory data; str() is the one-line message for the user."""


class _Malformed(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def record_id(prompt: str | list[dict[str, str]]) -> str:
    """The stable id of a prompt: sha256 of its canonical JSON, 16 hex digits."""
    return hashlib.sha256(_canonical(prompt).encode()).hexdigest()[:16]


def _canonical(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------- sources


def _source_kind(source: str) -> str:
    path = Path(source).expanduser()
    kind = _FILE_SUFFIXES.get(path.suffix.lower())
    if path.is_file():
        if kind is None:
            raise TrajectoryDataError(f"{source}: unsupported file type (expected .jsonl, .json or .parquet)")
        return kind
    if path.exists():
        raise TrajectoryDataError(f"{source}: not a file")
    if kind is None and _HUB_ID.match(source):
        return "hub"
    raise TrajectoryDataError(f"{source}: no such file")


def _read_jsonl(source: str) -> Iterator[tuple[str, Any]]:
    try:
        yield from read_jsonl(Path(source).expanduser())
    except JsonlError as e:
        raise TrajectoryDataError(str(e)) from None


def _read_parquet(source: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(Path(source).expanduser())
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise TrajectoryDataError(f"{source}: not a readable parquet file ({type(e).__name__}: {e})") from None
    for row_no, row in enumerate(table.to_pylist()):
        yield f"{source}:{row_no}", row


def _read_hub(source: str) -> Iterator[tuple[str, Any]]:
    import datasets

    name, _, split = source.partition(":")
    try:
        rows = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # network, auth, missing dataset or split: one line for the user
        raise TrajectoryDataError(f"{source}: cannot load from the HF hub ({type(e).__name__}: {e})") from None
    label = f"{name}:{split or 'train'}"
    for row_no, row in enumerate(rows):
        yield f"{label}:{row_no}", row


_READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet, "hub": _read_hub}


# ---------------------------------------------------------------------------------------------- checks


def _prompt(value: Any, field: str) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise _Malformed("empty_prompt", f"{field!r} is empty")
        return value
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        if not value or not any(m["content"].strip() for m in value):
            raise _Malformed("empty_prompt", f"{field!r} has no content")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise _Malformed("bad_prompt", f"{field!r} is neither a string nor a list of role/content messages")


def _scored(row: Any, prompt_field: str, responses_field: str, scores_field: str):
    """(prompt, [(response, score), ...]) from one source row, or _Malformed."""
    if not isinstance(row, dict):
        raise _Malformed("not_an_object", "the row is not an object")
    for field in (prompt_field, responses_field, scores_field):
        if field not in row or row[field] is None:
            raise _Malformed("missing_field", f"no field {field!r}")
    prompt = _prompt(row[prompt_field], prompt_field)
    responses, scores = row[responses_field], row[scores_field]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise _Malformed("bad_responses", f"{responses_field!r} is not a list of strings")
    if not isinstance(scores, list):
        raise _Malformed("bad_scores", f"{scores_field!r} is not a list")
    for score in scores:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise _Malformed("non_numeric_score", f"{scores_field!r} holds {score!r}")
    if len(responses) != len(scores):
        raise _Malformed("length_mismatch", f"{len(responses)} responses but {len(scores)} scores")
    return prompt, [(r, float(s)) for r, s in zip(responses, scores)]


class _Tally:
    """Counts per reason with the first offending ids."""

    def __init__(self, reasons: tuple[str, ...]):
        self.counts = {r: {"count": 0, "first_ids": []} for r in reasons}

    def add(self, reason: str, rid: str) -> None:
        entry = self.counts[reason]
        entry["count"] += 1
        if len(entry["first_ids"]) < FIRST_IDS:
            entry["first_ids"].append(rid)

    def total(self) -> int:
        return sum(e["count"] for e in self.counts.values())


# ----------------------------------------------------------------------------------------------- build


def rank(pairs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Distinct responses (a repeated text keeps its highest score), ascending by (score, text)."""
    best: dict[str, float] = {}
    for text, score in pairs:
        best[text] = max(score, best.get(text, score))
    return sorted(best.items(), key=lambda ts: (ts[1], ts[0]))


def collect(
    sources: list[str],
    *,
    prompt_field: str = "prompt",
    responses_field: str = "all_generated_responses",
    scores_field: str = "all_rm_scores",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The ranked records (sorted by id) and the manifest, without writing anything."""
    if not sources:
        raise TrajectoryDataError("no sources given")
    bad_rows, bad_prompts = _Tally(RECORD_REASONS), _Tally(PROMPT_REASONS)
    pooled: dict[str, dict[str, Any]] = {}  # canonical prompt -> {"prompt", "pairs", "first_row"}
    per_source = []
    for source in sources:
        kind = _source_kind(source)
        read = malformed = 0
        for rid, row in _READERS[kind](source):
            read += 1
            try:
                prompt, pairs = _scored(row, prompt_field, responses_field, scores_field)
            except _Malformed as e:
                malformed += 1
                bad_rows.add(e.reason, rid)
                continue
            entry = pooled.setdefault(_canonical(prompt), {"prompt": prompt, "pairs": [], "first_row": rid})
            entry["pairs"].extend(pairs)
        if read == malformed:
            raise TrajectoryDataError(
                f"{source}: no usable rows ({read} read, {malformed} malformed: {_summary(bad_rows)})"
                if read
                else f"{source}: no rows"
            )
        per_source.append({"source": source, "kind": kind, "rows": read, "malformed_rows": malformed})

    records, merged_duplicates, best_ties = [], 0, 0
    for entry in pooled.values():
        ranked = rank(entry["pairs"])
        merged_duplicates += len(entry["pairs"]) - len(ranked)
        if len(ranked) < 2:
            reason = "fewer_than_2_responses" if len(entry["pairs"]) < 2 else "fewer_than_2_distinct_responses"
            bad_prompts.add(reason, entry["first_row"])
            continue
        best_ties += ranked[-1][1] == ranked[-2][1]
        records.append(
            {
                "id": record_id(entry["prompt"]),
                "prompt": entry["prompt"],
                "best": ranked[-1][0],
                "others": [text for text, _ in ranked[:-1]],
            }
        )
    if not records:
        raise TrajectoryDataError(
            f"{', '.join(sources)}: nothing usable ({len(pooled)} prompts, all dropped: {_summary(bad_prompts)};"
            f" malformed rows: {_summary(bad_rows)})"
        )
    records.sort(key=lambda r: r["id"])
    if len({r["id"] for r in records}) != len(records):
        raise TrajectoryDataError("two prompts share a record id (sha256 prefix collision)")
    responses = [1 + len(r["others"]) for r in records]
    manifest = {
        "format": FORMAT,
        "files": [DATA_FILE],
        "record": {"id": "str", "prompt": "str | [{role, content}]", "best": "str", "others": "[str] ascending score"},
        "fields": {"prompt": prompt_field, "responses": responses_field, "scores": scores_field},
        "sources": per_source,
        "kept": len(records),
        "responses_per_prompt": {"min": min(responses), "max": max(responses), "total": sum(responses)},
        "dropped_rows": {"total": bad_rows.total(), "reasons": bad_rows.counts},
        "dropped_prompts": {"total": bad_prompts.total(), "reasons": bad_prompts.counts},
        "merged_duplicate_responses": merged_duplicates,
        "best_score_ties": best_ties,
        "tie_break": TIE_BREAK,
        "record_ids": "source:line (JSON lines, 1-based) or source:row (parquet, hub; 0-based)",
    }
    return records, manifest


def _summary(tally: _Tally) -> str:
    parts = [f"{n} {reason} (first: {e['first_ids'][0]})" for reason, e in tally.counts.items() if (n := e["count"])]
    return ", ".join(parts) or "none"


def build(
    sources: list[str],
    out_dir: str | os.PathLike,
    *,
    prompt_field: str = "prompt",
    responses_field: str = "all_generated_responses",
    scores_field: str = "all_rm_scores",
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the dataset of `sources` into `out_dir` (see module doc); returns the manifest, which
    also holds the entries of `extra` (how the sources were made)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    out = as_path(out_dir)
    if out.exists() and not overwrite:
        raise TrajectoryDataError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    records, manifest = collect(
        sources, prompt_field=prompt_field, responses_field=responses_field, scores_field=scores_field
    )
    manifest.update(extra or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    remove_tree(tmp)
    try:
        tmp.mkdir()
        with written_locally(tmp) as local:  # array_record writes local files only
            writer = ArrayRecordWriter(os.fspath(local / DATA_FILE), "group_size:1")
            for record in records:
                writer.write(_canonical(record).encode())
            writer.close()
        (tmp / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=1, sort_keys=True) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            remove_tree(old)
        else:
            tmp.rename(out)
    finally:
        remove_tree(tmp)
    return manifest


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a built dataset directory."""
    path = as_path(data_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrajectoryDataError(f"{path.parent}: not a trajectory dataset (no {MANIFEST})") from None
    except json.JSONDecodeError as e:
        raise TrajectoryDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if manifest.get("format") != FORMAT:
        raise TrajectoryDataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest
