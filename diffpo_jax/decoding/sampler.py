"""Autoregressive generation, and the pieces every decoder shares: sampling and stop handling.

Every decoder is one `jax.jit` function over the model split once, `graphdef, state = nnx.split(model)`,
with `graphdef` and the shape-defining options static: calls with the same shapes and options reuse one
compilation (temperature, top_p, keys and lengths are traced values).

Inputs: prompts right-padded int32 [B, P] with lengths [B] (each >= 1). A row starts with a prefill:
its prompt written into its KV cache rows (positions 0..len-1, padding masked), and its first token
sampled from the logits at its last prompt token. Generated token t of a row sits at position len + t.

`generate`: one token per `lax.while_loop` step for every live row. Each step runs the model on the
rows' last tokens (finished rows masked) and samples the next (greedy when temperature == 0, else
temperature + top-p); a row ends on a stop token or at max_new_tokens. Sampling keys are per row: token
t of a row is drawn with fold_in(keys[row], t), so a row's answer depends on its prompt and key only,
not on the other rows of the batch. `generate_stream` runs any number of rows through B slots with row
refill (decoding/slots.py), with the same answers.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from diffpo_jax.decoding import slots as slots_lib
from diffpo_jax.model import KVCache, init_cache


@struct.dataclass
class Generation:
    tokens: jax.Array  # int32 [B, max_new_tokens]; pad_id after each row's end
    lengths: jax.Array  # int32 [B]: tokens generated, the stop token included
    stopped: jax.Array  # bool [B]: the row ended on a stop token (else it hit max_new_tokens)


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
    """The rows being decoded; every field but the cache ([L, B, S, Kv, D]) has the row axis first."""

    cache: KVCache
    tokens: jax.Array  # [B, N]; pad_id past each row's tokens
    t: jax.Array  # [B] tokens appended to the row so far
    stopped: jax.Array
    done: jax.Array  # finished (stop token or max_new_tokens), or no row in this slot
    prompt_lens: jax.Array  # [B]
    keys: jax.Array  # [B] the rows' sampling keys


def _empty(cfg, rows: int, prompt_width: int, *, max_new_tokens: int, pad_id: int) -> _State:
    """`rows` empty slots (done, holding nothing) with a cache for prompts of up to `prompt_width` tokens."""

    def zeros():  # a buffer per field: the decode loops donate the state, field by field
        return jnp.zeros((rows,), jnp.int32)

    return _State(
        cache=init_cache(cfg, rows, prompt_width + max_new_tokens),
        tokens=jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
        t=zeros(),
        stopped=zeros().astype(bool),
        done=jnp.ones((rows,), bool),
        prompt_lens=zeros(),
        keys=jax.random.split(jax.random.key(0), rows),
    )


def _append(s: _State, logits: jax.Array, temperature, top_p, stop_tokens: tuple[int, ...]) -> _State:
    """Each live row appends a token sampled from its logits [B, V] with fold_in(its key, its t)."""
    big_n = s.tokens.shape[1]
    tok = sample(logits, jax.vmap(jax.random.fold_in)(s.keys, s.t), temperature, top_p)
    live = ~s.done
    stop = live & is_stop(tok, stop_tokens)
    t = s.t + live
    return s.replace(
        tokens=s.tokens.at[jnp.arange(tok.shape[0]), jnp.where(live, s.t, big_n)].set(tok, mode="drop"),
        t=t,
        stopped=s.stopped | stop,
        done=s.done | stop | (t >= big_n),
    )


def _begin(model, s: _State, slots, prompts, prompt_lens, keys, temperature, top_p, *, stop_tokens, pad_id) -> _State:
    """Slots `slots` (int32 [R]) start decoding rows (prompts [R, P] with lengths, keys [R]): the prompt
    written into their cache rows, their state reset, the first token appended; other slots unchanged."""
    r, big_n = slots.shape[0], s.tokens.shape[1]
    sub = slots_lib.rows(s, slots).replace(
        tokens=jnp.full((r, big_n), pad_id, jnp.int32),
        t=jnp.zeros((r,), jnp.int32),
        stopped=jnp.zeros((r,), bool),
        done=jnp.zeros((r,), bool),
        prompt_lens=prompt_lens,
        keys=keys,
    )
    positions = jnp.broadcast_to(jnp.arange(prompts.shape[1], dtype=jnp.int32), prompts.shape)
    hidden, cache = model(prompts, positions, positions < prompt_lens[:, None], sub.cache, return_hidden=True)
    last = model.head(jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)[:, 0])  # the last
    # position's logits only, never [R, P, V]
    sub = _append(sub.replace(cache=cache), last, temperature, top_p, stop_tokens)
    return slots_lib.constrain_state(slots_lib.put_rows(s, slots, sub))


def _loop(model, s: _State, watch: jax.Array, temperature, top_p, *, stop_tokens) -> _State:
    """One token per step for the live rows until every row is done, or one of the `watch` rows is."""
    rows = jnp.arange(s.tokens.shape[0])

    def step(s: _State) -> _State:
        last = s.tokens[rows, jnp.maximum(s.t - 1, 0)][:, None]
        positions = (s.prompt_lens + s.t - 1)[:, None]
        logits, cache = model(last, positions, ~s.done[:, None], s.cache)
        return _append(s.replace(cache=cache), logits[:, 0], temperature, top_p, stop_tokens)

    return slots_lib.constrain_state(jax.lax.while_loop(lambda s: ~jnp.all(s.done) & ~jnp.any(s.done & watch), step, s))


def _result(s: _State) -> Generation:
    return Generation(tokens=s.tokens, lengths=s.t, stopped=s.stopped)


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
    `keys`: one key per row (a key array [B]), needed only when temperature > 0. The programs of row
    refill: `_start` (the rows' prefills, one row at a time) and the donated loop `_advance`, run once to
    the end."""
    b = prompts.shape[0]
    keys = jax.random.split(jax.random.key(0), b) if keys is None else keys
    temperature, top_p = np.float32(temperature), np.float32(top_p)
    s = _start(
        graphdef,
        state,
        prompts,
        prompt_lens,
        keys,
        temperature,
        top_p,
        batch_size=b,
        max_new_tokens=max_new_tokens,
        stop_tokens=stop_tokens,
        pad_id=pad_id,
    )
    return _result(_advance(graphdef, state, s, np.zeros((b,), bool), temperature, top_p, stop_tokens=stop_tokens))


