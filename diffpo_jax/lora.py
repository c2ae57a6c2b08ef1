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

A PEFT adapter's adapter_config.json is read as an `AdapterConfig` (`read_adapter_config`): every field
honoured, inert at inference, or at peft's default, else a one-line refusal naming the field; its
`module(key)` gives each module's rank and scale with peft's matching rules.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
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
ADAPTER_WEIGHT_FILES = (ADAPTER_WEIGHTS, "adapter_model.bin")  # either makes a folder with ADAPTER_CONFIG an adapter
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
    each projection W becomes W + (alpha / rank) A B by `merge_projection`, which consumes W (its buffer
    is donated: the merged projection takes its place, so merging needs no second copy of the model)."""
    layers = {}
    for kind, module in params["layers"].items():
        layers[kind] = {}
        for name, w in module.items():
            if name.endswith("_lora"):
                continue
            adapter = module.get(f"{name}_lora")
            if adapter is not None:
                w = merge_projection(w, adapter["lora_a"], adapter["lora_b"], jnp.float32(lora.scale))
            layers[kind][name] = w
    return {**params, "layers": layers}


def merge_projection(w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """Stacked projection `w` [L, ...] + scale * a[l] @ b[l] per layer (a [L, in, r], b [L, r, out]; the
    product reshaped to a layer of w), in w's dtype, one layer at a time into w's donated buffer."""
    for i in range(w.shape[0]):
        w = merge_layer(w, w[i], a[i], b[i], i, scale)
    return w


@functools.partial(jax.jit, donate_argnums=0)
def merge_layer(
    w: jax.Array, layer: jax.Array, a: jax.Array, b: jax.Array, i: jax.Array, scale: jax.Array
) -> jax.Array:
    """`w` with layer `i` (`layer` = w[i], given apart: XLA copies a donated buffer it both reads and
    updates) replaced by layer + scale * a @ b, summed in fp32. `w` is donated and updated in place: the
    only temporary is the layer's fp32 product (tests/test_lora.py checks the compiled memory)."""
    delta = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    merged = layer.astype(jnp.float32) + scale * delta.reshape(layer.shape)
    return jax.lax.dynamic_update_index_in_dim(w, merged.astype(w.dtype), i, 0)


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


