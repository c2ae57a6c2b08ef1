"""Where the decoding CLIs (refine, generate, score) run: the mesh of this process's devices and the dtype.

`--mesh D,F,T` is a (data, fsdp, tensor) mesh over the local devices, sharded through the same logical
axis table as training (sharding.LOGICAL_RULES): batch rows split over data x fsdp, parameters over
fsdp and tensor (tensor: attention heads, MLP and with them the KV cache). Default on GPU/TPU: every
local device on the data axis (rows data-parallel, parameters replicated), unless the weights would
fill more than WEIGHT_SHARE of a device's memory (`memory_stats()`): then the smallest tensor-parallel
degree that brings them under it (`default_shape`; the CLIs say so; `--plan` gives the whole picture).
One device on CPU, whose "devices" (XLA_FLAGS=--xla_force_host_platform_device_count) share the same cores.
`--dtype` default: bfloat16 on GPU/TPU, float32 on CPU. In bfloat16 a W-token Jacobi pass and a one-token
AR step round differently, so refinement equals the bfloat16 greedy decode only up to those roundings
(README, "Refining answers").
Several processes (launch/): each decodes its share of the records over its own devices, and process 0
writes the one output file (records/output.py `open_output`); the summary says which process it is.
"""

from __future__ import annotations

import argparse
import math
import sys

import jax
from jax.sharding import Mesh

from diffpo_jax.sharding import MESH_AXES, make_mesh

DTYPES = ("float32", "bfloat16")
WEIGHT_SHARE = 0.6  # of a device's memory the default layout lets the weights take (the rest: cache, activations)


class MeshError(ValueError):
    """A --mesh the devices cannot make, or a batch that does not split over it; str() is the message."""


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="activations and weights (default: bfloat16 on GPU/TPU, float32 on CPU)",
    )
    ap.add_argument(
        "--mesh",
        metavar="D,F,T",
        type=parse_mesh,
        default=None,
        help="(data, fsdp, tensor) mesh over this process's devices, one entry may be -1 "
        "(default: all devices on data on GPU/TPU, one device on CPU)",
    )


def parse_mesh(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or any(x == 0 or x < -1 for x in shape) or shape.count(-1) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected D,F,T (positive integers, at most one -1)")
    return shape


def accelerated() -> bool:
    return jax.default_backend() != "cpu"


def default_dtype(dtype: str | None) -> str:
    return dtype or ("bfloat16" if accelerated() else "float32")


def default_shape(
    weight_bytes: int, num_kv_heads: int, devices: int, device_bytes: int | None
) -> tuple[tuple[int, int, int], str | None]:
    """The default (data, fsdp, tensor) shape on an accelerator and why, when it is not all-data: the
    smallest tensor degree t (dividing the devices and the KV heads) with weight_bytes / t within
    WEIGHT_SHARE of device_bytes (None: unknown, all-data)."""
    if device_bytes:
        for t in range(1, devices + 1):
            if devices % t == 0 and num_kv_heads % t == 0 and weight_bytes / t <= WEIGHT_SHARE * device_bytes:
                why = (
                    None
                    if t == 1
                    else (
                        f"weights of {weight_bytes / 2**30:.1f} GiB do not fit replicated in {WEIGHT_SHARE:.0%} of "
                        f"{device_bytes / 2**30:.1f} GiB per device: tensor-parallel over {t} devices"
                    )
                )
                return (devices // t, 1, t), why
    return (devices, 1, 1), None


def device_memory() -> int | None:
    """Bytes of memory of this process's first device, where the backend reports it (GPU, TPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def decode_mesh(shape: tuple[int, int, int] | None, model: str | None = None, dtype: str | None = None) -> Mesh:
    """The mesh of `--mesh` (default: module doc; `model`, the --model spec, sizes the weights when its
    config is known without downloading) over this process's devices (the first D*F*T of them when the
    shape has no -1); a MeshError names a shape the devices cannot make."""
    devices = jax.local_devices()
    if shape is None and not accelerated():
        shape = (1, 1, 1)
    elif shape is None:
        weights, kv_heads = _weights(model, default_dtype(dtype))
        shape, why = default_shape(weights, kv_heads, len(devices), device_memory())
        if why:
            print(f"mesh: {why} (--mesh sets another layout; --plan shows what fits)", file=sys.stderr)
    if -1 not in shape:
        devices = devices[: math.prod(shape)]  # a mesh may use some of the devices (make_mesh says if too few)
    try:
        return make_mesh(shape, devices=devices)
    except ValueError as e:
        raise MeshError(f"--mesh: {e}") from None


def _weights(model: str | None, dtype: str) -> tuple[int, int]:
    """(weight bytes in `dtype`, KV heads) of model `model`, or (0, 1) when its config is not at hand."""
    from flax import nnx

    from diffpo_jax.config import config_without_weights
    from diffpo_jax.model import abstract_model

    try:
        cfg = config_without_weights(model)
    except (FileNotFoundError, ValueError):
        return 0, 1
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract_model(cfg))))
    return count * jax.numpy.dtype(dtype).itemsize, cfg.num_kv_heads


def check_rows(mesh: Mesh, batch_size: int) -> None:
    """A MeshError unless `batch_size` rows split over the mesh's data x fsdp devices."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise MeshError(
            f"batch size {batch_size} does not split over the mesh's {shards} data x fsdp devices "
            "(pass a multiple, or another --mesh)"
        )


def describe(mesh: Mesh) -> str:
    """e.g. '8 (cpu), mesh data=8 fsdp=1 tensor=1' (the summary's `devices`), then ', process 0 of 2' with
    several processes (each decodes its share of the records over its own devices)."""
    text = f"{mesh.size} ({mesh.devices.flat[0].platform}), mesh " + " ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
    return text + (f", process {jax.process_index()} of {jax.process_count()}" if jax.process_count() > 1 else "")
