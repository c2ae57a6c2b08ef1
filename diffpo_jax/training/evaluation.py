"""Held-out evaluation inside training: the losses and Jacobi refinement of held-out y(t) drafts.

    records = read_records(data_dir)
    train_idx, held_idx = holdout_split(records, eval_cfg.holdout_prompts)
    evaluate = make_evaluator(eval_cfg, loss_cfg, [records[i] for i in held_idx], encoder, graphdef, mesh,
                              stop_tokens=...)
    metrics = evaluate(params)                                      # {"eval_ar": ..., ...}

Split: by prompt (one record per prompt), deterministic: the held-out records are the
`holdout_prompts` records with the smallest sha256 of their id (ids are hashes of the prompt, so this
is a fixed pseudo-random subset that depends on the prompts only, not on their order or the seed).
The trainer never serves them and records their ids in RUN_DIR/eval_ids.json.

Evaluation rows: every (held-out prompt, y(t)) pair, i.e. each of a record's `others` against its
y(T), in record order, capped at `max_rows`. Per evaluation:
  eval_ar, eval_con          L_AR and L_Con of the train loss (same normalisation and positions) over
                             all rows, one forward per `batch_size` rows, no gradient
  eval_passes_per_token      Jacobi passes / committed tokens, refining each y(t) draft with the current
  eval_tokens_per_pass       weights by the decoder `refine` uses (decoding/jacobi.py), block
                             `block_size`, up to the loader's response length N
  eval_equal_best            fraction of rows whose refined answer is y(T) token for token (as the
                             loader encodes it: cut to N tokens)
  eval_distinct              mean over rows of distinct tokens / tokens in the refined answer: the
                             collapse signal (an answer of one repeated token scores 1 / length)
  eval_seconds               wall time of the evaluation
Every process computes the same numbers (inputs are replicated, params stay on their shardings); the
trainer writes them from process 0. Static shapes: every batch is `batch_size` rows (the last one
filled with copies of row 0, masked out of the losses and the counts), prompts padded to P, drafts to
N + block, so each function compiles once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffpo_jax.data.loader import BATCH_KEYS, RecordEncoder
from diffpo_jax.data.trajectories import read_manifest
from diffpo_jax.decoding.jacobi import jacobi_decode
from diffpo_jax.training.loss import LossConfig, diffpo_loss, response_token_losses

EVAL_IDS = "eval_ids.json"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The `eval` section of a train config; holdout_prompts = 0 turns evaluation off."""

    holdout_prompts: int = 0  # prompts held out of training (see module doc)
    every: int = 0  # steps between evaluations (0: only before the first step and at the end)
    max_rows: int = 64  # (prompt, y(t)) rows evaluated, the first in record order
    batch_size: int = 8  # rows per forward / Jacobi call
    block_size: int = 16  # Jacobi window


def _hash(record_id: str) -> str:
    return hashlib.sha256(record_id.encode()).hexdigest()


def read_records(data_dir: Path) -> list[dict[str, Any]]:
    """All records of a built dataset, in dataset order."""
    import grain

    data_dir = Path(data_dir)
    source = grain.sources.ArrayRecordDataSource([str(data_dir / name) for name in read_manifest(data_dir)["files"]])
    return [json.loads(source[i]) for i in range(len(source))]


