"""Logical axes -> mesh axes, in one table; mesh construction; sharding of params and batches.

Every parameter declares logical axes (`logical_axes` metadata on its `nnx.Param`). Parameters under
`layers` are stacked along a leading `layers` axis (see model.py), which is never sharded. The mesh
has three axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded), `tensor`
(heads / mlp split; the vocabulary splits over fsdp x tensor). A dimension that its mesh axes do not
divide evenly stays replicated.

Activations use the same table through `constrain(x, axes)`: inside a function traced under a
(data, fsdp, tensor) mesh (the train step sets it, see training/step.py) it pins `x` to its logical
axes; without one (decoding, single-device scoring) it returns `x` unchanged. Activation dimensions
along the model width take `None` (replicated): `embed` -> `fsdp` is for weights, and the batch
already uses `fsdp`. Pinning matters for FSDP: without it XLA may keep the weights where they are
and move the activations instead, i.e. hold whole-global-batch activation buffers on every device.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "head_batch": ("data",),  # rows while the lm head runs vocab-parallel (model.Transformer.head)
    "layers": (),
    "vocab": ("fsdp", "tensor"),  # embedding / lm head: split along the vocabulary only
    "embed": ("fsdp",),
    "lookup_embed": ("fsdp", "tensor"),  # the embedding table's width while tokens are looked up
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "seq": (),
}

RESIDUAL = ("batch", "seq", None)  # logical axes of [B, T, E] activations (the residual stream)


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one -1 entry takes the remaining devices.

    Axis types are Auto (jit propagates shardings from the arguments' NamedShardings); jax 0.10's
    `make_mesh` would otherwise default to Explicit.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != 3 or shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: need 3 sizes (data, fsdp, tensor), at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape}: {len(devices)} devices do not divide by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, have {len(devices)}")
    return jax.make_mesh(
        tuple(shape),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
        devices=devices,
    )


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh | AbstractMesh) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry logical `axes`."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: dict[str, str] = {}
    spec: list[Any] = []
    for name, dim in zip(axes, shape):
        mesh_axes = tuple(a for a in LOGICAL_RULES[name] if mesh.shape[a] > 1) if name else ()
        for a in mesh_axes:
            if a in used:
                raise ValueError(f"logical axes {used[a]!r} and {name!r} both map to mesh axis {a!r}")
            used[a] = name
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_logical_axes(path: tuple, var: nnx.Variable) -> tuple[str, ...]:
    """A parameter's logical axes, with the stacking axis for the layer-stacked ones (the modules created
    under `nnx.vmap` declare the axes of one layer, so their arrays have one dimension more)."""
    axes = tuple(var.get_metadata()["logical_axes"])
    return ("layers", *axes) if len(var.get_value().shape) == len(axes) + 1 else axes


def param_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding for every parameter in `state` (arrays or ShapeDtypeStructs)."""

    def one(path, var):
        axes = param_logical_axes(path, var)
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, var.get_value().shape, mesh)))

    return nnx.map_state(one, state)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`x` pinned to the sharding of its logical `axes` under the current (data, fsdp, tensor) mesh
    (`jax.sharding.use_abstract_mesh`); unchanged when no such mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tuple(mesh.axis_names) != MESH_AXES:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-major arrays: the batch split over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def host_array(x: jax.Array) -> np.ndarray:
    """Gather a (possibly sharded) array to a host numpy array."""
    return np.asarray(jax.device_get(x))
