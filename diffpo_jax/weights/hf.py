"""HuggingFace weights: the one name map (both directions), safetensors reading, sharded loading.

`weight_specs(cfg)` lists every parameter once: its path in the NNX state, its HF tensor name and how
the layouts relate. HF stores Linear weights as [out, in]; we store [in..., out...] with heads split
out (q: [E, H, D], o: [H, D, E]), so `to_ours` is a transpose + reshape and `to_hf` its inverse.

Loading never materialises the model on the host: each parameter is built with
`jax.make_array_from_callback`, whose callback reads only the slice one device needs from the
memory-mapped file (one layer at a time for stacked parameters).
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import Protocol

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from diffpo_jax.config import ModelConfig
from diffpo_jax.model import Transformer, abstract_model
from diffpo_jax.sharding import param_shardings


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    path: tuple[str, ...]  # in the NNX state
    hf_name: str  # "{i}" is the layer index for stacked parameters
    in_dims: int  # leading dims of ours that are HF's input dim; 0: same layout as HF (no transpose)

    @property
    def stacked(self) -> bool:
        """One HF tensor per layer, stacked along our leading layer axis."""
        return "{i}" in self.hf_name

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """HF shape for one (unstacked) parameter of our `shape`."""
        if not self.in_dims:
            return shape
        return (math.prod(shape[self.in_dims :]), math.prod(shape[: self.in_dims]))

    def to_ours(self, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (hf.T if self.in_dims else hf).reshape(shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return ours.reshape(self.hf_shape(ours.shape)[::-1]).T if self.in_dims else ours


def weight_specs(cfg: ModelConfig) -> list[WeightSpec]:
    layer = "model.layers.{i}."
    specs = [WeightSpec(("embed",), "model.embed_tokens.weight", 0)]
    norms = [("input_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm")]
    if cfg.sandwich_norms:
        norms += [("pre_mlp_norm", "pre_feedforward_layernorm"), ("post_mlp_norm", "post_feedforward_layernorm")]
    specs += [WeightSpec(("layers", ours, "scale"), f"{layer}{hf}.weight", 0) for ours, hf in norms]
    specs += [
        WeightSpec(("layers", "attn", n), f"{layer}self_attn.{n}.weight", 2 if n == "o_proj" else 1)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    specs += [
        WeightSpec(("layers", "mlp", n), f"{layer}mlp.{n}.weight", 1) for n in ("gate_proj", "up_proj", "down_proj")
    ]
    specs.append(WeightSpec(("final_norm", "scale"), "model.norm.weight", 0))
    if not cfg.tie_word_embeddings:
        specs.append(WeightSpec(("lm_head",), "lm_head.weight", 1))
    return specs


class Checkpoint(Protocol):
    """What a weights file offers the loader (safetensors here, GGUF in gguf.py)."""

    path: Path

    def hf_config(self) -> dict: ...

    def names(self) -> list[str]: ...

    def get(self, name: str) -> np.ndarray:
        """The tensor in HF layout; may be a lazy memory map (slice it before converting)."""
        ...


_ST_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
}


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor table, data start offset) of a .safetensors file, validated against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: corrupt safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise WeightsError(f"{path}: corrupt safetensors file (header length {n} past end of file)")
        try:
            table = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(f"{path}: corrupt safetensors file (header is not JSON)") from None
    table.pop("__metadata__", None)
    for name, t in table.items():
        if not isinstance(t, dict) or {"dtype", "shape", "data_offsets"} - t.keys():
            raise WeightsError(f"{path}: corrupt safetensors file (bad entry for {name!r})")
        if t["dtype"] not in _ST_DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {t['dtype']}")
        start, end = t["data_offsets"]
        expect = math.prod(t["shape"]) * np.dtype(_ST_DTYPES[t["dtype"]]).itemsize
        if end - start != expect or 8 + n + end > size:
            raise WeightsError(f"{path}: corrupt safetensors file (tensor {name!r} data out of bounds)")
    return table, 8 + n


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a .safetensors file lies; `array()` memory-maps it (read when sliced or converted).
    Mapped on demand, not up front: each map holds a file descriptor, and a large model has thousands of tensors."""

    path: Path
    dtype: str
    offset: int
    shape: tuple[int, ...]

    def array(self) -> np.ndarray:
        return np.memmap(self.path, dtype=_ST_DTYPES[self.dtype], mode="r", offset=self.offset, shape=self.shape)


