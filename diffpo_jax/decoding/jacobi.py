"""Jacobi decoding with a KV cache: refine a draft answer into the model's exact greedy answer.

Per row: n committed response tokens and a window of W = block_size tokens for response offsets
n .. n+W-1 (prompt positions len+n ..). window[0] is the exact greedy token for offset n (`next_tok`,
first from the prefill); the others are guesses, initialised from the draft (offset k starts as draft[k]).

One pass is one forward over the window with the cache. With y_j = argmax(logits_j), the prediction
for offset n+j+1, it accepts a = 1 + (number of leading j with window[j+1] == y_j): window[:a] had only
exact inputs, so they are the greedy tokens, and the KV entries this pass wrote at their positions are
exact too; they are committed. The next window is y_{a-1} (the new next_tok), y_a .. y_{W-1}, then draft
tokens for the offsets past the predictions. A pass commits >= 1 token, so the output is token for token
the greedy decode, and a window of correct guesses is committed in one pass. Rows end on a stop token
(kept, the rest padded) or at max_new_tokens, independently, or after `max_iterations` passes of their
own (capped: converged = False, their committed tokens are still exact); the loop ends when all are done.
Each row is independent of the others, so `jacobi_stream` can run many rows through B slots, starting
the next row in a slot as soon as its row is done (row refill), with the same answers.

Re-alignment (`realign=True`): when the refinement inserts or deletes tokens, the draft past that point
is off by a few offsets. After each pass the trailing tokens (next_tok and up to two committed tokens
before it) are looked up in the draft; at the best match (longest, then nearest the expected offset;
next_tok alone counts), the draft continuation replaces the window's guesses. Only guesses change, so
exactness does not. It is on by default: the guesses after an insertion or deletion are otherwise
predictions from a wrong context, and the draft tail is misaligned (passes per token with and without
it: bench/results/, `refine_speed.py`).

`trajectory=True` also returns the Jacobi trajectory: after each pass, the response the next pass
builds on, as a full N-token sequence (committed tokens, the window's guesses, the draft at the offsets
past the window): the intermediate states y(1), y(2), ... on the way from the draft to the fixed point
that CLLM trains its consistency loss on (`data distill --jacobi-states`).

`hold_draft_prefix=R`: the first R draft tokens are fixed: prefilled as part of the prompt and returned
as the first response tokens (a stop token among them ends the row). `hold_lens` (int32 [B], each <= R)
holds fewer in some rows: the official DiffPO script holds a random 0..12 tokens per answer.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from diffpo_jax.decoding import slots as slots_lib
from diffpo_jax.decoding.sampler import is_stop
from diffpo_jax.model import KVCache, init_cache

_NGRAM = 3  # tokens matched when re-aligning: next_tok and the two committed tokens before it


@dataclasses.dataclass(frozen=True)
class JacobiOptions:
    """The static options of a Jacobi decode: hashable, so each value is one compiled program."""

    block_size: int  # W: the window of tokens one pass runs (next_tok, then W - 1 guesses)
    max_new_tokens: int  # N
    stop_tokens: tuple[int, ...] = ()
    pad_id: int = 0
    hold_draft_prefix: int = 0  # R: the most draft tokens a row holds fixed (hold_lens picks each row's)
    realign: bool = True
    trajectory: bool = False

    def __post_init__(self):
        if not 0 <= self.hold_draft_prefix <= self.max_new_tokens:
            raise ValueError(
                f"hold_draft_prefix={self.hold_draft_prefix} must be in [0, max_new_tokens={self.max_new_tokens}]"
            )


@struct.dataclass
class JacobiResult:
    tokens: jax.Array  # int32 [B, max_new_tokens]; pad_id after each row's end
    lengths: jax.Array  # int32 [B]: response tokens (held draft prefix included, stop token included)
    stopped: jax.Array  # bool [B]: the row ended on a stop token
    converged: jax.Array  # bool [B]: the row finished (stop token or max_new_tokens) within max_iterations
    passes: jax.Array  # int32 [B]: block forwards spent on the row (the prefill, one forward, not counted)
    committed: jax.Array  # int32 [B]: tokens committed by the passes (lengths minus the held prefix)
    states: jax.Array | None = None  # trajectory=True: int32 [B, max_new_tokens, max_new_tokens], state
    # after pass k (0-based) of the row in states[:, k] (rows past their last pass: pad_id)


@struct.dataclass
class _State:
    """The rows being refined; every field but the cache ([L, B, S, Kv, D]) has the row axis first."""

    cache: KVCache
    tokens: jax.Array  # [B, N] committed response tokens, pad_id past n
    n: jax.Array  # [B]
    window: jax.Array  # [B, W] next_tok, then guesses
    passes: jax.Array
    stopped: jax.Array
    done: jax.Array  # finished (stop token, max_new_tokens or the pass cap), or no row in this slot
    capped: jax.Array  # ended by the pass cap (max_iterations), not converged
    prompt_lens: jax.Array  # [B]
    drafts: jax.Array  # [B, D]
    draft_lens: jax.Array  # [B]
    held_n: jax.Array  # [B] tokens committed from the held draft prefix
    states: jax.Array | None  # trajectory: [B, N, N]


def _take(x: jax.Array, idx: jax.Array, valid: jax.Array, fill: int) -> jax.Array:
    """x[b, idx[b, ...]] where valid, else fill. x: [B, L]; idx, valid: [B, ...]."""
    b = x.shape[0]
    flat = jnp.clip(idx, 0, x.shape[1] - 1).reshape(b, -1)
    return jnp.where(valid, jnp.take_along_axis(x, flat, axis=1).reshape(idx.shape), fill)


def _append(prompts, prompt_lens, extra, extra_lens, pad_id):
    """Right-padded rows prompts[:len] + extra[:extra_len]: ([B, P + E], lengths)."""
    b, p = prompts.shape
    s = jnp.broadcast_to(jnp.arange(p + extra.shape[1]), (b, p + extra.shape[1]))
    k = s - prompt_lens[:, None]
    tokens = jnp.where(
        s < prompt_lens[:, None], _take(prompts, s, True, pad_id), _take(extra, k, k < extra_lens[:, None], pad_id)
    )
    return tokens, prompt_lens + extra_lens


def _commit(s: _State, tokens: jax.Array, count: jax.Array, stop_tokens: tuple[int, ...], max_new: int) -> _State:
    """Append tokens[:, :count] to each live row; a row ends after its first stop token or at max_new."""
    b, k = tokens.shape
    j = jnp.arange(k)
    stop = (j < count[:, None]) & is_stop(tokens, stop_tokens)
    first = jnp.argmax(stop, axis=1)
    room = max_new - s.n
    stopped = ~s.done & jnp.any(stop, axis=1) & (first < room)
    count = jnp.where(s.done, 0, jnp.minimum(jnp.where(stopped, first + 1, count), room))
    slots = jnp.where(j < count[:, None], s.n[:, None] + j, max_new)  # max_new: dropped
    n = s.n + count
    return s.replace(
        tokens=s.tokens.at[jnp.arange(b)[:, None], slots].set(tokens, mode="drop"),
        n=n,
        stopped=s.stopped | stopped,
        done=s.done | stopped | (n >= max_new),
    )


def _realign(window_bw, tokens_bn, n_b, drafts_bd, draft_lens_b):
    """window [B, W] for offsets n..: the guesses window[:, 1:] re-seeded from the draft continuation
    after the best match of the trailing tokens (committed ..., next_tok = window[:, 0]), where found.
    Suffixes name the axes: b rows, w window, n response, d draft, g trailing tokens, p draft positions."""
    b, w = window_bw.shape
    g = jnp.arange(_NGRAM)
    back_bg = n_b[:, None] - g
    trail_bg = jnp.where(g == 0, window_bw[:, :1], _take(tokens_bn, back_bg, back_bg >= 0, -1))  # token at n - g
    p = jnp.arange(drafts_bd.shape[1])  # candidate draft index of next_tok
    idx_bpg = jnp.broadcast_to(p[:, None] - g, (b, p.size, _NGRAM))
    valid_bpg = (idx_bpg >= 0) & (p[:, None] < draft_lens_b[:, None, None])
    eq_bpg = (_take(drafts_bd, idx_bpg, valid_bpg, -1) == trail_bg[:, None, :]) & valid_bpg
    matched_bp = jnp.sum(jnp.cumprod(eq_bpg, axis=-1), axis=-1)  # trailing tokens matched with next_tok at p
    best_b1 = jnp.max(matched_bp, axis=1, keepdims=True)
    far = jnp.iinfo(jnp.int32).max
    at_b = jnp.argmin(jnp.where(matched_bp == best_b1, jnp.abs(p - n_b[:, None]), far), axis=1)  # nearest best
    j = jnp.arange(w)
    k_bw = at_b[:, None] + j  # draft index for offset n + j
    use_bw = (j > 0) & (best_b1 > 0) & (k_bw < draft_lens_b[:, None])
    return jnp.where(use_bw, _take(drafts_bd, k_bw, use_bw, -1), window_bw)


def _record_state(s: _State, k: jax.Array, live: jax.Array, draft_at, big_n: int) -> jax.Array:
    """s.states with each live row's current response (committed, window, draft past it) at index k[row]."""
    b, w = s.window.shape
    offsets = jnp.broadcast_to(jnp.arange(big_n), (b, big_n))
    rel = offsets - s.n[:, None]
    seq = jnp.where(rel < 0, s.tokens, jnp.where(rel < w, _take(s.window, rel, True, 0), draft_at(offsets)))
    slot = jnp.where(live, k, big_n)  # big_n: dropped
    return s.states.at[jnp.arange(b), slot].set(seq, mode="drop")


