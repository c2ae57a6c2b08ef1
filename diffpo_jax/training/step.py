"""The sharded train step: the TrainState pytree, the optimizer, one jitted update of the DiffPO loss.

    tx, schedule = make_optimizer(OptimizerConfig(...), total_steps)
    shardings = state_shardings(tx, param_shardings_dict, mesh)
    state = init_state(params, tx, shardings)
    train_step = make_train_step(graphdef, tx, schedule, LossConfig(...), shardings, mesh, grad_accum)
    state, metrics = train_step(state, global_batch(local_numpy_batch, mesh))

Parameters live in `TrainState.params` as a plain nested dict of arrays (`nnx.to_pure_dict`, the
on-disk format of weights/checkpoint.py), each with its `param_shardings` sharding; the model is
`nnx.merge(graphdef, frozen, params)` inside the step. Optimizer state takes the shardings of the parameters
it mirrors (Adam's mu / nu), scalars are replicated. The batch is split over (data, fsdp).
LoRA (lora.py): `params` are the adapters alone, so only they get gradients and optimizer state, and
`TrainState.frozen` holds the base (sharded as in full fine-tuning, passed through every step as it
came); without LoRA `frozen` is empty. Both loss terms, the consistency teacher pass included, run
the one adapted model, unless `loss.teacher = "frozen"`: then the KL's teacher is the base alone (the
adapters zeroed), one more forward over [prompt, y(T)] without a backward: the target stays where stage A
put it instead of moving with the student.

Precision: parameters, gradients and optimizer state are in `param_dtype` (fp32 = master weights),
activations in the model config's `dtype` (e.g. bf16; the model casts weights at use); the loss's
log-softmax is fp32 either way. Gradients are accumulated in fp32.

Gradient accumulation: the global batch [B] is split into `grad_accum` micro-batches of B / grad_accum
rows (micro-batch m = rows m, m + grad_accum, ..., so each keeps its rows on the devices that hold
them) and scanned; every micro-batch divides by the valid positions of the whole batch (loss.py), so
the summed gradient is the full batch's. One call = one optimizer update. The state is donated.

`loss.con_gradient = "project"` (PCGrad, Yu et al. 2020, for the two terms): the gradients of L_AR and
L_Con are taken separately (one forward, two backward passes: `jax.vjp` with each term's cotangent),
accumulated over the micro-batches, and when they conflict (g_Con . g_AR < 0) g_Con loses its component
along g_AR before the update ar_weight * g_AR + w * g_Con. So the consistency term can never push
against the AR term's direction; it only moves the weights where L_AR is indifferent or agrees.
`loss.con_gradient = "balance"`: the same two gradients, and g_Con is rescaled to the norm of g_AR
before the update, ar_weight * g_AR + w * (|g_AR| / |g_Con|) * g_Con: w is then the consistency update's
norm relative to the AR update's, every step, whatever the data makes the KL's scale (the fixed-w
balance point w* = |g_AR| / |g_Con| differs between datasets, so one fixed w cannot suit all of them;
bench/RESULTS.md).
Both modes add to the metrics the cosine of the two full-batch gradients as they came (`con_ar_cos`) and
their norms (`ar_grad_norm`, `con_grad_norm`; the balance weight w* = ar_grad_norm / con_grad_norm).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffpo_jax.data.loader import BATCH_KEYS
from diffpo_jax.lora import union
from diffpo_jax.sharding import LOGICAL_RULES, batch_sharding
from diffpo_jax.training.loss import LossConfig, diffpo_loss, effective_con_weight, response_token_losses

METRICS = ("loss", "ar", "con", "grad_norm", "lr", "tokens")


TERM_METRICS = ("con_ar_cos", "ar_grad_norm", "con_grad_norm")  # con_gradient "project" / "balance"


def metric_names(loss_cfg: LossConfig) -> tuple[str, ...]:
    return METRICS + (TERM_METRICS if loss_cfg.con_gradient != "sum" else ())


def _vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _term_stats(dot, ar2, con2) -> dict[str, jax.Array]:
    return {
        "con_ar_cos": dot / jnp.maximum(jnp.sqrt(ar2 * con2), 1e-30),
        "ar_grad_norm": jnp.sqrt(ar2),
        "con_grad_norm": jnp.sqrt(con2),
    }


def project_conflict(g_con, g_ar) -> tuple[Any, dict[str, jax.Array]]:
    """(g_con without its component along g_ar when the two conflict (negative dot product), the
    metrics TERM_METRICS of the two gradients before the projection): PCGrad's projection."""
    dot, ar2, con2 = _vdot(g_con, g_ar), _vdot(g_ar, g_ar), _vdot(g_con, g_con)
    coef = jnp.where(dot < 0, dot / jnp.maximum(ar2, 1e-30), 0.0)
    return jax.tree.map(lambda c, a: c - coef * a, g_con, g_ar), _term_stats(dot, ar2, con2)


