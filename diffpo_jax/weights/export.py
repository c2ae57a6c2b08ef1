"""Params -> an HF folder that `transformers` loads as LlamaForCausalLM / Gemma2ForCausalLM.

The folder: `model.safetensors` (or `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`
past `max_shard_size`), `config.json` (`cfg.to_hf()`), `generation_config.json` (the source model's, carried
through the Orbax dirs, else the config's token ids) and the tokenizer's
files (chat template included). Tensor names and layouts come from `weight_specs(cfg)` / `WeightSpec.to_hf`,
the same table the loader reads with; tied embeddings write no `lm_head`.

Params may be sharded over any mesh: each tensor (one layer of a stacked parameter at a time) is
brought to the host on its own, so the host holds at most one shard file's tensors, never the whole
model. In one process a tensor's shards are copied to the host and assembled there (no device holds
more than its own shard); in a multi-host run every process takes part in a gather of it (replicated
over the devices, one tensor at a time) and only process 0 writes. The folder is written to a temp dir
beside `out_dir` and renamed at the end; `out_dir` may be a URL (paths.py).
Dtype: `export_checkpoint` writes a model dir in its stored dtype and a train run / step dir (fp32
master weights) in bfloat16, unless told otherwise (float32, bfloat16 or float16). A LoRA run exports
as its merged model (base + adapters, `sources.restore_model_params`).

`export_peft`: a LoRA run's adapters alone -> a PEFT adapter folder (`adapter_config.json`,
`adapter_model.safetensors` in fp32, or bf16 / fp16, under PEFT's names (weights/peft.py), e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` [r, in]; lora.py), which
`peft.PeftModel.from_pretrained(base, OUT)` loads on the transformers base.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file
from tqdm import tqdm

from diffpo_jax.config import ModelConfig
from diffpo_jax.distributed import is_main_process
from diffpo_jax.lora import ADAPTER_WEIGHTS, read_adapter_config, write_adapter_config
from diffpo_jax.paths import as_path, is_url, written_locally
from diffpo_jax.sources import EMBEDDED, HUB_ID, restore_model_params
from diffpo_jax.weights.checkpoint import (
    CheckpointError,
    check_out_dir,
    is_orbax_dir,
    is_train_run,
    model_files_dir,
    read_generation_config,
    read_orbax_config,
    restore_params,
    staged_dir,
    tokenizer_from_dir,
    write_model_files,
)
from diffpo_jax.weights.hf import WeightSpec, weight_specs
from diffpo_jax.weights.peft import adapter_specs, peft_name

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes in "5GB" / "500MB" / "2GiB" / "1000" (HF's convention: GB = 10**9, GiB = 2**30)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"max shard size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def hf_tensors(cfg: ModelConfig) -> list[tuple[str, WeightSpec, int | None]]:
    """(HF name, spec, layer index or None) for every tensor of the HF state dict."""
    specs = weight_specs(cfg)
    flat = [(s.hf_name, s, None) for s in specs if not s.stacked]
    return flat + [(s.hf_name.format(i=i), s, i) for i in range(cfg.num_layers) for s in specs if s.stacked]


@functools.lru_cache
def _gather_fn(out_sharding: jax.sharding.Sharding | None, stacked: bool):
    """jit: a whole parameter, or one layer of a stacked one, onto `out_sharding` (None: as XLA shards it)."""
    if stacked:
        return jax.jit(lambda a, i: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), out_shardings=out_sharding)
    return jax.jit(lambda a: a, out_shardings=out_sharding)


def host_tensor(x: jax.Array, layer: int | None) -> np.ndarray:
    """`x` (or its layer `layer`) as a host array (module doc). A collective when `x` spans processes:
    every process calls it; each gets the full tensor from one of its own devices."""
    if x.is_fully_addressable:  # one process: shards to the host, assembled there
        return np.asarray(x if layer is None else _gather_fn(None, True)(x, np.int32(layer)))
    return replicated_host_tensor(x, layer)


def replicated_host_tensor(x: jax.Array, layer: int | None) -> np.ndarray:
    """`host_tensor` across processes: the tensor (or layer) replicated onto every device, then read from
    one of this process's own."""
    s = x.sharding
    replicated = NamedSharding(s.mesh, PartitionSpec()) if isinstance(s, NamedSharding) else s
    y = _gather_fn(replicated, False)(x) if layer is None else _gather_fn(replicated, True)(x, np.int32(layer))
    return np.asarray(y.addressable_data(0))