def holdout_split(records: list[dict[str, Any]], holdout_prompts: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), both ascending; see module doc."""
    if holdout_prompts >= len(records):
        raise ValueError(
            f"eval.holdout_prompts {holdout_prompts} leaves none of the {len(records)} prompts for training"
        )
    ranked = sorted(range(len(records)), key=lambda i: _hash(records[i]["id"]))
    held = sorted(ranked[:holdout_prompts])
    held_set = set(held)
    return [i for i in range(len(records)) if i not in held_set], held


def eval_rows(records: list[dict[str, Any]], encoder: RecordEncoder, max_rows: int) -> dict[str, np.ndarray]:
    """Every (record, y(t)) pair of `records` (up to max_rows), encoded as loader rows: BATCH_KEYS arrays [R, ...]."""
    rows = [encoder(r, k) for r in records for k in range(len(r["others"]))][:max_rows]
    return {key: np.stack([row[key] for row in rows]) for key in BATCH_KEYS}


class Evaluator:
    """`evaluator(params) -> metrics` over fixed held-out rows (see module doc)."""

    def __init__(
        self,
        cfg: EvalConfig,
        rows: dict[str, np.ndarray],
        graphdef: nnx.GraphDef,
        loss_cfg: LossConfig,
        mesh: Mesh,
        *,
        stop_tokens: tuple[int, ...],
        pad_id: int,
    ):
        self.cfg, self.graphdef = cfg, graphdef
        self.stop_tokens, self.pad_id = stop_tokens, pad_id
        self.num_rows = len(rows["best"])
        pad = -self.num_rows % cfg.batch_size  # the last batch is filled with copies of row 0, masked in the loss
        self.rows = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in rows.items()}
        self.real = np.arange(self.num_rows + pad) < self.num_rows
        self.loss_rows = dict(self.rows)
        for key in ("best_mask", "worse_mask"):
            self.loss_rows[key] = self.rows[key] & self.real[:, None]
        self.decode_rows = self._decode_inputs(self.rows)
        self._replicated = NamedSharding(mesh, PartitionSpec())

        def losses(params, batch):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                ce, kl = response_token_losses(nnx.merge(graphdef, params), batch, loss_cfg.chunk)
            _, parts = diffpo_loss(ce, kl, batch, loss_cfg, num_tokens=jnp.float32(1.0))
            return parts  # sums over the batch's valid positions (num_tokens 1)

        self._losses = jax.jit(losses)

    def _put(self, x: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(x.shape, self._replicated, lambda idx: x[idx])

    def __call__(self, params: dict) -> dict[str, float]:
        start = time.perf_counter()
        b = self.cfg.batch_size
        ar = con = 0.0
        passes = committed = equal = 0
        distinct = []
        state = nnx.state(nnx.merge(self.graphdef, params))
        for lo in range(0, len(self.real), b):
            parts = jax.device_get(
                self._losses(params, {k: self._put(v[lo : lo + b]) for k, v in self.loss_rows.items()})
            )
            ar, con = ar + float(parts["ar"]), con + float(parts["con"])
            r = self._refine(state, *(x[lo : lo + b] for x in self.decode_rows))
            batch = {k: self.rows[k][lo : lo + b] for k in ("best", "best_mask")}
            for i in np.flatnonzero(self.real[lo : lo + b]):
                length = int(r.lengths[i])
                tokens = r.tokens[i, :length]
                passes, committed = passes + int(r.passes[i]), committed + int(r.committed[i])
                best = batch["best"][i, : int(batch["best_mask"][i].sum())]
                equal += int(length == len(best) and np.array_equal(tokens, best))
                distinct.append(len(set(tokens.tolist())) / max(length, 1))
        total = float(self.loss_rows["best_mask"].sum())
        return {
            "eval_ar": ar / total,
            "eval_con": con / total,
            "eval_passes_per_token": passes / max(committed, 1),
            "eval_tokens_per_pass": committed / max(passes, 1),
            "eval_equal_best": equal / self.num_rows,
            "eval_distinct": float(np.mean(distinct)),
            "eval_seconds": time.perf_counter() - start,
        }

    def _decode_inputs(self, rows: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """(prompts, prompt lengths, drafts, draft lengths) for jacobi_decode: the loader's left-padded
        prompts right-padded, the y(t) rows as drafts padded to N + block."""
        prompt_lens = rows["prompt_mask"].sum(axis=1).astype(np.int32)
        prompts = np.full_like(rows["prompt"], self.pad_id)
        for i, (row, mask) in enumerate(zip(rows["prompt"], rows["prompt_mask"])):
            prompts[i, : prompt_lens[i]] = row[mask]
        n, w = rows["worse"].shape[1], self.cfg.block_size
        drafts = np.full((len(prompts), n + w), self.pad_id, np.int32)
        drafts[:, :n] = np.where(rows["worse_mask"], rows["worse"], self.pad_id)
        return prompts, prompt_lens, drafts, rows["worse_mask"].sum(axis=1).astype(np.int32)

    def _refine(self, state: nnx.State, prompts, prompt_lens, drafts, draft_lens):
        """Jacobi-refine one batch of drafts into the greedy answers of the current weights."""
        n = drafts.shape[1] - self.cfg.block_size
        r = jacobi_decode(
            self.graphdef,
            state,
            self._put(prompts),
            self._put(prompt_lens),
            self._put(drafts),
            self._put(draft_lens),
            block_size=self.cfg.block_size,
            max_new_tokens=n,
            stop_tokens=self.stop_tokens,
            pad_id=self.pad_id,
            max_iterations=n,
        )
        return jax.device_get(r)


def make_evaluator(
    cfg: EvalConfig,
    loss_cfg: LossConfig,
    records: list[dict[str, Any]],
    encoder: RecordEncoder,
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    *,
    stop_tokens: tuple[int, ...],
    max_rows: int | None = None,
) -> Evaluator:
    """An Evaluator over the (prompt, y(t)) rows of `records` (the first `max_rows`, default cfg.max_rows);
    `stop_tokens`: where refinement ends a row (the model's `LoadedModel.stop_tokens`, where `refine` stops)."""
    rows = eval_rows(records, encoder, cfg.max_rows if max_rows is None else max_rows)
    return Evaluator(cfg, rows, graphdef, loss_cfg, mesh, stop_tokens=stop_tokens, pad_id=encoder.pad_id)
