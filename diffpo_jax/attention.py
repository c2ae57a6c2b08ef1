"""Attention of queries over keys under a mask: one function, implementations chosen by backend.

    out = attend(q, keys, values, allowed, scale=..., softcap=..., implementation=...)

q [B, T, H, D], keys / values [B, S, Kv, D] (grouped-query: H a multiple of Kv), allowed bool [B, T, S]
(the model builds it from positions, windows and segments), out [B, T, H, D] in q's dtype.

Implementations (ModelConfig.attention; "auto" picks with `choose`):
  einsum  the reference: grouped einsums in the activation dtype, soft-cap, masked fp32 softmax. Every
          parity test against transformers runs it; the default wherever nothing faster applies.
  xla     jax.nn.dot_product_attention's XLA path (fp32 logits and softmax); equal to einsum to fp32
          rounding, and the CPU-testable stand-in for the fused kernel below.
  cudnn   jax.nn.dot_product_attention's cuDNN flash kernel. Preconditions (`cudnn_unfit`, checked from
          static information before tracing, so a call that cannot run falls back to einsum with a logged
          reason instead of raising inside XLA): an NVIDIA GPU of compute capability >= 8.0, bf16 / fp16,
          head_dim a multiple of 8 and at most 128, no soft-cap (Gemma-2 stays on einsum), and even query
          and key lengths (the mask reaches cuDNN as an additive bias, and JAX rejects a bias over odd
          lengths when differentiating, which a trace-time check cannot see, so odd lengths always fall
          back). The mask goes in as a boolean `mask` (XLA: a select, no bias gradient; cuDNN turns it
          into the bias itself). "auto" picks it on GPU where it applies.
  splash  the Pallas splash kernel (jax.experimental.pallas.ops.tpu.splash_attention; TPU, interpreted
          elsewhere, which is how CPU tests check it): flash attention that skips the masked-out blocks,
          with soft-cap, sliding windows and segments. It needs the mask as a STATIC pattern, which only
          packed rows give (`Packed`: training's [prompt, best, worse] rows, whose pattern depends on the
          shapes alone; the row's left padding goes in as segment ids); calls without one (decoding, whose
          per-row cache frontier is data) run einsum. "auto" picks it on TPU for packed calls with a
          head_dim that is a multiple of 128 (the TPU lane width).

An explicit request whose kernel cannot run the call falls back too (xla with a soft-cap, cudnn off its
preconditions: einsum), logged once per distinct reason as a warning, since einsum is the reference the
kernels are tested against: the numerics stay those of the model, only the speed changes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from diffpo_jax.sharding import MESH_AXES, logical_to_spec

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "splash")
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MIN_CAPABILITY = (8, 0)  # cuDNN flash attention: Ampere or later
SPLASH_BLOCK = 128  # splash's query / key tile (TPU lanes); packed rows are padded to a multiple of it

log = logging.getLogger(__name__)


def choose(
    implementation: str,
    *,
    dtype: str,
    head_dim: int,
    softcap: float | None,
    packed: bool,
    lengths: tuple[int, int] | None = None,
    backend: str | None = None,
    capability: tuple[int, int] | str | None = None,
) -> str:
    """The implementation for one call (module doc): "auto" means cudnn on GPU where it applies, splash on
    TPU for packed calls, else einsum; "splash" means einsum for calls that are not packed; an explicit
    xla / cudnn whose preconditions fail means einsum, with the reason logged. lengths: (T, S), None when
    not known yet (`attend` checks them again from its arrays); backend / capability: injectable, by
    default jax.default_backend() and the first device's compute capability (read on GPU only)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "einsum":
        return "einsum"
    if implementation == "splash":
        return "splash" if packed else "einsum"
    if implementation == "xla":
        return "xla" if softcap is None else _fall_back("xla", "it has no logit soft-cap", logging.WARNING)
    backend = backend or jax.default_backend()
    why = cudnn_unfit(
        dtype=dtype, head_dim=head_dim, softcap=softcap, lengths=lengths, backend=backend, capability=capability
    )
    if implementation == "cudnn":
        return "cudnn" if why is None else _fall_back("cudnn", why, logging.WARNING)
    if backend == "gpu":
        return "cudnn" if why is None else _fall_back("auto", f"not cudnn, since {why}", logging.INFO)
    return "splash" if backend == "tpu" and packed and head_dim % 128 == 0 else "einsum"