@partial(jax.jit, static_argnames=("graphdef", "batch_size", "max_new_tokens", "stop_tokens", "pad_id"))
def _start(
    graphdef, state, prompts, prompt_lens, keys, temperature, top_p, *, batch_size, max_new_tokens, stop_tokens, pad_id
):
    """`batch_size` slots, the first R decoding rows 0..R-1 (prompts [R, P] with lengths, keys [R]),
    started one row after the other (slots.start), the others empty."""
    model = nnx.merge(graphdef, state)
    s = _empty(model.cfg, batch_size, prompts.shape[1], max_new_tokens=max_new_tokens, pad_id=pad_id)

    def begin(s, slot, row):
        return _begin(model, s, slot, *row, temperature, top_p, stop_tokens=stop_tokens, pad_id=pad_id)

    return slots_lib.start(s, (prompts.astype(jnp.int32), prompt_lens.astype(jnp.int32), keys), begin)


@partial(jax.jit, static_argnames=("graphdef", "stop_tokens", "pad_id"), donate_argnames=("s",))
def _refill(graphdef, state, s, slot, prompt, prompt_len, key, temperature, top_p, *, stop_tokens, pad_id):
    """Slot `slot` starts decoding one row (prompt [P] with its length, its key)."""
    return _begin(
        nnx.merge(graphdef, state),
        s,
        slot[None],
        prompt[None],
        prompt_len[None],
        key[None],
        temperature,
        top_p,
        stop_tokens=stop_tokens,
        pad_id=pad_id,
    )


@partial(jax.jit, static_argnames=("graphdef", "stop_tokens"), donate_argnames=("s",))
def _advance(graphdef, state, s, watch, temperature, top_p, *, stop_tokens):
    """Steps until a `watch` slot's row is done (or every slot is)."""
    return _loop(nnx.merge(graphdef, state), s, watch, temperature, top_p, stop_tokens=stop_tokens)


def generate_stream(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompts: np.ndarray,
    prompt_lens: np.ndarray,
    keys: jax.Array,
    *,
    batch_size: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int = 0,
    mesh: Mesh | None = None,
) -> Generation:
    """`generate` of any number of rows (numpy [R, P] and lengths, keys [R]) through `batch_size` slots
    with row refill (decoding/slots.py): each row's tokens are the ones `generate` gives it (its key
    decides its samples); the result (numpy) is in row order. `mesh`: the slots split over its data x
    fsdp devices, as the decoder's batches are."""
    temperature, top_p = np.float32(temperature), np.float32(top_p)
    k = min(len(prompts), batch_size)
    s = _start(
        graphdef,
        state,
        prompts[:k],
        prompt_lens[:k],
        keys[:k],
        temperature,
        top_p,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        stop_tokens=stop_tokens,
        pad_id=pad_id,
    )
    s = slots_lib.place(s, mesh)

    def begin(s: _State, slot: int, row: int) -> _State:
        return _refill(
            graphdef,
            state,
            s,
            np.int32(slot),
            prompts[row],
            prompt_lens[row],
            keys[row],
            temperature,
            top_p,
            stop_tokens=stop_tokens,
            pad_id=pad_id,
        )

    def advance(s: _State, watch: np.ndarray) -> _State:
        return _advance(graphdef, state, s, watch, temperature, top_p, stop_tokens=stop_tokens)

    return Generation(**slots_lib.stream(s, len(prompts), begin=begin, advance=advance, result=_result))
