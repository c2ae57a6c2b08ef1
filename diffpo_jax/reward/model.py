"""Reward models: a head on the decoder's final-normed hidden states (the same `Transformer`, no lm head).

Two heads, as the published models define them:
  classifier  transformers' `LlamaForSequenceClassification` / `Gemma2ForSequenceClassification`:
              `score` Linear(hidden -> num_labels, no bias) at the last token of each sequence.
              (Gemma-2's final-logit soft-cap belongs to its lm head and does not apply.)
  armorm      RLHFlow's `LlamaForRewardModelWithGating` (ArmoRM-Llama3-8B-v0.1):
              rewards = regression_layer(h_last) (Linear(hidden -> K), no bias);
              gating  = softmax(MLP(h_gate) / gating_temperature) * logit_scale, the MLP being
                        gating_n_hidden Linear(+bias)+ReLU layers of gating_hidden_dim, then Linear(-> K, +bias);
              score   = sum(gating * (rewards @ reward_transform_matrix)).
              h_gate is the hidden state at the first token of the last assistant-turn opening
              (reward/inputs.py finds it).
"Last token" is the last real token of each row (the mask decides, so left and right padding both work):
transformers' rule (the rightmost token that is not the pad id) and ArmoRM's (the token before the
first pad) pick the same one whenever the sequence does not end in its pad id.

The heads compute in fp32 whatever the activation dtype. Parameters are replicated (the largest,
ArmoRM's gating MLP, is 4096 x 1024); the backbone shards through the usual logical axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffpo_jax.config import ModelConfig, UnsupportedModelError
from diffpo_jax.model import Transformer
from diffpo_jax.weights.hf import WeightSpec, weight_specs

CLASSIFIERS = ("LlamaForSequenceClassification", "Gemma2ForSequenceClassification")
ARMORM = "LlamaForRewardModelWithGating"
# ArmoRM-Llama3-8B-v0.1's objectives, in the order of its regression layer (from its model card);
# 9 and 10 are the DiffPO paper's helpfulness and harmlessness.
ARMORM_OBJECTIVES = (
    "helpsteer-helpfulness",
    "helpsteer-correctness",
    "helpsteer-coherence",
    "helpsteer-complexity",
    "helpsteer-verbosity",
    "ultrafeedback-overall_score",
    "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness",
    "ultrafeedback-honesty",
    "ultrafeedback-helpfulness",
    "beavertails-is_safe",
    "prometheus-score",
    "argilla-overall_quality",
    "argilla-judge_lm",
    "code-complexity",
    "code-style",
    "code-explanation",
    "code-instruction-following",
    "code-readability",
)


class NotARewardModelError(UnsupportedModelError):
    """A checkpoint whose architecture has no reward head (e.g. a causal LM)."""


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    kind: str  # "classifier" | "armorm"
    num_labels: int = 1  # classifier outputs
    num_objectives: int = 19  # armorm
    gating_temperature: float = 10.0
    gating_hidden_dim: int = 1024
    gating_n_hidden: int = 3

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config") -> HeadConfig:
        arch = (hf.get("architectures") or [None])[0]
        if arch in CLASSIFIERS:
            # transformers: num_labels = len(id2label), 2 when the config names no labels
            labels = hf.get("id2label")
            return cls("classifier", num_labels=len(labels) if labels else int(hf.get("num_labels", 2)))
        if arch == ARMORM:
            return cls(
                "armorm",
                num_objectives=int(hf.get("num_objectives", 19)),
                gating_temperature=float(hf.get("gating_temperature", 10)),
                gating_hidden_dim=int(hf.get("gating_hidden_dim", 1024)),
                gating_n_hidden=int(hf.get("gating_n_hidden", 3)),
            )
        raise NotARewardModelError(
            f"{source}: architecture {arch!r} is not a reward model (supported: {', '.join(CLASSIFIERS + (ARMORM,))})"
        )

    @property
    def objective_names(self) -> tuple[str, ...]:
        """ArmoRM's objective names (its own when K = 19, else objective_0 ...)."""
        if self.kind != "armorm":
            return ()
        if self.num_objectives == len(ARMORM_OBJECTIVES):
            return ARMORM_OBJECTIVES
        return tuple(f"objective_{i}" for i in range(self.num_objectives))


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: str) -> nnx.Param:
    return nnx.Param(
        0.02 * jax.random.normal(rngs.params(), shape, jnp.dtype(dtype)), logical_axes=(None,) * len(shape)
    )


