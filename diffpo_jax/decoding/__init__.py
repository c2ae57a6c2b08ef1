"""Decoders: autoregressive sampling (`generate`) and exact Jacobi refinement of drafts (`jacobi_decode`).

Both are single `jax.jit` functions over a model split once: `graphdef, state = nnx.split(model)`.
"""

from diffpo_jax.decoding.jacobi import JacobiResult, jacobi_decode
from diffpo_jax.decoding.sampler import Generation, generate, is_stop, sample

__all__ = ["Generation", "JacobiResult", "generate", "is_stop", "jacobi_decode", "sample"]
