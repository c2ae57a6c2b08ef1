"""Small file helpers the tests share."""

import json
from pathlib import Path


def write_jsonl(path: Path, rows) -> Path:
    """`rows` (objects, or strings written as they are) one per line into `path`."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