def _draft_at(s: _State, offsets: jax.Array, pad_id: int) -> jax.Array:
    return _take(s.drafts, offsets, offsets < s.draft_lens[:, None], pad_id)


def _empty(cfg, rows: int, prompt_width: int, draft_width: int, opts: JacobiOptions) -> _State:
    """`rows` empty slots (done, holding nothing) with a cache for prompts of up to `prompt_width` tokens."""
    big_n, block_size, pad_id = opts.max_new_tokens, opts.block_size, opts.pad_id

    def zeros():  # a buffer per field: the decode loops donate the state, field by field
        return jnp.zeros((rows,), jnp.int32)

    return _State(
        cache=init_cache(cfg, rows, prompt_width + big_n + block_size),
        tokens=jnp.full((rows, big_n), pad_id, jnp.int32),
        n=zeros(),
        window=jnp.zeros((rows, block_size), jnp.int32),
        passes=zeros(),
        stopped=zeros().astype(bool),
        done=jnp.ones((rows,), bool),
        capped=zeros().astype(bool),
        prompt_lens=zeros(),
        drafts=jnp.full((rows, max(draft_width, 1)), pad_id, jnp.int32),
        draft_lens=zeros(),
        held_n=zeros(),
        states=jnp.full((rows, big_n, big_n), pad_id, jnp.int32) if opts.trajectory else None,
    )


