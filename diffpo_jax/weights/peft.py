"""PEFT adapter folders: their tensor names, and reading one into our adapters.

A PEFT LoRA folder holds `adapter_config.json` (lora.py reads it) and `adapter_model.safetensors`: per
layer and targeted projection, `base_model.model.<HF module>.lora_A.weight` = A^T [r, in] and
`lora_B.weight` = B^T [out, r] (in / out flattened as HF's Linear has them). Ours are stacked over layers,
`lora_a` [L, in, r] and `lora_b` [L, r, out] beside the projection (model.py); weights/export.py writes
PEFT's names with `peft_name`, `read_peft_adapters` reads them back (any peft LoRA adapter whose
adapter_config.json lora.py accepts: per-module ranks zero-padded to the largest, per-module scales folded
into B).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flax import nnx

from diffpo_jax.config import LoraConfig, ModelConfig
from diffpo_jax.lora import ADAPTER_WEIGHTS, TARGETS, AdapterConfig
from diffpo_jax.model import abstract_model
from diffpo_jax.weights.hf import WeightsError, WeightSpec, safetensors_tensors, weight_specs

_OURS = {"lora_a": "lora_A", "lora_b": "lora_B"}  # ours: PEFT's


def peft_name(spec: WeightSpec, layer: int, ours: str) -> str:
    """PEFT's tensor name of adapter matrix `ours` ("lora_a" / "lora_b") of projection `spec` in `layer`."""
    return f"base_model.model.{spec.hf_name.format(i=layer).removesuffix('.weight')}.{_OURS[ours]}.weight"


def adapter_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """The projections of a model of `cfg` that carry adapters (cfg.lora's target_modules)."""
    return [
        s for s in weight_specs(cfg) if s.stacked and s.path[-1] in TARGETS and s.path[-1] in cfg.lora.target_modules
    ]


def read_peft_adapters(folder: str | os.PathLike, cfg: ModelConfig, adapter: AdapterConfig) -> tuple[LoraConfig, dict]:
    """The adapters of PEFT folder `folder` on a model of `cfg` (`adapter`: its adapter_config.json) as one
    LoraConfig and the nested dict of fp32 host arrays a model of cfg.replace(lora=...) takes. peft may give
    each module its own rank and scale (rank_pattern, alpha_pattern, use_rslora) or none (target_modules,
    exclude_modules, layers_to_transform): each module's scale is folded into its B and its rank padded
    with zeros to the largest (A B unchanged), an untargeted layer's adapter is zero, and the LoraConfig
    has scale 1. Every tensor the config implies must be there with its shape, and no other: a missing,
    misshapen or unknown tensor is a WeightsError naming it (a wrong rank names the rank's source)."""
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise WeightsError(f"{path}: missing (adapters load from safetensors: peft saves {ADAPTER_WEIGHTS} by default)")
    stored = safetensors_tensors(path)
    modules = {}  # (spec, layer) -> (rank, scale, the rank's source), for the targeted ones
    for spec in weight_specs(cfg):
        if spec.stacked and spec.path[-1] in TARGETS:
            for i in range(cfg.num_layers):
                key = spec.hf_name.format(i=i).removesuffix(".weight")
                if adapter.targets(key):
                    modules[spec, i] = adapter.module(key)
    if not modules:
        raise WeightsError(
            f"{adapter.path}: target_modules {adapter.target_modules!r} names none of this model's projections"
        )
    rank = max(r for r, _, _ in modules.values())
    names = tuple(dict.fromkeys(spec.path[-1] for spec, _ in modules))
    lora = LoraConfig(rank=rank, alpha=float(rank), target_modules=names)
    shapes = nnx.to_pure_dict(nnx.state(abstract_model(cfg.replace(lora=lora)), nnx.LoRAParam))
    out, expected = {}, set()
    for spec in adapter_specs(cfg.replace(lora=lora)):
        *module, name = spec.path
        node, mine = out, shapes
        for key in module:
            node, mine = node.setdefault(key, {}), mine[key]
        a_shape, b_shape = mine[f"{name}_lora"]["lora_a"].shape, mine[f"{name}_lora"]["lora_b"].shape
        a, b = np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)
        for i in range(cfg.num_layers):
            if (spec, i) not in modules:
                continue
            r, scale, source = modules[spec, i]
            for ours, want, target in (("lora_a", (r, a_shape[1]), a), ("lora_b", (b_shape[2], r), b)):
                key = peft_name(spec, i, ours)
                expected.add(key)
                if key not in stored:
                    raise WeightsError(f"{path}: tensor {key!r} is missing (adapter_config.json targets its module)")
                got = stored[key].shape
                rank_dim = 0 if ours == "lora_a" else 1
                if len(got) == 2 and got[1 - rank_dim] == want[1 - rank_dim] and got[rank_dim] != r:
                    raise WeightsError(
                        f"{path}: tensor {key!r} has rank {got[rank_dim]}, but {adapter.path} gives its module {source}"
                    )
                if got != want:
                    raise WeightsError(f"{path}: tensor {key!r} has shape {got}, the base and rank {r} expect {want}")
                t = np.asarray(stored[key].array(), np.float32).T
                if ours == "lora_a":
                    target[i, :, :r] = t
                else:
                    target[i, :r, :] = scale * t
        node[f"{name}_lora"] = {"lora_a": a, "lora_b": b}
    unknown = sorted(set(stored) - expected)
    if unknown:
        raise WeightsError(f"{path}: {len(unknown)} tensors this model's adapters do not have, e.g. {unknown[0]!r}")
    return lora, out