# peft 0.21's LoraConfig fields, each honoured below, inert at inference, or loaded at its default only.
_HONOURED = {
    "peft_type",
    "base_model_name_or_path",
    "revision",  # the hub revision of the named base (sources.py)
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "init_lora_weights",
}
_INERT = {  # training-time or bookkeeping only; fan_in_fan_out: peft sets it False on nn.Linear, as all ours are
    "task_type",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "lora_dropout",
    "fan_in_fan_out",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "runtime_config",
}
_DEFAULTS = {  # changes the math unless at peft's default: refused
    "bias": "none",
    "use_dora": False,
    "alora_invocation_tokens": None,
    "modules_to_save": None,
    "use_qalora": False,
    "lora_bias": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "megatron_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "monteclora_config": None,
    "velora_config": None,
    "ensure_weight_tying": False,
}
# init_lora_weights that leave the base as it is (the saved A, B are the whole adapter). PiSSA, OLoRA,
# CorDA, LoftQ, LoRA-GA, MiCA change the base's weights at init: saved unconverted, their A, B are not
# an adapter on the named base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """A PEFT adapter_config.json whose every field this loader honours (read_adapter_config); `module`
    gives a module's rank and scale with peft's matching rules (peft/tuners/tuners_utils.py
    `check_target_module_exists`, peft/utils/other.py `get_pattern_key`)."""

    path: str  # the file, for messages
    base: str
    revision: str | None
    r: int
    alpha: float
    rank_pattern: dict
    alpha_pattern: dict
    use_rslora: bool
    target_modules: str | tuple[str, ...]
    exclude_modules: str | tuple[str, ...] | None
    layers_to_transform: int | tuple[int, ...] | None
    layers_pattern: str | tuple[str, ...] | None

    def targets(self, key: str) -> bool:
        """Whether peft puts an adapter on module `key` (e.g. "model.layers.0.self_attn.q_proj")."""
        excluded = self.exclude_modules
        if isinstance(excluded, str):
            if re.fullmatch(excluded, key):
                return False
        elif excluded and (key in excluded or any(key.endswith(f".{k}") for k in excluded)):
            return False
        if isinstance(self.target_modules, str):
            if self.target_modules.lower() == "all-linear":  # every Linear but the output head: all of TARGETS
                return key.rsplit(".", 1)[-1] in TARGETS
            return re.fullmatch(self.target_modules, key) is not None
        if key in self.target_modules:
            return True
        if not any(key.endswith(f".{k}") for k in self.target_modules):
            return False
        layers = self.layers_to_transform
        if layers is None or layers == ():
            return True
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            patterns = (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern
            for pattern in patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match["idx"])
        return index == layers if isinstance(layers, int) else index in layers

    def pattern(self, patterns: dict, key: str) -> str | None:
        """The first key of `patterns` that matches module `key` as peft matches it; None: none does."""
        return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", key)), None)

    def module(self, key: str) -> tuple[int, float, str]:
        """(rank, scale, where the rank comes from) of module `key`'s adapter: r / lora_alpha unless a
        rank_pattern / alpha_pattern key matches it; scale alpha / r, or alpha / sqrt(r) with use_rslora."""
        r_key, alpha_key = self.pattern(self.rank_pattern, key), self.pattern(self.alpha_pattern, key)
        r = int(self.rank_pattern[r_key]) if r_key is not None else self.r
        alpha = float(self.alpha_pattern[alpha_key]) if alpha_key is not None else self.alpha
        source = f"rank_pattern[{r_key!r}] = {r}" if r_key is not None else f"r = {r} (no rank_pattern key matches)"
        return r, alpha / (math.sqrt(r) if self.use_rslora else r), source

    def lora(self) -> LoraConfig:
        """The same adapters as one LoraConfig (a LoRA run's: one rank and scale on whole projections)."""
        plain = (
            isinstance(self.target_modules, tuple)
            and set(self.target_modules) <= set(TARGETS)
            and not (self.rank_pattern or self.alpha_pattern or self.use_rslora or self.exclude_modules)
            and self.layers_to_transform in (None, ())
        )
        if not plain:
            raise ValueError(f"{self.path}: not a LoRA run's adapter config (per-module targets, ranks or scales)")
        return LoraConfig(rank=self.r, alpha=self.alpha, target_modules=self.target_modules)


def _refuse(path, field: str, value, why: str) -> ValueError:
    return ValueError(f"{path}: {field} = {json.dumps(value)}: {why}")


def _names(path, field: str, value, *, allow_none: bool) -> str | tuple[str, ...] | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _refuse(path, field, value, "expected a list of module names or a regex string")


def _pattern(path, field: str, value) -> dict:
    if not value:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise _refuse(path, field, value, "expected a dict of module-name patterns to numbers")
    return value


def read_adapter_config(folder: str | os.PathLike) -> AdapterConfig | None:
    """The adapter_config.json in `folder` (None when there is none): every field honoured, inert at
    inference, or at peft's default; anything else, or a field this loader does not know, is a one-line
    ValueError naming the file and the field."""
    path = as_path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(c, dict):
        raise ValueError(f"{path}: not a JSON object")
    if c.get("peft_type") != "LORA":
        raise _refuse(path, "peft_type", c.get("peft_type"), "only LORA adapters load")
    for field, value in c.items():
        if field in _DEFAULTS:
            default = _DEFAULTS[field]
            if value != default and not (default in (None, False) and not value):
                raise _refuse(path, field, value, f"not supported; only peft's default {json.dumps(default)} loads")
        elif field not in _HONOURED and field not in _INERT:
            raise _refuse(path, field, value, "a field this loader does not know; refused rather than ignored")
    init = c.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise _refuse(
            path,
            "init_lora_weights",
            init,
            "this init changes the base's weights, so the adapter is only right on that changed base; "
            "save it converted (peft's path_initial_model_for_weight_conversion)",
        )
    for field in ("r", "lora_alpha", "base_model_name_or_path", "target_modules"):
        if c.get(field) is None:
            raise ValueError(f"{path}: {field} is missing")
    if not isinstance(c["r"], int) or c["r"] < 1:
        raise _refuse(path, "r", c["r"], "expected a positive integer")
    if not isinstance(c["lora_alpha"], (int, float)):
        raise _refuse(path, "lora_alpha", c["lora_alpha"], "expected a number")
    layers = c.get("layers_to_transform")
    if not (layers is None or isinstance(layers, int) or isinstance(layers, list)):
        raise _refuse(path, "layers_to_transform", layers, "expected a layer index or a list of them")
    return AdapterConfig(
        path=str(path),
        base=c["base_model_name_or_path"],
        revision=c.get("revision"),
        r=c["r"],
        alpha=float(c["lora_alpha"]),
        rank_pattern=_pattern(path, "rank_pattern", c.get("rank_pattern")),
        alpha_pattern=_pattern(path, "alpha_pattern", c.get("alpha_pattern")),
        use_rslora=bool(c.get("use_rslora")),
        target_modules=_names(path, "target_modules", c["target_modules"], allow_none=False),
        exclude_modules=_names(path, "exclude_modules", c.get("exclude_modules"), allow_none=True),
        layers_to_transform=tuple(layers) if isinstance(layers, list) else layers,
        layers_pattern=_names(path, "layers_pattern", c.get("layers_pattern"), allow_none=True),
    )