def cudnn_unfit(
    *,
    dtype: str,
    head_dim: int,
    softcap: float | None,
    lengths: tuple[int, int] | None = None,
    backend: str | None = None,
    capability: tuple[int, int] | str | None = None,
) -> str | None:
    """Why cuDNN's fused attention cannot run a call (module doc), or None when it can: the checks JAX's
    cuDNN path makes at lowering (fused_attention_stablehlo.check_is_flash_attention, dtype, device), made
    here from static information so that the caller can fall back instead."""
    backend = backend or jax.default_backend()
    if backend != "gpu":
        return f"backend {backend!r} is not a GPU"
    if softcap is not None:
        return "cuDNN has no logit soft-cap"
    if dtype not in CUDNN_DTYPES:
        return f"dtype {dtype} is not one of {', '.join(CUDNN_DTYPES)}"
    if head_dim % 8 or head_dim > 128:
        return f"head_dim {head_dim} is not a multiple of 8 at most 128"
    if lengths is not None and any(n % 2 for n in lengths):
        return f"sequence lengths (T, S) = {tuple(lengths)} are not both even (cuDNN's masked kernel needs them)"
    cc = gpu_capability() if capability is None else capability
    cc = _parse_capability(cc)
    if cc is None:
        return "the GPU reports no CUDA compute capability"
    if cc < CUDNN_MIN_CAPABILITY:
        return f"GPU compute capability {cc[0]}.{cc[1]} is below {CUDNN_MIN_CAPABILITY[0]}.{CUDNN_MIN_CAPABILITY[1]}"
    return None


def gpu_capability() -> str | None:
    """The first device's CUDA compute capability ("9.0"), None where it has none (not an NVIDIA GPU)."""
    return getattr(jax.devices()[0], "compute_capability", None)


def _parse_capability(cc) -> tuple[int, int] | None:
    """(major, minor) from "9.0" or (9, 0); None for anything else (a ROCm "gfx90a", no capability)."""
    try:
        major, minor = (int(x) for x in (cc.split(".") if isinstance(cc, str) else cc))
    except (AttributeError, TypeError, ValueError):
        return None
    return major, minor


def _fall_back(requested: str, why: str, level: int) -> str:
    """einsum in place of `requested`, logged once per distinct reason (choose runs once per layer and trace)."""
    _log_once(level, f"attention {requested!r} falls back to einsum: {why}")
    return "einsum"


@functools.cache
def _log_once(level: int, message: str) -> None:
    log.log(level, message)


def within_reach(delta, window):
    """bool: a query sees a key `delta` positions back (causal, and within `window`; 0 = unlimited). Takes
    traced arrays (the model's mask) and numpy ones (`Packed.pattern`) alike: the one rule for both."""
    return (delta >= 0) & ((window == 0) | (delta < window))


@dataclasses.dataclass(frozen=True, eq=False)
class Packed:
    """Rows packed as [shared prefix (segment 0), continuation 1, continuation 2, ...] (model.py, `segments`).

    segments: static int [T], non-decreasing from 0: the layout, the same for every row. real: bool [B, T],
    False for the prefix's left padding. windows: the model's distinct window sizes (0 = full). The rows'
    positions must be the layout's (`slot_positions`) minus the row's left padding (what
    training/loss.py's `sequences` builds): then the mask of every real query is `pattern(window)` over the
    real keys, a static pattern, which is what splash needs."""

    segments: np.ndarray
    real: jax.Array
    windows: tuple[int, ...]

    def __post_init__(self):
        seg = np.asarray(self.segments)
        if seg.ndim != 1 or seg[0] != 0 or np.any(np.diff(seg) < 0):
            raise ValueError(f"packed segments must be a static [T] layout rising from 0, got {seg}")

    def visible(self) -> np.ndarray:
        """bool [T, T]: a query sees a key of its own segment or of the shared prefix (segment 0)."""
        seg = np.asarray(self.segments)
        return (seg[:, None] == seg[None, :]) | (seg[None, :] == 0)

    def slot_positions(self) -> np.ndarray:
        """int [T]: each slot's position in an unpadded row; every later segment continues the prefix."""
        seg = np.asarray(self.segments)
        first = np.searchsorted(seg, seg)  # each slot's segment start
        prefix = int(np.sum(seg == 0))
        return np.where(seg == 0, np.arange(len(seg)), prefix + np.arange(len(seg)) - first)

    def pattern(self, window: int) -> np.ndarray:
        """bool [T, T]: causal in position, within `window` (0: unlimited), and visible."""
        pos = self.slot_positions()
        delta = pos[:, None] - pos[None, :]
        return within_reach(delta, window) & self.visible()


