"""Training batches from a built trajectory dataset (see trajectories.py), with grain over array_record.

One batch row per record: the prompt through the model's chat template, y(T) ("best") and one y(t)
("worse") drawn uniformly from the record's others. Shapes are static:
  prompt  int32 [b, P] LEFT-padded,  prompt_mask bool [b, P]
  best    int32 [b, N] right-padded, best_mask   bool [b, N]
  worse   int32 [b, N] right-padded, worse_mask  bool [b, N]
b = global_batch_size // shard_count rows per process. A response is its tokens followed by the
chat template's end-of-turn token (`end_of_turn_id`), cut to N tokens when longer (the end-of-turn
token is then lost); a prompt longer than P keeps its last P tokens. Both are counted in
`loader.stats`, per row served. Padding uses `chat.pad_id` (the tokenizer's pad id, else its end-of-turn id), as decoding does.

Records: all of the dataset's, or the `indices` given (the trainer's training split, see
training/evaluation.py); n below counts those.

Order: one global order, the same whatever the number of processes. Each epoch permutes all n
records (`epoch_permutation(seed, epoch, n)`); global batch s of the epoch is rows s*G .. (s+1)*G-1 of
the permutation (G = global_batch_size), and process `shard_index` reads only its slice of each global
batch: rows s*G + shard_index*b .. + b. So processes see disjoint records, every process runs the same
`steps_per_epoch` = n // G steps, the global batch (hence the training run) does not depend on the
process count, and an epoch skips `skipped_per_epoch` = n - steps_per_epoch * G records (a different
subset every epoch). The y(t) of record r in epoch e is `worse_choice(seed, e, r, len(others))`.

The stream is a grain MapDataset of batches indexed by step, so its state is one number, the global
steps taken: `get_state()` is a JSON-serialisable dict (with this process's counts in `stats`), and
`set_state` continues the exact stream, also in a run with another number of processes (a checkpoint
of a 2-process run resumes in a 1-process run and the reverse).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import grain
import numpy as np

from diffpo_jax.chat import end_of_turn_id, pad_id, prompt_ids, response_ids
from diffpo_jax.data.trajectories import TrajectoryDataError, read_manifest

BATCH_KEYS = ("prompt", "prompt_mask", "best", "best_mask", "worse", "worse_mask")
_FLAGS = ("prompt_truncated", "best_truncated", "worse_truncated")


def worse_choice(seed: int, epoch: int, record: int, num_others: int) -> int:
    """Which of a record's others is y(t) in `epoch`: uniform, a function of (seed, epoch, record) only."""
    return int(np.random.default_rng([seed, epoch, record]).integers(num_others))


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """The order in which a shard of `size` records is read in `epoch` (a function of seed and epoch only)."""
    return np.random.default_rng([seed, epoch]).permutation(size)


@dataclasses.dataclass(frozen=True)
class RecordEncoder:
    """Token ids of one record: fixed-length, padded, with masks and truncation flags."""

    tokenizer: Any
    prompt_len: int
    response_len: int
    pad_id: int
    eot_id: int

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, prompt_len: int, response_len: int) -> RecordEncoder:
        if prompt_len < 1 or response_len < 1:
            raise ValueError(f"prompt_len and response_len must be >= 1 (got {prompt_len}, {response_len})")
        try:
            eot = end_of_turn_id(tokenizer)
        except ValueError as e:
            raise TrajectoryDataError(str(e)) from None
        return cls(tokenizer, prompt_len, response_len, pad_id(tokenizer, eot), eot)

    def prompt(self, prompt) -> tuple[np.ndarray, np.ndarray, bool]:
        ids = prompt_ids(self.tokenizer, prompt)
        ids, cut = ids[-self.prompt_len :], len(ids) > self.prompt_len
        tokens = np.full(self.prompt_len, self.pad_id, np.int32)
        mask = np.zeros(self.prompt_len, bool)
        tokens[self.prompt_len - len(ids) :], mask[self.prompt_len - len(ids) :] = ids, True
        return tokens, mask, cut

    def response(self, text: str) -> tuple[np.ndarray, np.ndarray, bool]:
        ids = response_ids(self.tokenizer, text) + [self.eot_id]
        ids, cut = ids[: self.response_len], len(ids) > self.response_len
        tokens = np.full(self.response_len, self.pad_id, np.int32)
        mask = np.zeros(self.response_len, bool)
        tokens[: len(ids)], mask[: len(ids)] = ids, True
        return tokens, mask, cut

    def __call__(self, record: dict[str, Any], worse_index: int) -> dict[str, np.ndarray]:
        out = {}
        for key, (tokens, mask, cut) in (
            ("prompt", self.prompt(record["prompt"])),
            ("best", self.response(record["best"])),
            ("worse", self.response(record["others"][worse_index])),
        ):
            out[key], out[f"{key}_mask"], out[f"{key}_truncated"] = tokens, mask, np.bool_(cut)
        return out