def _f32(p: nnx.Param) -> jax.Array:
    return p[...].astype(jnp.float32)


class ClassifierHead(nnx.Module):
    def __init__(self, hidden: int, head: HeadConfig, dtype: str, *, rngs: nnx.Rngs):
        self.score = _param(rngs, (hidden, head.num_labels), dtype)

    def __call__(self, last: jax.Array, gate: jax.Array) -> dict[str, jax.Array]:
        return {"logits": last.astype(jnp.float32) @ _f32(self.score)}


class ArmoHead(nnx.Module):
    def __init__(self, hidden: int, head: HeadConfig, dtype: str, *, rngs: nnx.Rngs):
        k, width = head.num_objectives, head.gating_hidden_dim
        self.temperature = head.gating_temperature
        self.regression = _param(rngs, (hidden, k), dtype)
        dims = [hidden] + [width] * head.gating_n_hidden + [k]
        self.gating_w = nnx.List([_param(rngs, (a, b), dtype) for a, b in zip(dims[:-1], dims[1:])])
        self.gating_b = nnx.List([_param(rngs, (b,), dtype) for b in dims[1:]])
        self.logit_scale = nnx.Param(jnp.ones((1,), jnp.dtype(dtype)), logical_axes=(None,))
        self.transform = nnx.Param(jnp.eye(k, dtype=jnp.dtype(dtype)), logical_axes=(None, None))

    def __call__(self, last: jax.Array, gate: jax.Array) -> dict[str, jax.Array]:
        rewards = last.astype(jnp.float32) @ _f32(self.regression)
        x = gate.astype(jnp.float32)
        for i, (w, b) in enumerate(zip(self.gating_w, self.gating_b)):
            x = x @ _f32(w) + _f32(b)
            if i < len(self.gating_w) - 1:
                x = jax.nn.relu(x)
        gating = jax.nn.softmax(x / self.temperature, axis=-1) * _f32(self.logit_scale)[0]
        score = jnp.sum(gating * (rewards @ _f32(self.transform)), axis=-1)
        return {"score": score, "rewards": rewards, "gating": gating}


HEADS = {"classifier": ClassifierHead, "armorm": ArmoHead}


def backbone_config(cfg: ModelConfig) -> ModelConfig:
    """The decoder a reward model runs: the RM's config without an lm head (built as if tied, so no
    lm_head parameter exists; `Transformer.head` is never called)."""
    return cfg.replace(tie_word_embeddings=True)


class RewardModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, head: HeadConfig, *, rngs: nnx.Rngs):
        self.cfg, self.head_cfg = cfg, head
        self.backbone = Transformer(backbone_config(cfg), rngs=rngs)
        self.head = HEADS[head.kind](cfg.hidden_size, head, cfg.param_dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array, gate: jax.Array) -> dict[str, jax.Array]:
        """Head outputs for int32 tokens [B, T] with mask [B, T] (real tokens, left- or right-padded) and
        `gate` [B], the index in T of each row's gating token (armorm; ignored by classifiers)."""
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        hidden, _ = self.backbone(tokens, positions, mask, return_hidden=True)
        last = tokens.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
        rows = jnp.arange(tokens.shape[0])
        return self.head(hidden[rows, last], hidden[rows, gate])


def reward_weight_specs(cfg: ModelConfig, head: HeadConfig) -> list[WeightSpec]:
    """The decoder's weight map under `backbone` plus the head's HF names (HF Linear [out, in] -> ours [in, out])."""
    specs = [dataclasses.replace(s, path=("backbone", *s.path)) for s in weight_specs(backbone_config(cfg))]
    if head.kind == "classifier":
        return specs + [WeightSpec(("head", "score"), "score.weight", 1)]
    specs += [WeightSpec(("head", "regression"), "regression_layer.weight", 1)]
    for i in range(head.gating_n_hidden + 1):
        specs += [
            WeightSpec(("head", "gating_w", i), f"gating.layers.{i}.weight", 1),
            WeightSpec(("head", "gating_b", i), f"gating.layers.{i}.bias", 0),
        ]
    return specs + [
        WeightSpec(("head", "logit_scale"), "gating.logit_scale", 0),
        WeightSpec(("head", "transform"), "reward_transform_matrix", 0),
    ]


def abstract_reward_model(cfg: ModelConfig, head: HeadConfig) -> RewardModel:
    return nnx.eval_shape(lambda: RewardModel(cfg, head, rngs=nnx.Rngs(0)))
