"""Decoding slots with row refill (continuous batching), shared by the Jacobi and AR decoders.

A decoder's loop state is a struct dataclass of B slots: every field has the slot axis first, except the
KV cache ([L, B, S, Kv, D]: second). `rows` / `put_rows` read and write some slots of it, `place` splits
the slots over a mesh's data x fsdp devices. `stream` runs any number of rows through the slots: each
slot decodes one row at a time; when rows finish, the jitted loop returns to the host, which moves their
results out and starts the next rows in their slots, so no slot idles while the slowest row of a batch
finishes. Rows are independent of each other, so each row's result is the one a single batch gives it.
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


def stream(
    s: S,
    num_rows: int,
    *,
    begin: Callable[[S, int, int], S],
    advance: Callable[[S, np.ndarray], S],
    result: Callable[[S], Any],
) -> dict[str, np.ndarray]:
    """Rows 0..num_rows-1 (num_rows >= 1) through the slots of `s` (all empty: done) with row refill.

    begin(s, slot, row): the slot starts decoding the row; advance(s, watch): the loop, until a `watch`
    slot's row is done (or every slot is); result(s): a struct dataclass of per-slot results. Returns
    each result field as a numpy array in row order."""
    batch_size = s.done.shape[0]
    slot_row = np.full(batch_size, -1)  # the row each slot decodes, -1: none
    pending = iter(range(num_rows))
    out: dict[str, np.ndarray] = {}

    def refill(s: S, slot: int) -> S:
        row = next(pending, None)
        slot_row[slot] = -1 if row is None else row
        return s if row is None else begin(s, slot, row)

    for slot in range(batch_size):
        s = refill(s, slot)
    while (slot_row >= 0).any():
        s = advance(s, slot_row >= 0)
        done, got = jax.device_get((s.done, fields(result(s))))
        for slot in np.flatnonzero((slot_row >= 0) & done):
            for name, value in got.items():
                out.setdefault(name, np.zeros((num_rows, *value.shape[1:]), value.dtype))[slot_row[slot]] = value[slot]
            s = refill(s, slot)
    return out
