"""Small file helpers the tests share."""

import json
from pathlib import Path


def write_jsonl(path: Path, rows) -> Path:
    """`rows` (objects, or strings written as they are) one per line into `path`."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path) -> list:
    """The objects of a JSON-lines file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
