"""Reading JSONL files the one way every CLI does: each error names the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


class JsonlError(ValueError):
    """A line that is not UTF-8 or not JSON; str() is 'PATH:LINE: problem'."""


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """("PATH:LINE", value) for each non-blank line, streamed. OSError (e.g. a missing file) passes through."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise JsonlError(f"{path}:{n}: not UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsonlError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
            yield f"{path}:{n}", value
