"""Logical axes -> mesh axes, in one table; mesh construction; sharding of params and batches.

Every parameter declares logical axes (`logical_axes` metadata on its `nnx.Param`). Parameters under
`layers` are stacked along a leading `layers` axis (see model.py), which is never sharded. The mesh
has three axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded), `tensor`
(heads / mlp split; the vocabulary splits over fsdp x tensor). A dimension that its mesh axes do not
divide evenly stays replicated (`indivisible_dims` lists them; the trainer reports them at start-up).
A `tensor` group must sit within one host (`make_mesh` checks it).

Activations use the same table through `constrain(x, axes)`: inside a function traced under a
(data, fsdp, tensor) mesh (the train step sets it, see training/step.py) it pins `x` to its logical
axes; without one (decoding, single-device scoring) it returns `x` unchanged. Activation dimensions
along the model width take `None` (replicated): `embed` -> `fsdp` is for weights, and the batch
already uses `fsdp`. Pinning matters for FSDP: without it XLA may keep the weights where they are
and move the activations instead, i.e. hold whole-global-batch activation buffers on every device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
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
KV_CACHE = ("layers", "batch", "seq", "kv_heads", "head_dim")  # the decoders' KV cache [L, B, S, Kv, D]


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `device_grid`; one -1 entry takes the remaining devices.

    Axis types are Auto (jit propagates shardings from the arguments' NamedShardings); jax 0.10's
    `make_mesh` would otherwise default to Explicit.
    """
    grid = device_grid(shape, list(devices if devices is not None else jax.devices()))
    check_tensor_within_host(grid)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def device_grid(shape: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
    """The devices as a (data, fsdp, tensor) grid, laid out by jax's device-mesh helpers (topology-aware
    on TPU and GPU). TPU devices of several slices (a multi-slice job: their `slice_index`) make a hybrid
    mesh: `data` spans the slices over DCN, each slice holds data / slices x fsdp x tensor of the grid,
    so only the data-parallel gradient reduction crosses slices."""
    shape = resolve_mesh_shape(shape, len(devices))
    slices = len({d.slice_index for d in devices}) if devices[0].platform == "tpu" else 1
    if slices == 1:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    if shape[0] % slices:
        raise ValueError(
            f"mesh shape {list(shape)}: data {shape[0]} is not a multiple of the {slices} slices "
            "(data spans the slices)"
        )
    return mesh_utils.create_hybrid_device_mesh(
        (shape[0] // slices, *shape[1:]), (slices, 1, 1), devices, allow_split_physical_axes=True
    )


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for `num_devices` devices, the one -1 entry taking the rest."""
    shape = list(shape)
    if len(shape) != 3 or shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: need 3 sizes (data, fsdp, tensor), at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ValueError(f"mesh shape {shape}: {num_devices} devices do not divide by {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, have {num_devices}")
    return tuple(shape)


def check_tensor_within_host(grid: np.ndarray) -> None:
    """The devices of each `tensor` group ([d, f, :] of the mesh's device grid) belong to one process:
    tensor parallelism exchanges activations every layer (host-local links, not the network), and each
    process feeds its own batch rows, so a group across hosts would see different rows for one row."""
    for index in np.ndindex(grid.shape[:2]):
        hosts = sorted({d.process_index for d in grid[index]})
        if len(hosts) > 1:
            raise ValueError(
                f"mesh {list(grid.shape)}: the tensor axis ({grid.shape[2]} devices) spans processes "
                f"{', '.join(map(str, hosts))}; it must fit within one host's devices"
            )


def indivisible_dims(state: nnx.State, mesh: Mesh) -> list[str]:
    """Parameter dimensions left replicated because their mesh axes do not divide them, as
    'path dim (logical axis = size) / mesh axes = product' (at pod scale: memory a user should know of)."""
    out = []
    for path, var in nnx.to_flat_state(state):
        axes = param_logical_axes(path, var)
        for i, (name, dim) in enumerate(zip(axes, var.get_value().shape)):
            mesh_axes = tuple(a for a in LOGICAL_RULES[name] if mesh.shape[a] > 1) if name else ()
            size = math.prod(mesh.shape[a] for a in mesh_axes)
            if mesh_axes and dim % size:
                out.append(f"{'.'.join(map(str, path))} dim {i} ({name} = {dim}) / {' x '.join(mesh_axes)} = {size}")
    return out


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
    """Batch-major arrays: the batch split over its mesh axes (LOGICAL_RULES["batch"]), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(LOGICAL_RULES["batch"], *([None] * (ndim - 1))))


def host_array(x: jax.Array) -> np.ndarray:
    """Gather a (possibly sharded) array to a host numpy array."""
    return np.asarray(jax.device_get(x))


def simulate_devices(n: int) -> None:
    """Make jax start with `n` CPU devices (before its first device query; no effect after it): the
    `--plan` options compile for a pod's device count on this machine."""
    import os

    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    jax.config.update("jax_platforms", "cpu")
