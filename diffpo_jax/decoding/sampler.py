"""Autoregressive generation, and the pieces every decoder shares: prefill, sampling, stop handling.

Every decoder is one `jax.jit` function over the model split once, `graphdef, state = nnx.split(model)`,
with `graphdef` and the shape-defining options static: calls with the same shapes and options reuse one
compilation (temperature, top_p, keys and lengths are traced values).

Inputs: prompts right-padded int32 [B, P] with lengths [B] (each >= 1). `prefill` writes the prompts
into a fresh KV cache (positions 0..len-1, padding masked) and returns the logits at each row's last
prompt token. Generated token t of a row sits at position len + t.

`generate`: one token per `lax.while_loop` step for the whole batch. Each step samples from the current
logits (greedy when temperature == 0, else temperature + top-p), appends the token to the live rows,
ends a row on a stop token or at max_new_tokens, and runs the model on the new tokens (finished rows
masked) for the next logits. The loop ends when every row is done. Sampling keys are per row: token t
of a row is drawn with fold_in(keys[row], t), so a row's answer depends on its prompt and key only,
not on the other rows of the batch.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx, struct

from diffpo_jax.model import Cache, Transformer, init_cache


@struct.dataclass
class Generation:
    tokens: jax.Array  # int32 [B, max_new_tokens]; pad_id after each row's end
    lengths: jax.Array  # int32 [B]: tokens generated, the stop token included
    stopped: jax.Array  # bool [B]: the row ended on a stop token (else it hit max_new_tokens)


def prefill(model: Transformer, prompts: jax.Array, lengths: jax.Array, cache_len: int) -> tuple[Cache, jax.Array]:
    """(KV cache of `cache_len` slots holding the prompts, logits [B, V] at each row's last prompt token)."""
    b, p = prompts.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    cache = init_cache(model.cfg, b, cache_len)
    logits, cache = model(prompts, positions, positions < lengths[:, None], cache)
    return cache, jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


def is_stop(tokens: jax.Array, stop_tokens: tuple[int, ...]) -> jax.Array:
    """Elementwise: is the token one of `stop_tokens`."""
    return jnp.isin(tokens, jnp.asarray(stop_tokens, jnp.int32))


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next tokens int32 [B] from logits [B, V]: argmax when temperature == 0, else row b draws with
    keys[b] (a key array [B]) from softmax(logits / temperature) restricted to the top-p nucleus (the
    smallest set of most likely tokens whose mass reaches top_p; the most likely token is always kept)."""

    def nucleus(_):
        scaled = logits.astype(jnp.float32) / temperature
        desc = jnp.sort(scaled, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        cutoff = jnp.min(jnp.where(mass_before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
        nucleus_logits = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
        return jax.vmap(jax.random.categorical)(keys, nucleus_logits).astype(jnp.int32)

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, nucleus, greedy, None)


@struct.dataclass
class _State:
    cache: Cache
    tokens: jax.Array  # [B, N]
    t: jax.Array  # steps taken (tokens appended to live rows so far)
    lengths: jax.Array
    stopped: jax.Array
    done: jax.Array


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "stop_tokens", "pad_id"))
def generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompts: jax.Array,
    prompt_lens: jax.Array,
    keys: jax.Array | None = None,
    *,
    max_new_tokens: int,
    temperature: float | jax.Array = 0.0,
    top_p: float | jax.Array = 1.0,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int = 0,
) -> Generation:
    """Autoregressive decoding of up to `max_new_tokens` tokens per row (see the module docstring).
    `keys`: one key per row (a key array [B]), needed only when temperature > 0."""
    model = nnx.merge(graphdef, state)
    prompts, prompt_lens = prompts.astype(jnp.int32), prompt_lens.astype(jnp.int32)
    b, p = prompts.shape
    keys = jax.random.split(jax.random.key(0), b) if keys is None else keys
    cache, logits = prefill(model, prompts, prompt_lens, p + max_new_tokens)

    def append(s: _State, logits: jax.Array) -> _State:
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, s.t)
        tok = sample(logits, step_keys, temperature, top_p)
        live = ~s.done
        stop = live & is_stop(tok, stop_tokens)
        return s.replace(
            tokens=s.tokens.at[:, s.t].set(jnp.where(live, tok, pad_id)),
            t=s.t + 1,
            lengths=s.lengths + live,
            stopped=s.stopped | stop,
            done=s.done | stop | (s.t + 1 >= max_new_tokens),
        )

    def step(s: _State) -> _State:
        last = jax.lax.dynamic_slice_in_dim(s.tokens, s.t - 1, 1, axis=1)
        positions = (prompt_lens + s.t - 1)[:, None]
        logits, cache = model(last, positions, ~s.done[:, None], s.cache)
        return append(s.replace(cache=cache), logits[:, 0])

    zeros = jnp.zeros((b,), jnp.int32)
    s = _State(
        cache=cache,
        tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        t=jnp.int32(0),
        lengths=zeros,
        stopped=zeros.astype(bool),
        done=zeros.astype(bool),
    )
    s = jax.lax.while_loop(lambda s: ~jnp.all(s.done), step, append(s, logits))
    return Generation(tokens=s.tokens, lengths=s.lengths, stopped=s.stopped)