def _begin(
    model,
    s: _State,
    slots,
    prompts,
    prompt_lens,
    drafts,
    draft_lens,
    hold_lens,
    opts: JacobiOptions,
) -> _State:
    """Slots `slots` (int32 [R]) start refining rows (prompts [R, P], drafts [R, D], with lengths): the
    prompt (and the held draft prefix: hold_lens [R] <= opts.hold_draft_prefix tokens of each row) written into their cache
    rows, their state reset, the first window set; the other slots are unchanged."""
    hold, pad_id = opts.hold_draft_prefix, opts.pad_id
    r, w = slots.shape[0], s.window.shape[1]
    big_n, j = s.tokens.shape[1], jnp.arange(w)
    drafts = jnp.pad(drafts, ((0, 0), (0, max(0, s.drafts.shape[1] - drafts.shape[1]))), constant_values=pad_id)
    sub = slots_lib.rows(s, slots).replace(
        tokens=jnp.full((r, big_n), pad_id, jnp.int32),
        n=jnp.zeros((r,), jnp.int32),
        passes=jnp.zeros((r,), jnp.int32),
        stopped=jnp.zeros((r,), bool),
        done=jnp.zeros((r,), bool),
        capped=jnp.zeros((r,), bool),
        prompt_lens=prompt_lens,
        drafts=drafts[:, : s.drafts.shape[1]],
        draft_lens=draft_lens,
    )
    if sub.states is not None:
        sub = sub.replace(states=jnp.full_like(sub.states, pad_id))
    held = _draft_at(sub, jnp.broadcast_to(jnp.arange(hold), (r, hold)), pad_id)
    held_lens = jnp.minimum(draft_lens, jnp.minimum(hold_lens, hold))
    context, context_lens = _append(prompts, prompt_lens, held, held_lens, pad_id) if hold else (prompts, prompt_lens)
    positions = jnp.broadcast_to(jnp.arange(context.shape[1], dtype=jnp.int32), context.shape)
    hidden, cache = model(context, positions, positions < context_lens[:, None], sub.cache, return_hidden=True)
    last = model.head(jnp.take_along_axis(hidden, (context_lens - 1)[:, None, None], axis=1)[:, 0])  # [R, V]: the
    # last position only, never [R, P, V] (Gemma-2: 256k vocabulary entries per prompt position)
    sub = sub.replace(cache=cache)
    if hold:
        sub = _commit(sub, held, held_lens, opts.stop_tokens, big_n)
    first = jnp.argmax(last, axis=-1).astype(jnp.int32)
    sub = sub.replace(
        window=jnp.where(j == 0, first[:, None], _draft_at(sub, sub.n[:, None] + j, pad_id)), held_n=sub.n
    )
    return slots_lib.constrain_state(slots_lib.put_rows(s, slots, sub))


