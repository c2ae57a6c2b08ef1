"""Where the decoding CLIs (refine, generate, score) run: the mesh of this process's devices and the dtype.

`--mesh D,F,T` is a (data, fsdp, tensor) mesh over the local devices, sharded through the same logical
axis table as training (sharding.LOGICAL_RULES): batch rows split over data x fsdp, parameters over
fsdp and tensor (tensor: attention heads, MLP and with them the KV cache). Default on GPU/TPU: every
local device on the data axis (rows data-parallel, parameters replicated), unless the weights would
fill more than WEIGHT_SHARE of a device's memory (`memory_stats()`): then the smallest tensor-parallel
degree that brings them under it, or else the largest degree that divides the devices and the KV heads
when its share fits the device at all, or else a one-line refusal with the figures (`default_shape`; the
CLIs say so; `--plan` gives the whole picture). The weights are sized from the model's config alone (a
hub id's config.json is the one file fetched; `score` sizes its reward model).
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
    WEIGHT_SHARE of device_bytes (None: unknown, all-data). When no degree brings them under it: the
    largest degree, said in `why`, if its share of the weights fits the device at all; else a MeshError
    with the figures."""
    if not device_bytes:
        return (devices, 1, 1), None
    degrees = [t for t in range(1, devices + 1) if devices % t == 0 and num_kv_heads % t == 0]
    gib = lambda n: f"{n / 2**30:.1f} GiB"
    head = f"weights of {gib(weight_bytes)}"
    for t in degrees:
        if weight_bytes / t <= WEIGHT_SHARE * device_bytes:
            why = (
                f"{head} do not fit replicated in {WEIGHT_SHARE:.0%} of {gib(device_bytes)} per device: "
                f"tensor-parallel over {t} devices"
            )
            return (devices // t, 1, t), None if t == 1 else why
    t = degrees[-1]
    largest = (
        f"the largest degree dividing the {devices} devices and the {num_kv_heads} KV heads, "
        f"{gib(weight_bytes / t)} each"
    )
    if weight_bytes / t > device_bytes:
        raise MeshError(
            f"{head} do not fit {gib(device_bytes)} per device even tensor-parallel over {t} devices ({largest}): "
            "shard them over fsdp too (--mesh D,F,T) or use more devices (--plan shows what fits)"
        )
    why = (
        f"{head} are more than {WEIGHT_SHARE:.0%} of {gib(device_bytes)} per device even tensor-parallel over "
        f"{t} devices ({largest}): tensor-parallel over {t} devices, little memory left for the KV cache"
    )
    return (devices // t, 1, t), why


def device_memory() -> int | None:
    """Bytes of memory of this process's first device, where the backend reports it (GPU, TPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def decode_mesh(
    shape: tuple[int, int, int] | None, model: str | None = None, dtype: str | None = None, *, reward: bool = False
) -> Mesh:
    """The mesh of `--mesh` (default: module doc; `model`, the --model spec, a reward model's when
    `reward`, sizes the weights: `weight_bytes`) over this process's devices (the first D*F*T of them when
    the shape has no -1); a MeshError names a shape the devices cannot make, or weights no default fits."""
    devices = jax.local_devices()
    if shape is None and not accelerated():
        shape = (1, 1, 1)
    elif shape is None:
        weights, kv_heads = weight_bytes(model, default_dtype(dtype), reward=reward)
        shape, why = default_shape(weights, kv_heads, len(devices), device_memory())
        if why:
            print(f"mesh: {why} (--mesh sets another layout; --plan shows what fits)", file=sys.stderr)
    if -1 not in shape:
        devices = devices[: math.prod(shape)]  # a mesh may use some of the devices (make_mesh says if too few)
    try:
        return make_mesh(shape, devices=devices)
    except ValueError as e:
        raise MeshError(f"--mesh: {e}") from None


def weight_bytes(model: str | None, dtype: str, *, reward: bool = False) -> tuple[int, int]:
    """(bytes of the weights in `dtype`, KV heads) of model `model` (`reward`: a reward model's, its head
    included), sized from its config alone: `config.config_without_weights` (presets, local folders, run
    dirs, PEFT folders), else a URL folder's config.json, else a hub id's config.json (only that file is
    fetched: `hf_hub_download`). (0, 1) when no config is at hand (a model that cannot be read fails
    when it loads)."""
    from flax import nnx

    from diffpo_jax.config import ModelConfig, config_without_weights
    from diffpo_jax.model import abstract_model
    from diffpo_jax.reward.model import HeadConfig, abstract_reward_model

    if model is None and reward:
        return 0, 1
    try:
        if reward:
            hf = _config_json(model)
            cfg = ModelConfig.from_hf(hf)
            module = abstract_reward_model(cfg, HeadConfig.from_hf(hf))
        else:
            try:
                cfg = config_without_weights(model)
            except ValueError:
                cfg = ModelConfig.from_hf(_config_json(model))
            module = abstract_model(cfg)
    except (OSError, ValueError, KeyError):  # no config at hand (missing, offline, unsupported): the load says why
        return 0, 1
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module)))
    return count * jax.numpy.dtype(dtype).itemsize, cfg.num_kv_heads


def _config_json(model: str) -> dict:
    """The config.json of a local or URL folder, or of hub repo `model` (that one file downloaded)."""
    import json
    from pathlib import Path

    from diffpo_jax.paths import as_path, is_url

    if is_url(model) or Path(model).expanduser().exists():
        return json.loads((as_path(model) / "config.json").read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(model, "config.json")).read_text())


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
