"""The DiffPO loss (paper eqs. 4-6): L = L_AR + w * L_Con, from one model call over teacher and student rows.

Inputs are a batch of the trajectory loader (diffpo_jax/data/loader.py): `prompt` [b, P] left-padded with
`prompt_mask`, `best` = y(T) [b, N] with `best_mask`, `worse` = y(t) [b, N] (right-padded with pad ids).

Sequences. The teacher sequence is [prompt, best], the student sequence [prompt, worse]. They share
the prompt, whose hidden states are the same in both (causal attention), so both are packed in ONE
row [prompt, best, worse] and run as ONE model call over [b, P + 2N] with segments 0 / 1 / 2: best
and worse sit at the same positions (prompt length + 0 .. N-1) and each sees the prompt and itself,
never the other (model.py, `segments`). Every hidden state equals the one the separate row would
give, and the prompt is computed once: P / (2 (P + N)) fewer tokens (25% at P = N = 256). Mask =
prompt_mask ++ ones(2N); prompt positions = cumsum(prompt_mask) - 1.
  - Student: the response window is a fixed-length N sequence; the pad tokens past the end of y(t) are
    attended, at increasing positions. This is what the model sees when refining: Jacobi decoding
    fills a fixed N-token window with the draft and pad tokens past it (the authors' inference attends
    to all of it, as do CLLM's fixed-length trajectories). Masking them instead would give every
    column past y(t)'s end the same context AND the same position, i.e. one student distribution
    trained towards N - len(y(t)) different teacher distributions.
  - Teacher: columns past the end of y(T) only feed positions that the loss masks out (causal
    attention), so attending to them or not changes nothing.

Per response position i (0 <= i < N) the logits are those of the hidden state before token i: the
last prompt column for i = 0 (shared, so kl_0 = 0), else the previous column of the row's own segment:
  ce_i = -log softmax(z_T,i)[y(T)_i]                                 gradient flows (the AR loss)
  kl_i = sum_v p(v) (log p(v) - log q(v)),  p = softmax(stop_gradient(z_T,i)),  q = softmax(z_S,i)
i.e. the forward KL(teacher || student) of eq. 4, with the teacher under stop_gradient. Log-softmax is
computed in fp32 whatever the activation dtype.

Positions of the consistency term (`LossConfig.con_positions`):
  - "all" (the paper's eq. 4 as written): every position where y(T) has a token.
  - "draft" (the presets): only positions i < len(y(t)), where the student's input token y(t)_{i-1} is a
    draft token (not y(t)'s end-of-turn token or the pad tail past it). Past the draft's end the student
    context says nothing about y(T)_i; asking it to predict the teacher there is asking it to predict
    without context, and the cheapest way to lower that KL is a prefix-blind model (a collapse to one
    repeated token; bench/RESULTS.md). In refinement those window slots hold pad guesses
    that are never accepted before the tokens in front of them are, so nothing is lost.
  - "frontier": the draft's positions in the `con_window` positions after the first mismatch m (the
    first i with y(t)_i != y(T)_i): m < i <= m + con_window. Jacobi decoding accepts tokens only just
    after its committed prefix, from contexts of that prefix plus a few guesses; these positions are
    those contexts (positions up to m have the same prefix in both rows, so kl = 0 there anyway). Far
    past the mismatch the student's prefix is another answer altogether, and asking it to predict y(T)
    there teaches it to ignore its prefix, which the held-out L_AR shows (bench/RESULTS.md).
Positions with the same prefix in both rows (before the first mismatch) have kl = 0 exactly.

Normalisation (both terms): a masked sum over the global batch divided by the number n of valid
response positions, valid = best_mask (where y(T) has a token, its end-of-turn token included):
    L_AR = sum(ce * best_mask) / n,   L_Con = sum(kl * con_mask) / n,   n = sum(best_mask)
with con_mask = best_mask ("all") or best_mask & worse_mask ("draft").
n counts the whole global batch, so with gradient accumulation every micro-batch divides its sums by
the same n and the accumulated gradient equals the full batch's. (The paper writes sums over the N
positions; a per-token mean keeps L_AR and L_Con on the scales that w = 1e3 was chosen for, as in CLLM.)

Two equal ways to get ce and kl from the hidden states (`LossConfig.chunk`):
  - chunk = 0 (plain): logits for all N response positions at once.
  - chunk = C > 0: `lax.map` over C-position slices of the response, each slice's hidden @ head ->
    log-softmax -> ce/kl under `jax.checkpoint`, so the backward pass recomputes the slice's logits
    instead of keeping the [b, N, V] fp32 distributions alive (Gemma-2's 256k vocabulary makes them the
    memory peak). Same function per slice, so values and gradients equal the plain path's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffpo_jax.sharding import RESIDUAL, constrain

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    con_weight: float = 1e3  # w in L = ar_weight * L_AR + w * L_Con (paper: 1e3)
    ar_weight: float = 1.0  # 0 = consistency only (the ablation of bench/consistency.py)
    con_positions: str = "all"  # "all" (paper) | "draft" | "frontier": which positions L_Con covers (module doc)
    con_window: int = 16  # "frontier": positions covered after the first mismatch
    con_gradient: str = "sum"  # "sum" (paper) | "project" | "balance": g_Con projected / rescaled (training/step.py)
    con_norm: str = "token"  # "token": w weighs the per-token KL | "vocab": w / V (the paper's w read at its scale)
    con_warmup_steps: int = 0  # w ramps linearly from 0 to its value over this many updates (0: w from the start)
    teacher: str = "live"  # the KL's teacher: "live" (the trained model, stop-gradient) | "frozen" (the base: LoRA)
    chunk: int = 0  # response positions per lm-head slice; 0 = all at once (see module doc)


def sequences(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array, np.ndarray]:
    """(tokens, positions, mask) [b, P + 2N] and the static segments [P + 2N]: rows [prompt, best, worse],
    segments 0 / 1 / 2, best and worse both at positions prompt length + 0 .. N-1."""
    prompt, prompt_mask = batch["prompt"], batch["prompt_mask"]
    b, n = batch["best"].shape
    p = prompt.shape[1]
    tokens = jnp.concatenate([prompt, batch["best"], batch["worse"]], axis=1)
    mask = jnp.concatenate([prompt_mask, jnp.ones((b, 2 * n), bool)], axis=1)
    prompt_pos = jnp.cumsum(prompt_mask, axis=1, dtype=jnp.int32) - 1
    response_pos = prompt_pos[:, -1:] + 1 + jnp.arange(n, dtype=jnp.int32)
    positions = jnp.concatenate([prompt_pos, response_pos, response_pos], axis=1)
    segments = np.repeat(np.arange(3, dtype=np.int32), [p, n, n])
    return tokens, positions, mask, segments


def token_losses(
    teacher_logits: jax.Array,
    student_logits: jax.Array,
    targets: jax.Array,
    frozen_teacher_logits: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per position (ce, kl), fp32 [...]: CE of `targets` under the teacher logits (with gradient) and
    KL(softmax(stop_gradient(teacher)) || softmax(student)), the KL's teacher being `frozen_teacher_logits`
    when given (loss.teacher = "frozen"). logits: [..., V]; targets: int [...]."""
    t_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(t_logp, targets[..., None], axis=-1)[..., 0]
    if frozen_teacher_logits is not None:
        t_logp = jax.nn.log_softmax(frozen_teacher_logits.astype(jnp.float32), axis=-1)
    p_logp = jax.lax.stop_gradient(t_logp)
    kl = jnp.sum(jnp.exp(p_logp) * (p_logp - s_logp), axis=-1)
    return ce, kl


