"""The decoder: one Flax NNX implementation for Llama-3 and Gemma-2.

    logits, cache = model(tokens, positions, mask=None, cache=None, segments=None)

tokens, positions: int32 [B, T]. mask: bool [B, T], True for real tokens (left or right padding both
work, since attention is decided by positions, not array slots). cache: a KV-cache dict from
`init_cache` or None (training / one-shot scoring). segments (no cache): a static numpy int [T], the
same for every row, or None; a query sees a key only if both are in the same segment or the key is in
segment 0 (a shared prefix). This packs several continuations of one prompt in a row: [prompt (0),
answer A (1), answer B (2)] with A and B at the same positions gives each answer exactly the context
of its own [prompt, answer] row. Being static, the layout lets attention use a kernel that needs its
mask pattern at trace time (splash; attention.py `Packed` states the positions it assumes).

KV cache layout (`KVCache`): slot == position; `k`, `v`: [L, B, S, Kv, D]. With a cache, each row's T
tokens sit at consecutive positions (positions[:, 0] + t, all below S: the decoders' prefill, Jacobi window
and AR step); a forward writes their keys/values as one contiguous window per row (one scatter of row
windows for all rows, `_ROW_WINDOWS`: the program does not grow with the batch), padding included, and
then attends over all S slots with `slot <= query position` (and the sliding window). Slots past a query's
position are never read, so stale entries (padding, Jacobi tokens that were not committed, a finished row's
last window) need no clean-up: they are overwritten when their position is decoded again. Each row advances
at its own pace.

Layers are stacked (every parameter under `layers` has a leading layer axis) and run with
`jax.lax.scan`: one compiled layer whatever the depth. Per-layer differences (Gemma-2's sliding
layers) are data: a window-size array scanned with the weights. Attention itself (the einsum reference,
cuDNN flash on GPU, splash on TPU for packed rows) is attention.py, picked by `ModelConfig.attention`.

LoRA: with `ModelConfig.lora`, each targeted projection NAME gets an `nnx.LoRA` adapter `NAME_lora`
beside it (built in the layer's constructor, so stacked and scanned like the rest), and its output
gains (alpha / rank) x A B (`_add_adapters`, `_adapted`; lora.py trains, merges and exports them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from diffpo_jax.attention import Packed, attend, choose, softcap_logits, splash_attend, within_reach
from diffpo_jax.config import LORA_TARGETS, ModelConfig
from diffpo_jax.sharding import RESIDUAL, constrain


@struct.dataclass
class KVCache:
    """Keys and values of every layer (module doc: slot == position)."""

    k: jax.Array  # [L, B, S, Kv, D]
    v: jax.Array  # [L, B, S, Kv, D]


_FAR = np.iinfo(np.int32).max // 2  # a key position no query reaches (padding keys)


def _param(rngs: nnx.Rngs, cfg: ModelConfig, shape: tuple[int, ...], axes: tuple[str, ...], init: str) -> nnx.Param:
    dtype = jnp.dtype(cfg.param_dtype)
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
    else:
        value = jnp.full(shape, 1.0 - cfg.norm_offset if init == "norm" else 0.0, dtype)
    return nnx.Param(value, logical_axes=axes)


def _weight(p: nnx.Param, dtype) -> jax.Array:
    """A parameter in the activation dtype, cast where it is stored (in its own sharding under a mesh),
    so FSDP gathers can move `dtype` (bf16) rather than the fp32 master copy."""
    return constrain(p[...].astype(dtype), p.get_metadata()["logical_axes"])


IN_DIMS = {"o_proj": 2}  # leading dims of a projection that are its input (1 for the others)


def _add_adapters(module: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs, kind: str) -> None:
    """With `cfg.lora`, an `nnx.LoRA` adapter `NAME_lora` beside each targeted projection NAME of
    `module` (kind: "attn" | "mlp"): A [in, rank] (he-uniform), B [rank, out] (zeros), fp32, with the
    projection's own logical axes on in / out (so they shard like it), in and out flattened as HF's
    Linear has them (q_proj [E, H, D]: in E, out H * D)."""
    if cfg.lora is None:
        return
    module.lora_scale = cfg.lora.scale
    for name in LORA_TARGETS[kind]:
        if name in cfg.lora.target_modules:
            w = getattr(module, name)
            k, axes = IN_DIMS.get(name, 1), w.get_metadata()["logical_axes"]
            lora = nnx.LoRA(
                math.prod(w.shape[:k]),
                cfg.lora.rank,
                math.prod(w.shape[k:]),
                dtype=cfg.dtype,
                param_dtype=jnp.float32,
                rngs=rngs,
                a_metadata={"logical_axes": (axes[0], None)},
                b_metadata={"logical_axes": (None, axes[k])},
            )
            setattr(module, f"{name}_lora", lora)


def _adapted(module: nnx.Module, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """`y` (projection NAME of `x`) plus its adapter's scale * x A B, when it has one."""
    lora = getattr(module, f"{name}_lora", None)
    if lora is None:
        return y
    return y + (lora(x) * module.lora_scale).reshape(y.shape).astype(y.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.scale = _param(rngs, cfg, (cfg.hidden_size,), ("embed",), "norm")
        self.eps = cfg.rms_norm_eps
        self.offset = cfg.norm_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.offset:  # Gemma-2: scale in fp32, then cast
            return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)  # Llama: cast, then scale


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [D/2], with Llama-3 scaling when configured (as transformers computes them)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv.astype(np.float32)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """HF rotate-half RoPE. x: [B, T, heads, D]; positions: [B, T]."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = _param(rngs, cfg, (e, h, d), ("embed", "q_heads", "head_dim"), "normal")
        self.k_proj = _param(rngs, cfg, (e, k, d), ("embed", "kv_heads", "head_dim"), "normal")
        self.v_proj = _param(rngs, cfg, (e, k, d), ("embed", "kv_heads", "head_dim"), "normal")
        self.o_proj = _param(rngs, cfg, (h, d, e), ("q_heads", "head_dim", "embed"), "normal")
        self.cfg = cfg
        _add_adapters(self, cfg, rngs, "attn")

    def __call__(self, x, q_pos, key_pos, window, inv_freq, kv_write, packed):
        """x: [B, T, E]; q_pos: [B, T]; key_pos: [B, S] positions of the keys attended to (padding keys
        at _FAR); window: scalar int, 0 = unlimited; kv_write(k, v) -> (keys, values) over S slots;
        packed: attention.Packed (segments) or None."""
        cfg, dt = self.cfg, x.dtype
        q_axes, kv_axes = ("batch", "seq", "q_heads", "head_dim"), ("batch", "seq", "kv_heads", "head_dim")
        q = constrain(_adapted(self, "q_proj", x, jnp.einsum("bte,ehd->bthd", x, _weight(self.q_proj, dt))), q_axes)
        k = constrain(_adapted(self, "k_proj", x, jnp.einsum("bte,ekd->btkd", x, _weight(self.k_proj, dt))), kv_axes)
        v = constrain(_adapted(self, "v_proj", x, jnp.einsum("bte,ekd->btkd", x, _weight(self.v_proj, dt))), kv_axes)
        q = apply_rope(q, q_pos, inv_freq)
        k = apply_rope(k, q_pos, inv_freq)
        keys, values = kv_write(k, v)  # [B, S, Kv, D]

        implementation = choose(
            cfg.attention,
            dtype=cfg.dtype,
            head_dim=cfg.head_dim,
            softcap=cfg.attn_logit_softcap,
            packed=packed is not None,
        )
        if implementation == "splash":
            out = splash_attend(q, keys, values, packed, window, scale=cfg.query_scale, softcap=cfg.attn_logit_softcap)
        else:
            delta = q_pos[:, :, None] - key_pos[:, None, :]  # [B, T, S]
            allowed = within_reach(delta, window)
            if packed is not None:
                allowed = allowed & packed.visible()
            out = attend(
                q,
                keys,
                values,
                allowed,
                scale=cfg.query_scale,
                softcap=cfg.attn_logit_softcap,
                implementation=implementation,
            )
        out = constrain(out, q_axes)
        b, t, h, d = out.shape
        out = out.reshape(b, t, h * d)
        return constrain(_adapted(self, "o_proj", out, out @ _weight(self.o_proj, dt).reshape(h * d, -1)), RESIDUAL)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _param(rngs, cfg, (e, m), ("embed", "mlp"), "normal")
        self.up_proj = _param(rngs, cfg, (e, m), ("embed", "mlp"), "normal")
        self.down_proj = _param(rngs, cfg, (m, e), ("mlp", "embed"), "normal")
        self.activation = cfg.activation
        _add_adapters(self, cfg, rngs, "mlp")

    def __call__(self, x: jax.Array) -> jax.Array:
        dt, hidden_axes = x.dtype, ("batch", "seq", "mlp")
        gate = constrain(_adapted(self, "gate_proj", x, x @ _weight(self.gate_proj, dt)), hidden_axes)
        gate = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        up = constrain(_adapted(self, "up_proj", x, x @ _weight(self.up_proj, dt)), hidden_axes)
        hidden = gate * up
        return constrain(_adapted(self, "down_proj", hidden, hidden @ _weight(self.down_proj, dt)), RESIDUAL)


class Block(nnx.Module):
    """Pre-norm residual block; Gemma-2 adds a norm after attention and after the MLP (sandwich)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        if cfg.sandwich_norms:
            self.pre_mlp_norm = RMSNorm(cfg, rngs=rngs)
            self.post_mlp_norm = RMSNorm(cfg, rngs=rngs)
        self.sandwich = cfg.sandwich_norms

    def __call__(self, x, q_pos, key_pos, window, inv_freq, kv_write, packed):
        h = self.attn(self.input_norm(x), q_pos, key_pos, window, inv_freq, kv_write, packed)
        if self.sandwich:
            x = x + self.post_attn_norm(h)
            return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))
        x = x + h
        return x + self.mlp(self.post_attn_norm(x))


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, cfg, (cfg.vocab_size, cfg.hidden_size), ("vocab", None), "normal")

        @nnx.vmap(in_axes=0, out_axes=0)
        def make_layers(r: nnx.Rngs) -> Block:
            return Block(cfg, rngs=r)

        self.layers = make_layers(rngs.split(cfg.num_layers))
        self.final_norm = RMSNorm(cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, cfg, (cfg.hidden_size, cfg.vocab_size), (None, "vocab"), "normal")

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        mask: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        segments: np.ndarray | None = None,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """(logits [B, T, V], cache); with return_hidden, the final-normed hidden states [B, T, E] instead
        of logits (`head` turns them into logits: training computes them in chunks, see training/loss.py)."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        # The lookup takes the table split along its width over the same devices that split its rows (an
        # all-to-all), so the looked-up rows are [all rows, T, E / devices] before they go to their devices.
        table = constrain(self.embed[...].astype(dt), (None, "lookup_embed"))
        x = constrain(jnp.take(table, tokens, axis=0), RESIDUAL)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.hidden_size**0.5, dt)

        if segments is not None and cache is not None:
            raise ValueError("segments are for cache-free calls (training / scoring)")
        packed = None if segments is None else Packed(segments, mask, tuple(sorted(set(cfg.window_sizes()))))
        if cache is None:
            key_pos = jnp.where(mask, positions, _FAR)
        else:
            key_pos = jnp.broadcast_to(jnp.arange(cache.k.shape[2]), (tokens.shape[0], cache.k.shape[2]))
        starts = positions[:, 0]  # with a cache: each row's first slot (module doc)

        graphdef, layer_state = nnx.split(self.layers)
        inv_freq = jnp.asarray(rope_inv_freq(cfg))
        windows = jnp.asarray(cfg.window_sizes(), jnp.int32)

        # The cache rides in the scan's carry, not its xs/ys: each layer writes its new keys/values into
        # the one stacked buffer in place (a loop-carried scatter), so a forward holds one cache, not the
        # input stack plus a freshly stacked output (and the decode loops can donate it).
        def body(carry, xs):
            x, kv, layer = carry
            state, window = xs
            block = nnx.merge(graphdef, state)
            written = []

            def kv_write(k, v):
                if kv is None:
                    return k, v
                # One contiguous [T, Kv, D] window per row, at (layer, row, its first slot), in place in the
                # carried cache: one scatter of B windows (not of B x T single slots, and not B unrolled
                # updates: the program does not grow with the batch).
                rows = jnp.arange(k.shape[0], dtype=jnp.int32)
                at = jnp.stack([jnp.full_like(rows, layer), rows, starts.astype(jnp.int32)], axis=1)  # [B, 3]
                ck, cv = (
                    jax.lax.scatter(
                        c,
                        at,
                        new.astype(c.dtype),
                        _ROW_WINDOWS,
                        indices_are_sorted=True,
                        unique_indices=True,
                        mode=jax.lax.GatherScatterMode.CLIP,
                    )
                    for c, new in zip(kv, (k, v))
                )
                written.append((ck, cv))
                return ck[layer].astype(k.dtype), cv[layer].astype(v.dtype)

            x = constrain(block(x, positions, key_pos, window, inv_freq, kv_write, packed), RESIDUAL)
            return (x, written[0] if written else kv, layer + 1), None

        if cfg.remat:
            body = jax.checkpoint(body)
        kv = None if cache is None else (cache.k, cache.v)
        (x, new_kv, _), _ = jax.lax.scan(body, (x, kv, jnp.int32(0)), (layer_state, windows))

        x = self.final_norm(x)
        new_cache = None if cache is None else KVCache(k=new_kv[0], v=new_kv[1])
        return (x if return_hidden else self.head(x)), new_cache

    def head(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits from final-normed hidden states [B, ..., E]: the lm head (tied: embed^T) with fp32
        accumulation and output whatever the activation dtype, then the final soft-cap in fp32, so the loss
        and the decoders' argmax never see logits rounded to bf16 (the KL at w = 1e3 would amplify that
        noise). Under a mesh it runs vocab-parallel: each device computes its vocabulary shard's logits
        for all rows of its `data` shard (the hidden states are gathered, the [V, E] table never is)."""
        dt = hidden.dtype
        head = _weight(self.embed, dt).T if self.cfg.tie_word_embeddings else _weight(self.lm_head, dt)
        logits = jnp.matmul(hidden, head, preferred_element_type=jnp.float32)
        logits = constrain(logits, ("head_batch", *[None] * (hidden.ndim - 2), "vocab"))
        return softcap_logits(logits, self.cfg.final_logit_softcap)


# Cache [L, B, S, Kv, D] <- updates [B, T, Kv, D] at indices [B, 3] = (layer, row, first slot).
_ROW_WINDOWS = jax.lax.ScatterDimensionNumbers(
    update_window_dims=(1, 2, 3), inserted_window_dims=(0, 1), scatter_dims_to_operand_dims=(0, 1, 2)
)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
    """An empty KV cache holding positions 0 .. max_len-1 for each of `batch` rows."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.dtype)
    return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt))


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model with ShapeDtypeStructs for weights: shapes, dtypes and logical axes, no memory."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
