"""ModelConfig: one dataclass for the Llama-3 and Gemma-2 families, converted from and to HF config.json.

The two families differ only in the explicit switches below (norm offset, embedding scale, sandwich
norms, activation, soft-caps, sliding window, query scale); `model.py` reads the switches, never the
family name. `from_hf` / `to_hf` are the one place where HF field names appear.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml
from etils import epath

FAMILIES = {"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM"}
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or options are outside what diffpo-jax implements."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1/3.2 `rope_type: llama3` frequency scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


# The projections a LoRA adapter can target, by module (HF's and PEFT's names): attention, MLP.
LORA_TARGETS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the projections `target_modules` (the `lora` section of a train config):
    W x + (alpha / rank) B A x, as PEFT computes it. rank 0 = no adapters (full fine-tuning)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0  # only 0: flax's nnx.LoRA, which the model uses, has no dropout
    target_modules: tuple[str, ...] = LORA_TARGETS["attn"] + LORA_TARGETS["mlp"]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" | "gemma2": only used to pick the HF class on export.
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None
    # Family switches (Gemma-2 values in comments).
    activation: str = "silu"  # "gelu_tanh"
    norm_offset: float = 0.0  # 1.0: RMSNorm multiplies by (1 + w)
    scale_embeddings: bool = False  # True: embeddings * sqrt(hidden_size)
    sandwich_norms: bool = False  # True: extra norms after attention and after the MLP
    query_pre_attn_scalar: int | None = None  # None: head_dim; queries are scaled by its -1/2 power
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" | "sliding_attention"; () = all full
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Numerics (not part of the HF config).
    dtype: str = "float32"  # activations / matmuls
    param_dtype: str = "float32"  # stored weights
    remat: bool = False  # recompute each layer in the backward pass (training memory)
    lora: LoraConfig | None = None  # adapters beside the targeted projections (model.py); None: none
    attention: str = "auto"  # attention.py: "auto" (cuDNN flash on GPU / splash on TPU where they apply, else einsum) | "einsum" | "xla" | "cudnn" | "splash"

    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def window_sizes(self) -> list[int]:
        """Per layer attention window in tokens; 0 means unlimited (full attention)."""
        types = self.layer_types or ("full_attention",) * self.num_layers
        return [self.sliding_window if t == "sliding_attention" else 0 for t in types]

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- HF conversion

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from an HF config.json dict (LlamaForCausalLM or Gemma2ForCausalLM)."""
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            arch = (hf.get("architectures") or [model_type])[0]
            raise UnsupportedModelError(
                f"{source}: unsupported architecture {arch!r} (supported: {', '.join(FAMILIES.values())})"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise UnsupportedModelError(f"{source}: {flag}=true is not supported")
        heads = hf["num_attention_heads"]
        # transformers 5 nests rope settings in `rope_parameters`; older files use rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise UnsupportedModelError(f"{source}: unsupported rope type {rope_type!r}")
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        eos = hf.get("eos_token_id")
        common = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            rope_scaling=scaling,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            pad_token_id=hf.get("pad_token_id"),
        )
        if model_type == "llama":
            act = hf.get("hidden_act", "silu")
            if act != "silu":
                raise UnsupportedModelError(f"{source}: unsupported hidden_act {act!r} for llama")
            return cls(family="llama", tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), **common)
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise UnsupportedModelError(f"{source}: unsupported hidden_activation {act!r} for gemma2")
        num_layers = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
        ]
        return cls(
            family="gemma2",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            activation="gelu_tanh",
            norm_offset=1.0,
            scale_embeddings=True,
            sandwich_norms=True,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            sliding_window=hf.get("sliding_window"),
            layer_types=tuple(layer_types),
            **common,
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF config.json dict that `transformers` loads as the matching *ForCausalLM."""
        eos = list(self.eos_token_ids)
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **dataclasses.asdict(self.rope_scaling)}
        hf: dict[str, Any] = dict(
            architectures=[FAMILIES[self.family]],
            model_type=self.family,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_parameters=rope,
            # transformers < 5, vLLM and llama.cpp's converter read the legacy key
            rope_scaling=None
            if self.rope_scaling is None
            else {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)},
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=False,
            bos_token_id=self.bos_token_id,
            eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
            pad_token_id=self.pad_token_id,
            torch_dtype=self.param_dtype,
        )
        if self.family == "llama":
            hf.update(hidden_act="silu", mlp_bias=False)
        else:
            hf.update(
                hidden_activation="gelu_pytorch_tanh",
                query_pre_attn_scalar=self.query_pre_attn_scalar,
                attn_logit_softcapping=self.attn_logit_softcap,
                final_logit_softcapping=self.final_logit_softcap,
                sliding_window=self.sliding_window,
                layer_types=list(self.layer_types),
            )
        return hf


def read_hf_config(path: str | Path | epath.Path) -> dict[str, Any]:
    """Read a config.json (a local path or URL), with errors that name the file."""
    try:
        return json.loads(epath.Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> tuple[ModelConfig, dict[str, Any]]:
    """A model preset: a YAML file holding an HF config (plus `hf_repo`, where the real weights live)."""
    is_file = name_or_path.endswith((".yaml", ".yml"))
    path = Path(name_or_path) if is_file else CONFIGS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model preset (presets: {', '.join(preset_names())})")
    hf = yaml.safe_load(path.read_text())
    return ModelConfig.from_hf(hf, source=str(path)), hf


PRESET = "preset:"  # a train `model` of configs/models/NAME.yaml, randomly initialised (training/trainer.py)


def config_without_weights(spec: str) -> ModelConfig:
    """The config of model `spec` without downloading anything (the --plan options): `preset:NAME` (sized
    to the embedded tokenizer, as the trainer's random init is), `embedded`/None, a local folder or run dir
    with a config.json, a PEFT adapter folder (its base's), or a hub id that a configs/models preset names as its `hf_repo`. ValueError else."""
    if spec is None or spec in ("", "embedded", "embedded-refiner"):  # the refiner: adapters on the embedded model
        return load_preset("smollm2-135m-instruct")[0]
    if spec.startswith(PRESET):
        vocab = load_preset("smollm2-135m-instruct")[0].vocab_size
        return load_preset(spec[len(PRESET) :])[0].replace(vocab_size=vocab)
    folder = Path(spec).expanduser()
    if (folder / "config.json").is_file():
        return ModelConfig.from_hf(json.loads((folder / "config.json").read_text()), source=str(folder))
    if (folder / "adapter_config.json").is_file():  # a PEFT adapter folder: the model is its base's
        return config_without_weights(
            json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        )
    for name in preset_names():
        cfg, hf = load_preset(name)
        if spec in (hf.get("hf_repo"), name):
            return cfg
    raise ValueError(
        f"model {spec}: no config without downloading it (use preset:NAME, a configs/models preset "
        "or its hf_repo, or a local folder with config.json)"
    )