def chunked_token_losses(
    head: Callable[[jax.Array], jax.Array],
    teacher_hidden: jax.Array,
    student_hidden: jax.Array,
    targets: jax.Array,
    chunk: int,
    frozen: tuple[Callable[[jax.Array], jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`token_losses(head(teacher_hidden), head(student_hidden), targets[, frozen_head(frozen_hidden)])` over
    `chunk`-position slices of axis 1, each slice rematerialised in the backward pass. hidden: [b, N, E];
    targets: [b, N]; frozen: (frozen_head, frozen_hidden) of a frozen teacher."""
    b, n = targets.shape
    pad = -n % chunk
    k = (n + pad) // chunk

    def slices(x):  # [b, N, ...] -> [k, b, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, k, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(xs):
        ht, hs, tg, hf = xs
        frozen_logits = None if hf is None else frozen[0](constrain(hf, RESIDUAL))
        return token_losses(head(constrain(ht, RESIDUAL)), head(constrain(hs, RESIDUAL)), tg, frozen_logits)

    hidden_f = None if frozen is None else slices(frozen[1])
    ce, kl = jax.lax.map(one, (slices(teacher_hidden), slices(student_hidden), slices(targets), hidden_f))
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, k * chunk)[:, :n]
    return merge(ce), merge(kl)


def response_token_losses(model, batch: Batch, chunk: int = 0, frozen_teacher=None) -> tuple[jax.Array, jax.Array]:
    """Per response position (ce, kl) [b, N] from one call of `model` (a Transformer) on the batch; with
    `frozen_teacher` (a Transformer: loss.teacher = "frozen") the KL's teacher is its distribution on
    [prompt, y(T)] (one more call, on those rows only, under stop_gradient) instead of `model`'s."""
    tokens, positions, mask, segments = sequences(batch)
    hidden, _ = model(tokens, positions, mask, segments=segments, return_hidden=True)
    n = batch["best"].shape[1]
    p = batch["prompt"].shape[1]
    last_prompt = hidden[:, p - 1 : p]  # predicts token 0 of both answers
    teacher = constrain(hidden[:, p - 1 : p - 1 + n], RESIDUAL)
    student = constrain(jnp.concatenate([last_prompt, hidden[:, p + n : p + 2 * n - 1]], axis=1), RESIDUAL)
    frozen = None
    if frozen_teacher is not None:
        f_hidden, _ = frozen_teacher(
            tokens[:, : p + n], positions[:, : p + n], mask[:, : p + n], segments=segments[: p + n], return_hidden=True
        )
        frozen = (frozen_teacher.head, jax.lax.stop_gradient(constrain(f_hidden[:, p - 1 : p - 1 + n], RESIDUAL)))
    if chunk:
        return chunked_token_losses(model.head, teacher, student, batch["best"], chunk, frozen)
    frozen_logits = None if frozen is None else frozen[0](frozen[1])
    return token_losses(model.head(teacher), model.head(student), batch["best"], frozen_logits)


CON_POSITIONS = ("all", "draft", "frontier")
CON_GRADIENTS = ("sum", "project", "balance")
CON_NORMS = ("token", "vocab")
TEACHERS = ("live", "frozen")


def effective_con_weight(cfg: LossConfig, step: jax.Array | int, vocab_size: int) -> jax.Array:
    """The w that multiplies L_Con (a per-token mean) at update `step`: cfg.con_weight, divided by the vocabulary
    size under con_norm = "vocab", times min(1, step / con_warmup_steps) while the warm-up lasts.

    "vocab" is the paper's w at its own scale: PyTorch's `KLDivLoss(reduction="mean")` over [tokens, V] logits
    (its default, and what a CLLM-derived trainer gets from `F.kl_div` without reduction="batchmean") divides
    the summed KL by tokens x V, so the paper's w = 1e3 is 1e3 / V per token: 0.0039 for Gemma-2 (V = 256,000),
    0.0078 for Llama-3, 0.020 for SmolLM2 (V = 49,152)."""
    if cfg.con_norm not in CON_NORMS:
        raise ValueError(f"con_norm must be one of {CON_NORMS}, got {cfg.con_norm!r}")
    w = cfg.con_weight / (vocab_size if cfg.con_norm == "vocab" else 1)
    if cfg.con_warmup_steps:
        w = w * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / cfg.con_warmup_steps)
    return jnp.asarray(w, jnp.float32)


def first_mismatch(batch: Batch) -> jax.Array:
    """int [b]: the first response index where y(t) differs from y(T) (token, or one row ended); N if none."""
    differ = (batch["best"] != batch["worse"]) | (batch["best_mask"] != batch["worse_mask"])
    n = differ.shape[1]
    return jnp.where(jnp.any(differ, axis=1), jnp.argmax(differ, axis=1), n)


def con_mask(batch: Batch, con_positions: str, con_window: int = 16) -> jax.Array:
    """bool [b, N]: the positions L_Con covers (module doc)."""
    if con_positions == "all":
        return batch["best_mask"]
    draft = batch["best_mask"] & batch["worse_mask"]
    if con_positions == "draft":
        return draft
    if con_positions == "frontier":
        m = first_mismatch(batch)[:, None]
        i = jnp.arange(draft.shape[1])
        return draft & (i > m) & (i <= m + con_window)
    raise ValueError(f"con_positions must be one of {CON_POSITIONS}, got {con_positions!r}")


def diffpo_loss(
    ce: jax.Array,
    kl: jax.Array,
    batch: Batch,
    cfg: LossConfig,
    *,
    num_tokens: jax.Array,
    con_weight: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(ar_weight * L_AR + w * L_Con, {"ar": L_AR, "con": L_Con}): masked sums divided by `num_tokens`
    (the valid positions of the global batch, see module doc). w: `con_weight` (the trainer passes
    `effective_con_weight`), else cfg.con_weight as written."""
    ar = jnp.sum(ce * batch["best_mask"]) / num_tokens
    con = jnp.sum(kl * con_mask(batch, cfg.con_positions, cfg.con_window)) / num_tokens
    w = cfg.con_weight if con_weight is None else con_weight
    return cfg.ar_weight * ar + w * con, {"ar": ar, "con": con}
