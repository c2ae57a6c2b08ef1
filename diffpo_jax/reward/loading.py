"""Loading a reward model (reward/model.py) for `score` and `verify`: an HF folder or hub id, opened as
`sources.open_checkpoint` opens a causal LM's, with the head read from its HF config."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from diffpo_jax.config import ModelConfig, UnsupportedModelError
from diffpo_jax.reward.model import HeadConfig, RewardModel, abstract_reward_model, reward_weight_specs
from diffpo_jax.sources import EMBEDDED, ModelSourceError, load_tokenizer, open_checkpoint
from diffpo_jax.weights.checkpoint import is_orbax_dir
from diffpo_jax.weights.hf import WeightsError, load_module


@dataclasses.dataclass
class LoadedRewardModel:
    cfg: ModelConfig
    head: HeadConfig
    model: RewardModel
    tokenizer: Any
    source: str
    reference: dict[str, Any]  # transformers.from_pretrained kwargs for the same weights


def load_reward_model(spec: str, *, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None) -> LoadedRewardModel:
    """A reward model from an HF folder or hub id; a causal LM or an Orbax dir is a ModelSourceError."""
    if spec in (None, "", EMBEDDED) or is_orbax_dir(spec):
        raise ModelSourceError(
            f"{spec or EMBEDDED}: not a reward model (an HF folder or hub id of a "
            "*ForSequenceClassification or ArmoRM checkpoint is needed)"
        )
    ckpt, reference = open_checkpoint(spec)
    try:
        hf = ckpt.hf_config()
        head = HeadConfig.from_hf(hf, source=str(ckpt.path))
        cfg = ModelConfig.from_hf(hf, source=str(ckpt.path)).replace(dtype=dtype, param_dtype=dtype)
        model = load_module(
            abstract_reward_model(cfg, head), reward_weight_specs(cfg, head), cfg.num_layers, ckpt, mesh
        )
    except (WeightsError, UnsupportedModelError, FileNotFoundError, ValueError) as e:
        raise ModelSourceError(str(e)) from None
    return LoadedRewardModel(cfg, head, model, load_tokenizer(ckpt), str(ckpt.path), reference)
