"""Decoding slots with row refill (continuous batching), shared by the Jacobi and AR decoders.

A decoder's loop state is a struct dataclass of B slots: every field has the slot axis first, except the
KV cache ([L, B, S, Kv, D]: second). `rows` / `put_rows` read and write some slots of it (`prefix` /
`put_prefix`: the first ones), `place` splits the slots over a mesh's data x fsdp devices, `start` begins
rows in a loop carrying the state (one row's prefill at a time: the decoders' `_start`, which a one-batch
decode and a stream's first B rows run).
`stream` runs any number of rows through the slots: each slot decodes one row at a time; when rows
finish, the jitted loop returns to the host, which moves their results out and starts the next rows in
their slots, so no slot idles while the slowest row of a batch finishes. Rows are independent of each
other, so each row's result is the one a single batch gives it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffpo_jax.sharding import KV_CACHE, constrain, logical_to_spec

S = TypeVar("S")  # a decoder's loop state


def fields(s) -> dict[str, Any]:
    """The fields of a struct dataclass that are set (not None), by name."""
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if getattr(s, f.name) is not None}


def rows(s: S, slots: jax.Array) -> S:
    """The slots `slots` of `s`."""
    return s.replace(
        **{k: jax.tree.map(lambda x: x[:, slots], v) if k == "cache" else v[slots] for k, v in fields(s).items()}
    )


def put_rows(s: S, slots: jax.Array, sub: S) -> S:
    """`s` with its slots `slots` replaced by the rows of `sub`."""
    return s.replace(
        **{
            k: jax.tree.map(lambda x, y: x.at[:, slots].set(y), v, getattr(sub, k))
            if k == "cache"
            else v.at[slots].set(getattr(sub, k))
            for k, v in fields(s).items()
        }
    )


def prefix(s: S, count: int) -> S:
    """Slots 0..count-1 of `s` (a static slice: what `put_prefix` writes back in place)."""
    return s.replace(
        **{
            k: jax.tree.map(lambda x: jax.lax.slice_in_dim(x, 0, count, axis=1), v)
            if k == "cache"
            else jax.lax.slice_in_dim(v, 0, count)
            for k, v in fields(s).items()
        }
    )


def put_prefix(s: S, sub: S) -> S:
    """`s` with its first slots replaced by the rows of `sub` (a `prefix` of it)."""
    return s.replace(
        **{
            k: jax.tree.map(lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, 0, axis=1), v, getattr(sub, k))
            if k == "cache"
            else jax.lax.dynamic_update_slice_in_dim(v, getattr(sub, k), 0, axis=0)
            for k, v in fields(s).items()
        }
    )


def _axes(name: str, x) -> tuple[str | None, ...]:
    """A state field's logical axes: the cache's, or the slot axis first and the rest replicated."""
    return KV_CACHE if name == "cache" else ("batch", *[None] * (x.ndim - 1))


def place_shardings(s: S, mesh: Mesh) -> S:
    """The NamedSharding of every array of `s` (arrays or ShapeDtypeStructs): its slots split over the
    mesh's batch devices and the cache's heads over `tensor` (the logical-axis table), in the form jit
    gives its outputs (no trailing None: P('data', None) would compile a second time)."""

    def one(name, x):
        spec = tuple(logical_to_spec(_axes(name, x), x.shape, mesh))
        while spec and spec[-1] is None:
            spec = spec[:-1]
        return NamedSharding(mesh, PartitionSpec(*spec))

    return s.replace(**{k: jax.tree.map(lambda x, k=k: one(k, x), v) for k, v in fields(s).items()})


def place(s: S, mesh: Mesh | None) -> S:
    """`s` at `place_shardings`, which `constrain_state` pins the decoders' outputs to: one sharding in and
    out, so the jitted loop and refill compile once (as it is without a mesh)."""
    return s if mesh is None else jax.tree.map(jax.device_put, s, place_shardings(s, mesh))


def constrain_state(s: S) -> S:
    """`s` pinned to `place`'s shardings under the current mesh (sharding.constrain; unchanged without one)."""
    return s.replace(**{k: jax.tree.map(lambda x, k=k: constrain(x, _axes(k, x)), v) for k, v in fields(s).items()})


def start(s: S, rows: tuple[jax.Array, ...], begin: Callable[[S, jax.Array, tuple[jax.Array, ...]], S]) -> S:
    """Slots 0..R-1 of `s` start decoding rows 0..R-1 (`rows`: arrays with the R rows first, inside a jitted
    function): begin(s, slots int32 [1], the row's arrays [1, ...]) one row after the other in a loop that
    carries `s`, so starting a batch holds one row's prefill at a time, as row refill does, never R rows'
    activations (8 rows' prefill held 7 KV caches of temp, bench/decode_memory.py)."""

    def one(r, s):
        return begin(s, r[None], tuple(jax.lax.dynamic_slice_in_dim(x, r, 1) for x in rows))

    return constrain_state(jax.lax.fori_loop(0, rows[0].shape[0], one, s))


def stream(
    s: S,
    num_rows: int,
    *,
    begin: Callable[[S, int, int], S],
    advance: Callable[[S, np.ndarray], S],
    result: Callable[[S], Any],
) -> dict[str, np.ndarray]:
    """Rows 0..num_rows-1 (num_rows >= 1) through the slots of `s`, whose first min(num_rows, B) slots
    already decode rows 0, 1, .. (the decoders' `_start`) and the rest are empty (done), with row refill.

    begin(s, slot, row): the slot starts decoding the row; advance(s, watch): the loop, until a `watch`
    slot's row is done (or every slot is; once no row waits for a slot, nothing is watched: finished rows
    keep their results, so the loop runs to the end in one call); result(s): a struct dataclass of
    per-slot results. Returns each result field as a numpy array in row order."""
    batch_size = s.done.shape[0]
    started = min(num_rows, batch_size)
    slot_row = np.where(np.arange(batch_size) < started, np.arange(batch_size), -1)  # the row each slot decodes
    next_row = started  # the next row to wait for a slot
    out: dict[str, np.ndarray] = {}
    while (slot_row >= 0).any():
        s = advance(s, (slot_row >= 0) & (next_row < num_rows))
        done, got = jax.device_get((s.done, fields(result(s))))
        for slot in np.flatnonzero((slot_row >= 0) & done):
            for name, value in got.items():
                out.setdefault(name, np.zeros((num_rows, *value.shape[1:]), value.dtype))[slot_row[slot]] = value[slot]
            slot_row[slot] = next_row if next_row < num_rows else -1
            if next_row < num_rows:
                s = begin(s, slot, next_row)
                next_row += 1
    return out
