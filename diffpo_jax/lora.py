"""LoRA adapters: which params train, fresh adapters, merging them into the base, PEFT's adapter_config.json.

The adapters are flax's `nnx.LoRA` modules that model.py puts beside each targeted projection when
`ModelConfig.lora` is set: `layers.attn.q_proj_lora.{lora_a [L, E, r], lora_b [L, r, H * D]}` (stacked
over layers like every layer parameter, scanned with them), typed `nnx.LoRAParam`, so nnx filters tell
them from the base's `nnx.Param`s. A projection's output becomes W x + (alpha / rank) x A B: PEFT's
`lora_A.weight` is A^T [r, in] and `lora_B.weight` is B^T [out, r], with in / out flattened as HF's
Linear has them (weights/export.py `export_peft` writes them under PEFT's names).

A LoRA train run dir (training/trainer.py) holds the adapters only (checkpoints/<step>/params), and
`adapter_config.json` (PEFT's format) naming the frozen base it was trained on
(`base_model_name_or_path`: the train config's `model`, a local path made absolute). Loading the run
(`sources.restore_model_params`: --model RUN_DIR, convert to-hf) loads that base as any --model and
merges the adapters into it once: decoding then runs the plain model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from diffpo_jax.config import LORA_TARGETS, LoraConfig, ModelConfig
from diffpo_jax.distributed import is_main_process
from diffpo_jax.model import Transformer
from diffpo_jax.paths import as_path, is_url

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TARGETS = LORA_TARGETS["attn"] + LORA_TARGETS["mlp"]


def split_trainable(state: nnx.State, cfg: ModelConfig) -> tuple[nnx.State, nnx.State]:
    """(trained, frozen) params of a model of `cfg`: with adapters (cfg.lora) the adapters and the base;
    without, every param and none."""
    return nnx.split_state(state, nnx.LoRAParam if cfg.lora else nnx.Param, ...)


def init_adapters(cfg: ModelConfig, seed: int, shardings: dict) -> dict:
    """Fresh adapters of a model of `cfg` (A random, B zero: the model starts as its base), as a nested
    dict of arrays placed on `shardings` (the base's random init is traced but never computed)."""
    init = lambda: nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.LoRAParam))
    return jax.jit(init, out_shardings=shardings)()


def union(a: dict, b: dict) -> dict:
    """The nested dicts `a` and `b` (disjoint leaves) as one: a model's params from its frozen and trained parts."""
    out = dict(a)
    for key, value in b.items():
        out[key] = union(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def merge_adapters(params: dict, lora: LoraConfig) -> dict:
    """Params with adapters (`NAME_lora` beside projection NAME) -> the same model's params without them:
    W + (alpha / rank) A B per layer, reshaped to W's layout, summed in fp32 and stored in W's dtype."""
    layers = {}
    for kind, module in params["layers"].items():
        layers[kind] = {}
        for name, w in module.items():
            if name.endswith("_lora"):
                continue
            adapter = module.get(f"{name}_lora")
            if adapter is not None:
                delta = jnp.einsum(
                    "lir,lro->lio",
                    adapter["lora_a"].astype(jnp.float32),
                    adapter["lora_b"].astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST,
                )
                w = (w.astype(jnp.float32) + lora.scale * delta.reshape(w.shape)).astype(w.dtype)
            layers[kind][name] = w
    return {**params, "layers": layers}


# ---------------------------------------------------------------- adapter_config.json (PEFT's)


def base_reference(spec: str | None) -> str:
    """How adapter_config.json names a base: a local path made absolute; a hub id, URL or "embedded" as is."""
    if spec in (None, ""):
        return "embedded"
    path = Path(spec).expanduser()
    return str(path.resolve()) if not is_url(spec) and path.exists() else spec


def peft_config(lora: LoraConfig, base: str) -> dict:
    """PEFT's adapter_config.json for `lora` on `base` (peft.LoraConfig's fields; the rest take PEFT's defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": list(lora.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def write_adapter_config(folder: str | os.PathLike, lora: LoraConfig, base: str) -> None:
    if is_main_process():
        (as_path(folder) / ADAPTER_CONFIG).write_text(json.dumps(peft_config(lora, base), indent=2) + "\n")


def read_adapter_config(folder: str | os.PathLike) -> tuple[LoraConfig, str] | None:
    """(the LoraConfig, the base) of the adapter_config.json in `folder`; None when there is none."""
    path = as_path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    c = json.loads(path.read_text())
    unsupported = [k for k in ("use_rslora", "use_dora", "fan_in_fan_out") if c.get(k)]
    if c.get("peft_type") != "LORA" or unsupported or c.get("bias", "none") != "none":
        raise ValueError(
            f"{path}: not a plain LoRA adapter (peft_type {c.get('peft_type')!r}"
            f"{', ' + ', '.join(unsupported) if unsupported else ''}, bias {c.get('bias')!r})"
        )
    targets = c["target_modules"]
    if isinstance(targets, str) or set(targets) - set(TARGETS):
        raise ValueError(f"{path}: target_modules {targets!r}: expected a list of {', '.join(TARGETS)}")
    lora = LoraConfig(
        rank=int(c["r"]),
        alpha=float(c["lora_alpha"]),
        dropout=float(c.get("lora_dropout") or 0.0),
        target_modules=tuple(targets),
    )
    return lora, c["base_model_name_or_path"]
