"""PEFT adapter folders: their tensor names, and reading one into our adapters.

A PEFT LoRA folder holds `adapter_config.json` (lora.py reads it) and `adapter_model.safetensors`: per
layer and targeted projection, `base_model.model.<HF module>.lora_A.weight` = A^T [r, in] and
`lora_B.weight` = B^T [out, r] (in / out flattened as HF's Linear has them). Ours are stacked over layers,
`lora_a` [L, in, r] and `lora_b` [L, r, out] beside the projection (model.py); weights/export.py writes
PEFT's names with `peft_name`, `read_peft_adapters` reads them back.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flax import nnx

from diffpo_jax.config import ModelConfig
from diffpo_jax.lora import ADAPTER_WEIGHTS, TARGETS
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


def read_peft_adapters(folder: str | os.PathLike, cfg: ModelConfig) -> dict:
    """The adapters of PEFT folder `folder` for a model of `cfg` (cfg.lora from its adapter_config.json), as
    the nested dict of fp32 host arrays the model's LoRA params take. Every tensor the config implies must be
    there with its shape, and no other: a missing, misshapen or unknown tensor is a WeightsError naming it."""
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise WeightsError(f"{path}: missing (a PEFT adapter folder holds adapter_config.json and {ADAPTER_WEIGHTS})")
    stored = safetensors_tensors(path)
    shapes = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.LoRAParam))
    out, expected = {}, set()
    for spec in adapter_specs(cfg):
        *module, name = spec.path
        node, mine = out, shapes
        for key in module:
            node, mine = node.setdefault(key, {}), mine[key]
        node[f"{name}_lora"] = {}
        for ours, shape in mine[f"{name}_lora"].items():
            layers = []
            for i in range(cfg.num_layers):
                key = peft_name(spec, i, ours)
                expected.add(key)
                if key not in stored:
                    raise WeightsError(f"{path}: tensor {key!r} is missing (target_modules names {name})")
                want = tuple(shape.shape[1:][::-1])
                if stored[key].shape != want:
                    raise WeightsError(
                        f"{path}: tensor {key!r} has shape {stored[key].shape}, the base and r "
                        f"= {cfg.lora.rank} expect {want}"
                    )
                layers.append(np.asarray(stored[key].array(), np.float32).T)
            node[f"{name}_lora"][ours] = np.stack(layers)
    unknown = sorted(set(stored) - expected)
    if unknown:
        raise WeightsError(f"{path}: {len(unknown)} tensors this model's adapters do not have, e.g. {unknown[0]!r}")
    return out