def _loop(model, s: _State, limit: jax.Array, watch: jax.Array, opts: JacobiOptions, max_passes=None) -> _State:
    """Jacobi passes over the live rows until every row is done, or one of the `watch` rows is; a row is
    capped after `limit` passes. `max_passes` (traced): stop after that many passes at most (the engine)."""
    b, w = s.window.shape
    big_n, j, pad_id = s.tokens.shape[1], jnp.arange(w), opts.pad_id

    def step(s: _State) -> _State:
        live = ~s.done
        positions = s.prompt_lens[:, None] + s.n[:, None] + j
        logits, cache = model(s.window, positions, jnp.broadcast_to(live[:, None], (b, w)), s.cache)
        y = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        accepted = 1 + jnp.sum(jnp.cumprod(s.window[:, 1:] == y[:, :-1], axis=1), axis=1)
        new = _commit(s.replace(cache=cache), s.window, accepted, opts.stop_tokens, big_n)
        src = accepted[:, None] - 1 + j  # index into y of the prediction for offset new.n + j
        window = jnp.where(src < w, _take(y, src, True, 0), _draft_at(new, new.n[:, None] + j, pad_id))
        if opts.realign:
            window = _realign(window, new.tokens, new.n, new.drafts, new.draft_lens)
        new = new.replace(window=jnp.where(live[:, None], window, s.window), passes=s.passes + live)
        if new.states is not None:
            new = new.replace(states=_record_state(new, s.passes, live, lambda o: _draft_at(new, o, pad_id), big_n))
        capped = ~new.done & (new.passes >= limit)
        return new.replace(done=new.done | capped, capped=new.capped | capped)

    def going(s: _State) -> jax.Array:
        return ~jnp.all(s.done) & ~jnp.any(s.done & watch)

    if max_passes is not None:
        s, _ = jax.lax.while_loop(lambda c: going(c[0]) & (c[1] < max_passes), lambda c: (step(c[0]), c[1] + 1), (s, 0))
        return slots_lib.constrain_state(s)
    return slots_lib.constrain_state(jax.lax.while_loop(going, step, s))


def _result(s: _State) -> JacobiResult:
    return JacobiResult(
        tokens=s.tokens,
        lengths=s.n,
        stopped=s.stopped,
        converged=s.done & ~s.capped,
        passes=s.passes,
        committed=s.n - s.held_n,
        states=s.states,
    )


def jacobi_decode(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompts: jax.Array,
    prompt_lens: jax.Array,
    drafts: jax.Array,
    draft_lens: jax.Array,
    *,
    block_size: int,
    max_new_tokens: int,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int = 0,
    max_iterations: int | jax.Array | None = None,
    hold_draft_prefix: int = 0,
    hold_lens: jax.Array | None = None,
    realign: bool = True,
    trajectory: bool = False,
) -> JacobiResult:
    """Refine `drafts` (right-padded int32 [B, D] + lengths [B]; any D, empty rows allowed) into the
    greedy answers to `prompts` (see the module docstring; the keyword options are `JacobiOptions`'s).
    max_iterations: cap on passes per row (default max_new_tokens, which always suffices); hold_lens [B]:
    per-row held tokens (default hold_draft_prefix). The programs of row refill: `_start` (the rows'
    prefills, one row at a time) and the donated loop `_advance`, run once to the end."""
    opts = JacobiOptions(block_size, max_new_tokens, stop_tokens, pad_id, hold_draft_prefix, realign, trajectory)
    b = prompts.shape[0]
    holds = np.full((b,), hold_draft_prefix, np.int32) if hold_lens is None else hold_lens
    s = _start(graphdef, state, prompts, prompt_lens, drafts, draft_lens, holds, batch_size=b, opts=opts)
    limit = np.int32(max_new_tokens if max_iterations is None else max_iterations)
    return _result(_advance(graphdef, state, s, limit, np.zeros((b,), bool), opts=opts))


@partial(jax.jit, static_argnames=("graphdef", "batch_size", "opts"))
def _start(
    graphdef, state, prompts, prompt_lens, drafts, draft_lens, hold_lens, *, batch_size: int, opts: JacobiOptions
):
    """`batch_size` slots, the first R refining rows 0..R-1 (prompts [R, P], drafts [R, D] with their
    lengths, hold_lens [R]), started one row after the other (slots.start), the others empty."""
    model = nnx.merge(graphdef, state)
    s = _empty(model.cfg, batch_size, prompts.shape[1], drafts.shape[1], opts)
    rows = (prompts, prompt_lens, drafts, draft_lens, hold_lens)
    return slots_lib.start(
        s, tuple(x.astype(jnp.int32) for x in rows), lambda s, slot, row: _begin(model, s, slot, *row, opts)
    )