class TrajectoryLoader:
    """An iterator of per-process batches (dicts of numpy arrays, keys BATCH_KEYS); see module doc.

    Attributes: `num_records` (records in the dataset), `batch_size` (rows per process),
    `steps_per_epoch`, `skipped_per_epoch` (records no process reads in an epoch), `num_batches`
    (None when endless), `stats` (rows served and rows truncated, by field).
    """

    def __init__(
        self,
        data_dir,
        tokenizer,
        *,
        global_batch_size: int,
        prompt_len: int,
        response_len: int = 256,
        seed: int = 0,
        num_epochs: int | None = 1,
        shard_index: int | None = None,
        shard_count: int | None = None,
        indices: list[int] | None = None,
    ):
        if shard_index is None or shard_count is None:
            import jax

            shard_index = jax.process_index() if shard_index is None else shard_index
            shard_count = jax.process_count() if shard_count is None else shard_count
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
        if global_batch_size < 1 or global_batch_size % shard_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not a positive multiple of {shard_count} shards"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (got {seed})")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (got {num_epochs})")
        data_dir = Path(data_dir).expanduser()
        files = [str(data_dir / name) for name in read_manifest(data_dir)["files"]]
        self._source = grain.sources.ArrayRecordDataSource(files)
        self.indices = np.arange(len(self._source)) if indices is None else np.asarray(indices, np.int64)
        n = len(self.indices)
        self.encoder = RecordEncoder.for_tokenizer(tokenizer, prompt_len, response_len)
        self.seed, self.shard_index, self.shard_count = seed, shard_index, shard_count
        self.global_batch_size = global_batch_size
        self.batch_size = global_batch_size // shard_count
        self.num_records = n
        self.steps_per_epoch = n // global_batch_size
        if self.steps_per_epoch == 0:
            raise TrajectoryDataError(f"{data_dir}: {n} records make no global batch of {global_batch_size}")
        self.skipped_per_epoch = n - self.steps_per_epoch * global_batch_size
        self.num_batches = None if num_epochs is None else num_epochs * self.steps_per_epoch
        rows_per_epoch = self.steps_per_epoch * self.batch_size
        dataset = (
            grain.MapDataset.range(rows_per_epoch)
            .repeat(num_epochs)
            .map_with_index(lambda position, _: self._row(*divmod(position, rows_per_epoch)))
            .batch(self.batch_size, drop_remainder=True)
        )
        self._dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        self._iterator = None
        self.stats = {"rows": 0, **{flag: 0 for flag in _FLAGS}}

    def record_index(self, epoch: int, row: int) -> int:
        """The dataset index of the record this process serves as its row `row` (0-based, counted
        across the steps) of `epoch`."""
        step, j = divmod(row, self.batch_size)
        global_row = step * self.global_batch_size + self.shard_index * self.batch_size + j
        return int(self.indices[epoch_permutation(self.seed, epoch, self.num_records)[global_row]])

    def _row(self, epoch: int, row: int) -> dict[str, np.ndarray]:
        index = self.record_index(epoch, row)
        record = json.loads(self._source[index])
        return self.encoder(record, worse_choice(self.seed, epoch, index, len(record["others"])))

    def __iter__(self) -> TrajectoryLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = iter(self._dataset)
        batch = next(self._iterator)
        self.stats["rows"] += self.batch_size
        for flag in _FLAGS:
            self.stats[flag] += int(batch.pop(flag).sum())
        return batch

    def _fingerprint(self) -> dict[str, int]:
        """What the stream depends on; not the process count, which only slices each global batch."""
        return {"seed": self.seed, "global_batch_size": self.global_batch_size, "num_records": self.num_records}

    def get_state(self) -> dict:
        """JSON-serialisable: the stream position, the counts, and what the stream depends on."""
        position = self._iterator.get_state() if self._iterator is not None else {"next_index": 0}
        return {"position": position, "stats": dict(self.stats), "loader": self._fingerprint()}

    def set_state(self, state: dict) -> None:
        if state.get("loader") != self._fingerprint():
            raise ValueError(f"loader state is for {state.get('loader')}, this loader is {self._fingerprint()}")
        if self._iterator is None:
            self._iterator = iter(self._dataset)
        self._iterator.set_state(state["position"])
        self.stats = dict(state["stats"])


def make_loader(
    data_dir: str | os.PathLike,
    tokenizer: Any,
    *,
    global_batch_size: int,
    prompt_len: int,
    response_len: int = 256,
    seed: int = 0,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    indices: list[int] | None = None,
) -> TrajectoryLoader:
    """Batches of the dataset in `data_dir` (see module doc); shards default to jax's process index/count;
    `indices`: the dataset records to serve (default all; the trainer leaves out its held-out split)."""
    return TrajectoryLoader(
        data_dir,
        tokenizer,
        global_batch_size=global_batch_size,
        prompt_len=prompt_len,
        response_len=response_len,
        seed=seed,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
        indices=indices,
    )
