"""Attention of queries over keys under a mask: one function, implementations chosen by backend.

    out = attend(q, keys, values, allowed, scale=..., softcap=..., implementation=...)

q [B, T, H, D], keys / values [B, S, Kv, D] (grouped-query: H a multiple of Kv), allowed bool [B, T, S]
(the model builds it from positions, windows and segments), out [B, T, H, D] in q's dtype.

Implementations (ModelConfig.attention; "auto" picks with `choose`):
  einsum  the reference: grouped einsums in the activation dtype, soft-cap, masked fp32 softmax. Every
          parity test against transformers runs it; the default wherever nothing faster applies.
  xla     jax.nn.dot_product_attention's XLA path (fp32 logits and softmax); equal to einsum to fp32
          rounding, and the CPU-testable stand-in for the fused kernel below.
  cudnn   jax.nn.dot_product_attention's cuDNN flash kernel (GPU; bf16 / fp16; head_dim a multiple of 8
          and at most 128 here; the mask goes in as an additive bias). No soft-cap: Gemma-2 stays on
          einsum. "auto" picks it on GPU where it applies.
Not wired yet: the Pallas splash kernel (TPU). It takes a mask that is static per shape (a numpy
[T, S] pattern, causal / local windows) plus equal-segment ids. Training's packed [prompt, answer A,
answer B] rows fit it (a static pattern per (P, N), left padding as a segment of its own), but that
pattern would have to come from the loss as static data, not as this function's traced `allowed`;
decoding's per-row cache frontier does not fit it. TPU runs einsum, which XLA:TPU fuses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")
CUDNN_DTYPES = ("bfloat16", "float16")


def choose(implementation: str, *, dtype: str, head_dim: int, softcap: float | None) -> str:
    """The implementation "auto" means for this backend and model: cudnn on GPU where it applies, else einsum."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "auto":
        return implementation
    fits_cudnn = softcap is None and dtype in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if jax.default_backend() == "gpu" and fits_cudnn else "einsum"


def softcap_logits(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma-2's soft-cap, cap * tanh(x / cap) (attention and final logits); None: x."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, allowed: jax.Array, *, scale: float,
           softcap: float | None, implementation: str) -> jax.Array:
    """Softmax(softcap(scale * q . k)) . v over the allowed keys (module doc); `implementation` not "auto"."""
    if implementation == "einsum":
        return _einsum(q, keys, values, allowed, scale, softcap)
    if softcap is not None:
        raise ValueError(f"attention implementation {implementation!r} has no logit soft-cap (use einsum)")
    return jax.nn.dot_product_attention(q, keys, values, mask=allowed[:, None], scale=scale,
                                        implementation=implementation)


def _einsum(q, keys, values, allowed, scale, softcap):
    dt = q.dtype
    b, t, h, d = q.shape
    kv = keys.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, keys) * jnp.asarray(scale, dt)
    logits = softcap_logits(logits, softcap)
    logits = jnp.where(allowed[:, None, None], logits.astype(jnp.float32), -1e30)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    return jnp.einsum("bkgts,bskd->btkgd", probs, values).reshape(b, t, h, d)