def _plan_shards(cfg: ModelConfig, params: dict, itemsize: int, max_bytes: int) -> list[list[tuple]]:
    """Tensors grouped into shard files of at most `max_bytes` (a larger tensor gets a file of its own)."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for name, spec, layer in hf_tensors(cfg):
        shape = _at(params, spec.path).shape[1:] if spec.stacked else _at(params, spec.path).shape
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, spec, layer))
        size += nbytes
    return shards


def _at(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def write_safetensors(out_dir: os.PathLike, cfg: ModelConfig, params: Any, dtype: str, max_shard_size: int) -> None:
    """The safetensors file(s) (and index when sharded) of `params` (an nnx.State or its pure dict)."""
    params = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    np_dtype = DTYPES[dtype]
    shards = _plan_shards(cfg, params, np_dtype.itemsize, max_shard_size)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    )
    weight_map, total = {}, 0
    bar = tqdm(total=sum(map(len, shards)), desc="export", unit="tensor", disable=None if is_main_process() else True)
    out_dir = as_path(out_dir)
    for file, shard in zip(files, shards):
        tensors = {}
        for name, spec, layer in shard:
            ours = host_tensor(_at(params, spec.path), layer)
            tensors[name] = np.ascontiguousarray(spec.to_hf(ours.astype(np_dtype)))
            weight_map[name] = file
            total += tensors[name].nbytes
            bar.update()
        if is_main_process():
            with written_locally(out_dir) as local:  # safetensors writes local files only
                save_file(tensors, os.fspath(local / file), metadata={"format": "pt"})
    bar.close()
    if is_main_process() and len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def generation_config(cfg: ModelConfig) -> dict[str, Any]:
    """generation_config.json: the special token ids transformers' generate() needs."""
    eos = list(cfg.eos_token_ids)
    ids = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
    }
    return {k: v for k, v in ids.items() if v is not None}


def export_hf(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    params: Any,
    tokenizer: Any = None,
    *,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    generation: dict | None = None,
) -> epath.Path:
    """Write `params` (nnx.State or pure dict, any sharding) as an HF folder in `dtype` (default: cfg.param_dtype);
    generation_config.json is `generation` (the source model's) or, without one, the config's token ids."""
    dtype = dtype or cfg.param_dtype
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    out_dir = as_path(out_dir)
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        write_safetensors(tmp, cfg, params, dtype, max_bytes)
        write_model_files(tmp, cfg.replace(param_dtype=dtype), tokenizer, generation or generation_config(cfg))
    return out_dir


def export_checkpoint(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> epath.Path:
    """An Orbax model dir, train run dir (latest step) or step dir -> an HF folder (see `export_hf`).
    Params are restored onto `mesh` (one device when None); dtype defaults to the stored one for a model
    dir and to bfloat16 for a train run or step dir (module doc)."""
    out_dir = as_path(out_dir)
    check_out_dir(out_dir, overwrite)  # before the (possibly long) restore
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    cfg = read_orbax_config(ckpt)
    dtype = dtype or ("bfloat16" if is_train_run(ckpt) else cfg.param_dtype)
    params = restore_model_params(ckpt, cfg, mesh)
    files = model_files_dir(ckpt)
    return export_hf(
        out_dir,
        cfg,
        params,
        tokenizer_from_dir(files),
        dtype=dtype,
        max_shard_size=max_bytes,
        overwrite=overwrite,
        generation=read_generation_config(files),
    )


def peft_tensors(cfg: ModelConfig, adapters: dict) -> dict[str, np.ndarray]:
    """PEFT's state dict of the adapters of a model of `cfg` (nested dict of arrays, any sharding): per
    layer and targeted projection, A^T [r, in] and B^T [out, r] under `peft_name`, fp32 host arrays (one
    layer at a time, as `host_tensor` brings them)."""
    out = {}
    for spec in adapter_specs(cfg):
        *module, name = spec.path
        adapter = _at(adapters, module)[f"{name}_lora"]
        for i in range(cfg.num_layers):
            for ours in ("lora_a", "lora_b"):
                out[peft_name(spec, i, ours)] = np.ascontiguousarray(host_tensor(adapter[ours], i).T, np.float32)
    return out


def peft_base(base: str) -> str | None:
    """Why peft cannot load `base` (a LoRA run's base, as its adapter_config.json names it), or None when
    it can: a hub id, or an HF folder (config.json and safetensors weights, not an Orbax dir)."""
    if base in ("", EMBEDDED):
        return "the embedded GGUF model"
    if is_url(base) or Path(base).expanduser().exists():
        path = as_path(base)
        if path.is_file():
            return "a file, not an HF folder"
        if is_orbax_dir(path):
            return "an Orbax dir: convert to-hf exports it as an HF folder"
        if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
            return "not an HF folder (config.json and *.safetensors)"
        return None
    return None if HUB_ID.match(base) else "neither a hub id nor a folder"


def export_peft(
    run: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    say=print,
) -> epath.Path:
    """A LoRA train run dir (latest step) or step dir -> a PEFT adapter folder (module doc), tensors in `dtype`.
    Its base_model_name_or_path is the run's base; when peft cannot load that, `say` tells so in one line."""
    out_dir = as_path(out_dir)
    check_out_dir(out_dir, overwrite)
    found = read_adapter_config(model_files_dir(run))
    if found is None:
        raise CheckpointError(f"{run}: not a LoRA run (no adapter_config.json); to-hf exports its model")
    lora = found.lora()
    cfg = read_orbax_config(run).replace(lora=lora)
    tensors = {
        name: t.astype(DTYPES[dtype])
        for name, t in peft_tensors(cfg, nnx.to_pure_dict(restore_params(run, cfg, mesh, nnx.LoRAParam))).items()
    }
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        if is_main_process():
            with written_locally(tmp) as local:
                save_file(tensors, os.fspath(local / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_adapter_config(tmp, lora, found.base)
    why = peft_base(found.base)
    if why is not None:
        say(
            f"note: {out_dir}: peft cannot load its base_model_name_or_path {found.base!r} ({why}); diffpo_jax "
            "can: give peft an HF export of that model as the base"
        )
    return out_dir