def balance_norm(g_con, g_ar) -> tuple[Any, dict[str, jax.Array]]:
    """(g_con rescaled to the norm of g_ar, the metrics TERM_METRICS of the two gradients as they came)."""
    dot, ar2, con2 = _vdot(g_con, g_ar), _vdot(g_ar, g_ar), _vdot(g_con, g_con)
    scale = jnp.sqrt(ar2) / jnp.maximum(jnp.sqrt(con2), 1e-30)
    return jax.tree.map(lambda c: c * scale, g_con), _term_stats(dot, ar2, con2)


ADJUST_CON_GRADIENT = {"project": project_conflict, "balance": balance_norm}


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer updates applied so far
    params: dict  # the trained params: nested dict of arrays (nnx.to_pure_dict of the model's params)
    opt_state: Any  # optax state over `params`
    frozen: dict = struct.field(default_factory=dict)  # the params not trained (LoRA: the base), or {}


def model_params(state: TrainState) -> dict:
    """All the model's params, trained and frozen, as one nested dict (what `nnx.merge(graphdef, ...)` takes)."""
    return union(state.frozen, state.params)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW on a cosine schedule with linear warmup, after clipping the global gradient norm."""

    learning_rate: float = 2e-6  # peak
    warmup_ratio: float = 0.03  # of the total steps, rounded up (as transformers' Trainer)
    weight_decay: float = 0.0  # decoupled (AdamW), on every parameter
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping


def make_schedule(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """0 -> peak linearly over ceil(warmup_ratio * total_steps) updates, then cosine to 0 at total_steps."""
    warmup = math.ceil(opt.warmup_ratio * total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, warmup, max(total_steps, warmup + 1), 0.0)


def make_optimizer(opt: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(opt, total_steps)
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    clip = optax.clip_by_global_norm(opt.max_grad_norm) if opt.max_grad_norm else optax.identity()
    return optax.chain(clip, adamw), schedule


def state_shardings(
    tx: optax.GradientTransformation,
    params_sharding: dict,
    abstract_params: dict,
    mesh: Mesh,
    frozen_sharding: dict | None = None,
) -> TrainState:
    """The TrainState's shardings: params (and frozen params) as given, optimizer moments like their
    params, scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, params_sharding, transform_non_params=lambda _: replicated
    )
    return TrainState(step=replicated, params=params_sharding, opt_state=opt, frozen=frozen_sharding or {})


def abstract_state(
    tx: optax.GradientTransformation, abstract_params: dict, shardings: TrainState, abstract_frozen: dict | None = None
) -> TrainState:
    """ShapeDtypeStructs with shardings for every TrainState leaf (restore targets: the checkpointed
    step, params and optimizer state; `frozen` only when `abstract_frozen` is given)."""
    shapes = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32),
        abstract_params,
        jax.eval_shape(tx.init, abstract_params),
        abstract_frozen or {},
    )
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        shapes,
        shardings if abstract_frozen else shardings.replace(frozen={}),
    )