@partial(jax.jit, static_argnames=("graphdef", "opts"), donate_argnames=("s",))
def _refill(graphdef, state, s, slot, prompt, prompt_len, draft, draft_len, hold_len, *, opts: JacobiOptions):
    """Slot `slot` starts refining one row (prompt [P], draft [D] with their lengths; hold_len held tokens)."""
    return _begin(
        nnx.merge(graphdef, state),
        s,
        slot[None],
        prompt[None],
        prompt_len[None],
        draft[None],
        draft_len[None],
        hold_len[None],
        opts,
    )


@partial(jax.jit, static_argnames=("graphdef", "opts"), donate_argnames=("s",))
def _advance(graphdef, state, s, limit, watch, *, opts: JacobiOptions):
    """Passes until a `watch` slot's row is done (or every slot is)."""
    return _loop(nnx.merge(graphdef, state), s, limit, watch, opts)


def jacobi_stream(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompts: np.ndarray,
    prompt_lens: np.ndarray,
    drafts: np.ndarray,
    draft_lens: np.ndarray,
    *,
    batch_size: int,
    block_size: int,
    max_new_tokens: int,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int = 0,
    max_iterations: int | None = None,
    hold_draft_prefix: int = 0,
    hold_lens: np.ndarray | None = None,
    realign: bool = True,
    mesh: Mesh | None = None,
) -> JacobiResult:
    """`jacobi_decode` of any number of rows (numpy [R, P], [R, D] and lengths) through `batch_size` slots
    with row refill (continuous batching): each slot refines one row at a time, and when rows finish the
    loop returns to the host, which moves their results out and starts the next rows in their slots (one
    prefill each), so no slot idles while the slowest row of a batch finishes. Each row's answer and
    stats are the ones `jacobi_decode` gives it; the result (numpy) is in row order. `mesh`: the slots
    are split over its data x fsdp devices, as the decoder's batches are. No trajectory."""
    opts = JacobiOptions(block_size, max_new_tokens, stop_tokens, pad_id, hold_draft_prefix, realign)
    limit = np.int32(max_new_tokens if max_iterations is None else max_iterations)
    holds = (
        np.full((len(prompts),), hold_draft_prefix, np.int32) if hold_lens is None else np.asarray(hold_lens, np.int32)
    )
    k = min(len(prompts), batch_size)
    first = (prompts[:k], prompt_lens[:k], drafts[:k], draft_lens[:k], holds[:k])
    s = slots_lib.place(_start(graphdef, state, *first, batch_size=batch_size, opts=opts), mesh)

    def begin(s: _State, slot: int, row: int) -> _State:
        return _refill(
            graphdef,
            state,
            s,
            np.int32(slot),
            prompts[row],
            prompt_lens[row],
            drafts[row],
            draft_lens[row],
            holds[row],
            opts=opts,
        )

    def advance(s: _State, watch: np.ndarray) -> _State:
        return _advance(graphdef, state, s, limit, watch, opts=opts)

    return JacobiResult(**slots_lib.stream(s, len(prompts), begin=begin, advance=advance, result=_result))


# The slot-level steps of `jacobi_stream`, public for the serving engine (decoding/engine.py), which
# starts rows in free slots between passes as requests arrive: empty slots, a row started in one
# (its prefill), the per-slot results.
empty_slots = _empty
start_row = _refill
slot_results = _result


@partial(jax.jit, static_argnames=("graphdef", "opts", "rows"), donate_argnames=("s",))
def run_passes(graphdef, state, s, limit, max_passes, *, opts: JacobiOptions, rows: int):
    """At most `max_passes` passes over slots 0..rows-1 (fewer when each of them is done); the other slots
    are left as they are, so a pass costs `rows` rows, not every slot's (the engine keeps its live rows
    first). Compiled once per `rows`."""
    model = nnx.merge(graphdef, state)
    sub = slots_lib.prefix(s, rows)
    sub = _loop(model, sub, limit, jnp.zeros(sub.done.shape, bool), opts, max_passes)
    return slots_lib.constrain_state(slots_lib.put_prefix(s, sub))


@partial(jax.jit, donate_argnames=("s",))
def move_row(s, src, dst):
    """Slot `dst` takes over the row of slot `src` (its cache and loop state), and `src` is empty (done)."""
    s = slots_lib.put_rows(s, dst[None], slots_lib.rows(s, src[None]))
    return slots_lib.constrain_state(s.replace(done=s.done.at[src].set(True)))
