"""Scoring token rows with a reward model: length-sorted, fixed-shape batches, data-parallel, one jit.

`Scorer.score(rows)` takes (token ids, gating index) rows in any order and returns one `Score` per row
in the same order. Rows are sorted by length and cut into batches of `batch_size` rows of one length
bucket (a short last batch repeats a row), right-padded to the bucket: one compilation per bucket.
Buckets are four per octave (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, ...), so padding costs at most
25% (at most 14% past the first octave) at four compiled shapes per doubling of the length. With a mesh,
the batch is split over all its devices (pure data parallel: `batch_size` is rounded up to a multiple of
the device count) and the weights are placed by `param_shardings`.

A row's score depends on how many rows each device holds (XLA blocks its matrix products by it) and on
nothing else: with the same rows per device it is the same bit for bit on any mesh and with any process
count (rows do not share a batch across buckets); otherwise it agrees to float32 rounding.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import numpy as np
from flax import nnx

from diffpo_jax.reward.inputs import InputError, conversation_ids, gating_pattern, gating_position
from diffpo_jax.reward.loading import LoadedRewardModel
from diffpo_jax.sharding import batch_sharding
from diffpo_jax.sources import ModelSourceError

MIN_BUCKET = 32


def length_bucket(n: int) -> int:
    """The smallest of 32 and 2^k * (1, 1.25, 1.5, 1.75) (k >= 5) that holds n tokens."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    octave = 1 << (n - 1).bit_length() - 1  # the largest power of two below n
    return next(octave * q // 4 for q in (5, 6, 7, 8) if octave * q // 4 >= n)


@dataclasses.dataclass
class Score:
    score: float
    logits: list[float] | None = None  # classifiers with num_labels > 1
    objectives: dict[str, float] | None = None  # ArmoRM's per-objective rewards


@partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, mask: jax.Array, gate: jax.Array):
    return nnx.merge(graphdef, state)(tokens, mask, gate)


class Scorer:
    def __init__(
        self, loaded: LoadedRewardModel, *, batch_size: int, label: int = 0, mesh: jax.sharding.Mesh | None = None
    ):
        tok = loaded.tokenizer
        if tok is None:
            raise ModelSourceError(f"{loaded.source}: no tokenizer files beside the reward model's weights")
        head = loaded.head
        if head.kind == "classifier" and not 0 <= label < head.num_labels:
            raise ModelSourceError(f"{loaded.source}: --label {label} but the model has {head.num_labels} labels")
        pad = tok.pad_token_id if tok.pad_token_id is not None else loaded.cfg.pad_token_id
        if pad is None and batch_size > 1:  # transformers' rule: no pad token, no batches
            raise ModelSourceError(
                f"{loaded.source}: the reward model has no pad token (config pad_token_id "
                "or tokenizer pad_token); score with --batch-size 1"
            )
        self.loaded, self.tokenizer, self.label, self.mesh = loaded, tok, label, mesh
        self.pad_id = int(pad or 0)
        devices = 1 if mesh is None else mesh.devices.size
        self.batch_size = -(-batch_size // devices) * devices
        self.pattern = gating_pattern(tok) if head.kind == "armorm" else None
        self.graphdef, self.state = nnx.split(loaded.model)

    def row(self, prompt, answer: str) -> tuple[list[int], int]:
        """(token ids, gating index) of `answer` to `prompt`; InputError if it cannot be scored whole."""
        ids = conversation_ids(self.tokenizer, prompt, answer)
        context = self.loaded.cfg.max_position_embeddings
        if len(ids) > context:
            raise InputError(f"{len(ids)} tokens exceed the reward model's context of {context} (not truncated)")
        return ids, (gating_position(ids, self.pattern) if self.pattern is not None else 0)

    def score(self, rows: list[tuple[list[int], int]]) -> list[Score]:
        """One Score per row, in order. A batch holds rows of one length bucket only, so a row's score does
        not depend on the rows scored with it (the same bytes however the records are split up)."""
        by_bucket: dict[int, list[int]] = {}
        for i in sorted(range(len(rows)), key=lambda i: len(rows[i][0])):
            by_bucket.setdefault(length_bucket(len(rows[i][0])), []).append(i)
        scores: list[Score | None] = [None] * len(rows)
        for order in by_bucket.values():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                for i, s in zip(chunk, self._batch([rows[i] for i in chunk])):
                    scores[i] = s
        return scores

    def _batch(self, rows: list[tuple[list[int], int]]) -> list[Score]:
        width = length_bucket(max(len(ids) for ids, _ in rows))
        padded = rows + [rows[0]] * (self.batch_size - len(rows))
        tokens = np.full((self.batch_size, width), self.pad_id, np.int32)
        mask = np.zeros((self.batch_size, width), bool)
        gate = np.zeros((self.batch_size,), np.int32)
        for i, (ids, g) in enumerate(padded):
            tokens[i, : len(ids)], mask[i, : len(ids)], gate[i] = ids, True, g
        args = (tokens, mask, gate)
        if self.mesh is not None:
            args = tuple(jax.device_put(a, batch_sharding(self.mesh, a.ndim)) for a in args)
        out = jax.device_get(_forward(self.graphdef, self.state, *args))
        head = self.loaded.head
        if head.kind == "armorm":
            names = head.objective_names
            return [
                Score(float(out["score"][i]), objectives=dict(zip(names, map(float, out["rewards"][i]))))
                for i in range(len(rows))
            ]
        logits = out["logits"]
        return [
            Score(float(logits[i, self.label]), logits=logits[i].tolist() if head.num_labels > 1 else None)
            for i in range(len(rows))
        ]