def init_state(
    params: dict, tx: optax.GradientTransformation, shardings: TrainState, frozen: dict | None = None
) -> TrainState:
    """A fresh TrainState (step 0, zero moments) placed on `shardings`; `params` and `frozen` are donated."""

    def init(params, frozen):
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), frozen)

    return jax.jit(init, out_shardings=shardings, donate_argnums=(0, 1))(params, frozen or {})


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays split over (data, fsdp) (multi-host: rows of all processes)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, local[k].ndim), local[k]) for k in BATCH_KEYS
    }


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_cfg: LossConfig,
    shardings: TrainState,
    mesh: Mesh,
    grad_accum: int = 1,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """jit(step)(state, batch) -> (new state, metrics); metrics (replicated fp32 scalars, METRICS):
    loss = ar_weight * ar + w * con, ar = L_AR, con = L_Con, grad_norm (before clipping), lr (this update's),
    tokens (valid response positions of the batch, the loss denominator)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, LOGICAL_RULES["batch"]))  # [micro-batch, rows, ...]

    def loss_fn(params, frozen, micro, num_tokens, w):
        model = nnx.merge(graphdef, frozen, params)
        # loss.teacher = "frozen" (LoRA): the base without adapters (zero adapters add nothing) teaches the KL
        teacher = nnx.merge(graphdef, frozen, jax.tree.map(jnp.zeros_like, params)) if frozen_teacher else None
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # activations pinned (sharding.constrain)
            ce, kl = response_token_losses(model, micro, loss_cfg.chunk, teacher)
        return diffpo_loss(ce, kl, micro, loss_cfg, num_tokens=num_tokens, con_weight=w)

    frozen_teacher = loss_cfg.teacher == "frozen"
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    separate = loss_cfg.con_gradient != "sum"  # the two terms' gradients, taken apart (module doc)

    def term_grads(params, frozen, micro, num_tokens):
        """((L_AR, L_Con), (g_AR, g_Con)) of one micro-batch: one forward, one backward per term."""
        (ar, con), vjp = jax.vjp(
            lambda p: tuple(loss_fn(p, frozen, micro, num_tokens, 0.0)[1][k] for k in ("ar", "con")), params
        )
        one, zero = jnp.ones_like(ar), jnp.zeros_like(ar)
        return (ar, con), (vjp((one, zero))[0], vjp((zero, one))[0])

    def step(state: TrainState, batch: dict[str, jax.Array]):
        num_tokens = jnp.maximum(jnp.sum(batch["best_mask"]), 1).astype(jnp.float32)
        vocab_size = nnx.merge(graphdef, state.frozen, state.params).cfg.vocab_size  # static; traces no compute
        w = effective_con_weight(loss_cfg, state.step, vocab_size)  # warm-up and the vocab reading (loss.py)

        def split(x):  # [B, ...] -> [grad_accum, B / grad_accum, ...], micro-batch m = rows m::grad_accum
            x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, micro_sharding)

        def add(acc, g):
            return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)

        def accumulate(carry, micro):
            grads, ar, con = carry
            if separate:
                (a, c), (g_ar, g_con) = term_grads(state.params, state.frozen, micro, num_tokens)
                return ((add(grads[0], g_ar), add(grads[1], g_con)), ar + a, con + c), None
            (_, parts), g = grad_fn(state.params, state.frozen, micro, num_tokens, w)
            return (add(grads, g), ar + parts["ar"], con + parts["con"]), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        zeros = jax.lax.with_sharding_constraint(zeros, shardings.params)
        carry = ((zeros, zeros) if separate else zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, ar, con), _ = jax.lax.scan(accumulate, carry, {k: split(v) for k, v in batch.items()})
        extra = {}
        if separate:
            g_con, extra = ADJUST_CON_GRADIENT[loss_cfg.con_gradient](grads[1], grads[0])
            grads = jax.tree.map(lambda a, c: loss_cfg.ar_weight * a + w * c, grads[0], g_con)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_cfg.ar_weight * ar + w * con,
            "ar": ar,
            "con": con,
            "grad_norm": optax.tree.norm(grads),
            "lr": jnp.asarray(schedule(state.step), jnp.float32),
            "tokens": num_tokens,
        } | extra
        return TrainState(state.step + 1, params, opt_state, state.frozen), metrics

    batch_shardings = {k: batch_sharding(mesh, 2) for k in BATCH_KEYS}
    return jax.jit(
        step,
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, {k: replicated for k in metric_names(loss_cfg)}),
        donate_argnums=0,
    )