def softcap_logits(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma-2's soft-cap, cap * tanh(x / cap) (attention and final logits); None: x."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def attend(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    allowed: jax.Array,
    *,
    scale: float,
    softcap: float | None,
    implementation: str,
) -> jax.Array:
    """Softmax(softcap(scale * q . k)) . v over the allowed keys (module doc); `implementation` not "auto".
    xla / cudnn are checked again against the arrays' static shapes and dtype (`choose`: the sequence
    lengths are known only here) and fall back to einsum where they cannot run. The mask goes to
    jax.nn.dot_product_attention as a boolean `mask`, not an additive bias: no bias gradient."""
    if implementation in ("xla", "cudnn"):
        implementation = choose(
            implementation,
            dtype=jnp.dtype(q.dtype).name,
            head_dim=q.shape[-1],
            softcap=softcap,
            packed=False,
            lengths=(q.shape[1], keys.shape[1]),
        )
    if implementation == "einsum":
        return _einsum(q, keys, values, allowed, scale, softcap)
    return jax.nn.dot_product_attention(
        q, keys, values, mask=allowed[:, None], scale=scale, implementation=implementation
    )


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


def splash_attend(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    packed: Packed,
    window: jax.Array,
    *,
    scale: float,
    softcap: float | None,
) -> jax.Array:
    """`attend` for packed rows through the splash kernel (module doc): q [B, T, H, D], keys / values
    [B, T, Kv, D], window the layer's (traced; one kernel per distinct window, picked by lax.switch). Equal
    to einsum on the real query rows; a padding query attends the padding before it (einsum: nothing).
    Under a (data, fsdp, tensor) mesh it runs per shard (rows over data x fsdp, heads over tensor)."""
    b, t, h, d = q.shape
    kv = keys.shape[2]
    padded = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    kernels = [_splash_kernel(packed, w, padded, h // kv, softcap) for w in packed.windows]
    windows = jnp.asarray(packed.windows, jnp.int32)
    branch = jnp.sum(jnp.where(windows == window, jnp.arange(len(packed.windows)), 0))

    def local(q, keys, values, real):  # one shard: [b, T, H, D], [b, T, Kv, D], [b, T]
        pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
        q = jnp.pad((q * jnp.asarray(scale, q.dtype)).reshape(q.shape[0], t, keys.shape[2], -1, d), pad + ((0, 0),))
        q = q.transpose(0, 2, 3, 1, 4)  # [b, Kv, G, T', D]
        keys, values = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (keys, values))  # [b, Kv, T', D]
        ids = jnp.pad(real.astype(jnp.int32), ((0, 0), (0, padded - t)))

        def row(q, keys, values, ids):  # [Kv, G, T', D], [Kv, T', D], [T']
            segment_ids = splash.SegmentIds(q=ids, kv=ids)
            per_head = [jax.vmap(functools.partial(k, segment_ids=segment_ids)) for k in kernels]
            return jax.lax.switch(branch, per_head, q, keys, values)

        out = jax.vmap(row)(q, keys, values, ids)[:, :, :, :t]  # [b, Kv, G, T, D]
        return out.transpose(0, 3, 1, 2, 4).reshape(out.shape[0], t, -1, d)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tuple(mesh.axis_names) != MESH_AXES:
        return local(q, keys, values, packed.real)
    # q and the output split their heads as the keys do: query head h belongs to key head h // G, so a
    # contiguous split of the key heads is one of the query heads.
    kv_spec = logical_to_spec(("batch", None, "kv_heads", None), keys.shape, mesh)
    row_spec = PartitionSpec(kv_spec[0], None)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(kv_spec, kv_spec, kv_spec, row_spec), out_specs=kv_spec, check_vma=False
    )(q, keys, values, packed.real)


def _splash_kernel(packed: Packed, window: int, padded: int, group: int, softcap: float | None):
    """The splash kernel of one window over `padded` slots, for `group` query heads per key head: the
    layout's pattern, plus each padding slot seeing itself (no query row may be empty)."""
    pattern = np.eye(padded, dtype=bool)
    t = len(packed.segments)
    pattern[:t, :t] = packed.pattern(window)
    block = splash.BlockSizes(
        block_q=SPLASH_BLOCK,
        block_kv=SPLASH_BLOCK,
        block_kv_compute=SPLASH_BLOCK,
        block_q_dkv=SPLASH_BLOCK,
        block_kv_dkv=SPLASH_BLOCK,
        block_kv_dkv_compute=SPLASH_BLOCK,
        block_q_dq=SPLASH_BLOCK,
        block_kv_dq=SPLASH_BLOCK,
    )
    mask = splash_mask.MultiHeadMask([splash_mask.NumpyMask(pattern)] * group)
    return splash.make_splash_mqa(
        mask,
        block_sizes=block,
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=softcap,
        interpret=jax.default_backend() != "tpu",
    )