def safetensors_tensors(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of a .safetensors file by name (validated: `read_safetensors_header`)."""
    table, start = read_safetensors_header(path)
    return {
        name: StoredTensor(path, t["dtype"], start + t["data_offsets"][0], tuple(t["shape"]))
        for name, t in table.items()
    }


class SafetensorsCheckpoint:
    """An HF model folder: config.json + model.safetensors or sharded model-*.safetensors + index."""

    def __init__(self, folder: Path):
        self.path = Path(folder)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise WeightsError(f"{index}: not a safetensors index (no weight_map)") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise WeightsError(f"{self.path}: no weights (*.safetensors) in this folder")
        self._tensors: dict[str, StoredTensor] = {}
        for file in files:
            fpath = self.path / file
            if not fpath.is_file():
                raise WeightsError(f"{fpath}: listed in the index but missing")
            self._tensors.update(safetensors_tensors(fpath))

    def hf_config(self) -> dict:
        from diffpo_jax.config import read_hf_config

        return read_hf_config(self.path / "config.json")

    def names(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> np.ndarray:
        if name not in self._tensors:
            raise WeightsError(f"{self.path}: tensor {name!r} is missing")
        return self._tensors[name].array()


def _flat_range(index: tuple[slice, ...], dims: tuple[int, ...]) -> slice | None:
    """The flat range that `index` over `dims` selects, when it is contiguous (only the first dim cut)."""
    bounds = [s.indices(d) for s, d in zip(index, dims)]
    if any(b != (0, d, 1) for b, d in zip(bounds[1:], dims[1:])) or bounds[0][2] != 1:
        return None
    inner = math.prod(dims[1:])
    return slice(bounds[0][0] * inner, bounds[0][1] * inner)


def _read_slice(
    ckpt: Checkpoint, spec: WeightSpec, name: str, shape: tuple[int, ...], index: tuple[slice, ...]
) -> np.ndarray:
    """Our-layout slice `index` of one (unstacked) parameter of `shape`, reading as little as possible."""
    hf = ckpt.get(name)
    if tuple(hf.shape) != spec.hf_shape(shape):
        raise WeightsError(
            f"{ckpt.path}: tensor {name!r} has shape {tuple(hf.shape)}, config expects {spec.hf_shape(shape)}"
        )
    if not spec.in_dims:
        return np.asarray(hf[index])
    k = spec.in_dims
    cols, rows = _flat_range(index[:k], shape[:k]), _flat_range(index[k:], shape[k:])
    if cols is None or rows is None:
        return spec.to_ours(np.asarray(hf), shape)[index]
    sub_shape = tuple(len(range(*s.indices(d))) for s, d in zip(index, shape))
    return spec.to_ours(np.asarray(hf[rows, cols]), sub_shape)


def _at(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def load_params(cfg: ModelConfig, ckpt: Checkpoint, mesh: jax.sharding.Mesh | None = None) -> Transformer:
    """The model with weights from `ckpt`, each parameter placed on its sharding as it is read."""
    return load_module(abstract_model(cfg), weight_specs(cfg), cfg.num_layers, ckpt, mesh)


def load_module(
    abstract: nnx.Module,
    specs: list[WeightSpec],
    num_layers: int,
    ckpt: Checkpoint,
    mesh: jax.sharding.Mesh | None = None,
) -> nnx.Module:
    """`abstract` (an nnx.eval_shape'd module) with every parameter in `specs` read from `ckpt` onto its
    sharding (one device without a mesh); the decoder and the reward models (reward/model.py) share it."""
    graphdef, state = nnx.split(abstract)
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, state)
    else:
        shardings = param_shardings(state, mesh)
    names = set(ckpt.names())
    missing = [s.hf_name for s in specs if not s.stacked and s.hf_name not in names]
    missing += [
        s.hf_name.format(i=i)
        for s in specs
        if s.stacked
        for i in range(num_layers)
        if s.hf_name.format(i=i) not in names
    ]
    if missing:
        raise WeightsError(f"{ckpt.path}: {len(missing)} tensors missing, e.g. {missing[0]!r}")

    for spec in specs:
        var, sharding = _at(state, spec.path), _at(shardings, spec.path)
        if isinstance(sharding, nnx.Variable):
            sharding = sharding.get_value()
        shape, dtype = var.get_value().shape, var.get_value().dtype

        def callback(index, spec=spec, shape=shape, dtype=dtype):
            index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
            if not spec.stacked:
                return _read_slice(ckpt, spec, spec.hf_name, shape, index).astype(dtype)
            layers = range(*index[0].indices(shape[0]))
            return np.stack(
                [_read_slice(ckpt, spec, spec.hf_name.format(i=i), shape[1:], index[1:]).astype(dtype) for i in layers]
            )

        var.set_value(jax.make_array_from_callback(shape, sharding, callback))
    return nnx.merge(graphdef, state)
