"""Reading JSONL files the one way every CLI does: each error names the file and the line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from etils import epath


class JsonlError(ValueError):
    """A line that is not UTF-8 or not JSON; str() is 'PATH:LINE: problem'."""


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """("PATH:LINE", value) for each non-blank line of a local file or a URL (etils.epath), streamed.
    OSError (e.g. a missing file) passes through."""
    with epath.Path(path).open("rb") as f:
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
