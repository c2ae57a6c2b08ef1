"""What a run logs: metrics.jsonl and TensorBoard scalars (MetricsLog, also in a bucket), and the progress
and evaluation lines the trainer prints."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from etils import epath

from diffpo_jax.distributed import is_main_process
from diffpo_jax.paths import is_url


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a killed process counts as past any step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


PART_LINES = 1000  # lines per part object of a bucket's metrics.jsonl (MetricsLog)


class MetricsLog:
    """metrics.jsonl (one line per step) and TensorBoard scalars, on process 0 only. Opened at `start_step`:
    lines of later steps (left by an interrupted run) are dropped first, and TensorBoard purges them.

    A local file is appended to at each line. An object in a store (a URL run dir) cannot be appended to,
    and rewriting it whole at each line uploads O(steps^2) bytes, at more than the one write per second
    GCS allows an object. There lines are kept and written at most every `flush_every_s` seconds, at
    `flush()` (the trainer's checkpoints and SIGTERM stop) and at `close()`, into part objects
    `metrics.jsonl.part-<first step>` of about PART_LINES lines (a write replaces only the newest part):
    O(steps) bytes in all. close() writes the whole metrics.jsonl once and removes the parts; a run
    killed before that leaves them, and the next opening merges them in (a part's line replaces a line
    of the same step: a close cut short between the two leaves both). TensorBoard is off there: an event
    file in a store is uploaded whole at each flush (O(steps^2) bytes); `note` says so, for the log."""

    def __init__(
        self, run_dir: epath.Path, start_step: int, tensorboard: bool, flush_every_s: float = 30.0, clock=time.monotonic
    ):
        self.enabled = is_main_process()
        self.path = run_dir / "metrics.jsonl"
        self.flush_every_s, self._clock = flush_every_s, clock
        self._file = self._tb = self._lines = None
        self._part, self._parts, self._dirty = [], [], False  # the newest part's lines, the parts written
        self.note = None
        if not self.enabled:
            return
        if tensorboard and is_url(run_dir):
            tensorboard = False
            self.note = (
                f"tensorboard: off for a URL run dir ({run_dir}: its event files would be uploaded whole at each "
                "flush); metrics.jsonl holds the same scalars"
            )
        if is_url(self.path):
            stale = sorted(self.path.parent.glob(f"{self.path.name}.part-*"), key=lambda p: p.name)
            by_step = {}
            for source in ([self.path] if self.path.exists() else []) + stale:
                for line in source.read_text().splitlines():
                    by_step[_step_of(line)] = line
            self._lines = [line for step, line in by_step.items() if step <= start_step]
            self.path.write_text("".join(line + "\n" for line in self._lines))
            for part in stale:
                part.unlink()
            self._last = clock()
        else:
            kept = []
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= start_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
            self._file = self.path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            if not self._part:
                self._parts.append(self.path.with_name(f"{self.path.name}.part-{record['step']:09d}"))
            self._lines.append(line)
            self._part.append(line)
            self._dirty = True
            if self._clock() - self._last >= self.flush_every_s:
                self.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    self._tb.add_scalar(tag, value, record["step"])

    def flush(self) -> None:
        """Write the lines not written yet (a bucket's; a local file has them all already)."""
        if self._dirty:
            self._parts[-1].write_text("".join(line + "\n" for line in self._part))
            self._dirty = False
            if len(self._part) >= PART_LINES:
                self._part = []
            self._last = self._clock()

    def close(self) -> None:
        """Everything written; in a bucket, metrics.jsonl whole and no parts. Safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._parts:
            self.path.write_text("".join(line + "\n" for line in self._lines))
            for part in self._parts:
                if part.exists():
                    part.unlink()
            self._part, self._parts, self._dirty = [], [], False
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def progress_line(m: dict[str, Any], total: int) -> str:
    return (
        f"step {m['step']}/{total}  loss {m['loss']:.4f}  ar {m['ar']:.4f}  con {m['con']:.4e}  "
        f"gnorm {m['grad_norm']:.3f}  lr {m['lr']:.3e}  {m['tokens_per_s']:,.0f} tok/s  {m['step_time_s']:.3f} s/step"
    )


def eval_line(m: dict[str, Any]) -> str:
    return (
        f"eval step {m['step']}  ar {m['eval_ar']:.4f}  con {m['eval_con']:.4e}  passes/token "
        f"{m['eval_passes_per_token']:.3f}  equal y(T) {m['eval_equal_best']:.2f}  distinct {m['eval_distinct']:.2f}  "
        f"{m['eval_seconds']:.1f} s"
    )
