"""Logit parity with transformers (fp32) on tiny random Llama-3 and Gemma-2, padding, KV cache, sharding,
attention implementations."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from diffpo_jax.attention import Packed, attend
from diffpo_jax.model import abstract_model, init_cache
from diffpo_jax.sharding import batch_sharding, make_mesh
from diffpo_jax.sources import load_model
from tests import tiny

FORWARD = nnx.jit(lambda model, tokens, positions, mask, cache: model(tokens, positions, mask, cache))
LENGTH = 40  # longer than Gemma-2's sliding window (8)


def padded_batch(left: bool):
    """Three rows of lengths 40, 33, 21, padded on the left or on the right; positions count real tokens."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, tiny.VOCAB, (3, LENGTH)).astype(np.int32)
    mask = np.ones((3, LENGTH), bool)
    for row, n in ((1, 33), (2, 21)):
        if left:
            mask[row, : LENGTH - n] = False
        else:
            mask[row, n:] = False
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    return tokens, positions, mask


def reference_logits(folder, tokens, positions, mask):
    ref = tiny.load_reference(folder)
    with torch.no_grad():
        return ref(
            torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        ).logits.numpy()


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_llama_tied_dir", "tiny_gemma2_dir"])
@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_logits_match_transformers(fixture, left, request):
    folder = request.getfixturevalue(fixture)
    loaded = load_model(str(folder))
    tokens, positions, mask = padded_batch(left)
    ours = np.asarray(FORWARD(loaded.model, tokens, positions, mask, None)[0])
    ref = reference_logits(folder, tokens, positions, mask)
    assert np.abs(ref[mask]).max() > 1.0  # the comparison is not between near-zero logits
    assert np.abs(ours[mask] - ref[mask]).max() <= 1e-4


def test_config_switches_are_what_the_traps_need(tiny_gemma2_dir, tiny_llama_dir):
    gemma = load_model(str(tiny_gemma2_dir)).cfg
    assert gemma.query_scale == pytest.approx(24**-0.5)  # query_pre_attn_scalar, not head_dim
    assert gemma.window_sizes() == [8, 0, 8]
    assert gemma.tie_word_embeddings and gemma.attn_logit_softcap == 3.0 and gemma.final_logit_softcap == 5.0
    llama = load_model(str(tiny_llama_dir)).cfg
    assert llama.rope_scaling is not None and llama.rope_scaling.factor == 8.0
    assert llama.query_scale == pytest.approx(16**-0.5)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gemma2_dir"])
def test_incremental_decoding_through_cache_equals_full_forward(fixture, request):
    loaded = load_model(str(request.getfixturevalue(fixture)))
    tokens, positions, mask = padded_batch(left=False)
    full = np.asarray(FORWARD(loaded.model, tokens, positions, mask, None)[0])
    cache = init_cache(loaded.cfg, 3, 64)
    logits, cache = FORWARD(loaded.model, tokens[:, :12], positions[:, :12], mask[:, :12], cache)
    steps = [np.asarray(logits)]
    for start in range(12, LENGTH, 4):  # blocks of 4 tokens
        sl = slice(start, start + 4)
        logits, cache = FORWARD(loaded.model, tokens[:, sl], positions[:, sl], mask[:, sl], cache)
        steps.append(np.asarray(logits))
    incremental = np.concatenate(steps, axis=1)
    assert np.abs(incremental[mask] - full[mask]).max() <= 1e-4


def test_stale_cache_slots_past_the_query_are_ignored(tiny_llama_dir):
    """Jacobi writes guesses it may reject; re-decoding those positions must not see the old guesses."""
    loaded = load_model(str(tiny_llama_dir))
    tokens, positions, mask = padded_batch(left=False)
    mask[:] = True
    positions = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), tokens.shape)
    cache = init_cache(loaded.cfg, 3, 64)
    _, cache = FORWARD(loaded.model, tokens[:, :20], positions[:, :20], mask[:, :20], cache)
    wrong = (tokens[:, 20:30] + 1) % tiny.VOCAB
    _, dirty = FORWARD(loaded.model, wrong, positions[:, 20:30], mask[:, 20:30], cache)  # guesses at 20..29
    clean, _ = FORWARD(loaded.model, tokens[:, 20:24], positions[:, 20:24], mask[:, 20:24], cache)
    redo, _ = FORWARD(loaded.model, tokens[:, 20:24], positions[:, 20:24], mask[:, 20:24], dirty)
    np.testing.assert_array_equal(np.asarray(clean), np.asarray(redo))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (1, 1, 8)])
def test_sharded_load_gives_the_same_logits(tiny_llama_dir, shape):
    assert jax.device_count() == 8
    single = load_model(str(tiny_llama_dir))
    mesh = make_mesh(shape)
    sharded = load_model(str(tiny_llama_dir), mesh=mesh)
    q = sharded.model.layers.attn.q_proj[...]
    assert q.sharding.mesh.shape == mesh.shape
    if shape[1] > 1:  # the embed axis is split over fsdp
        assert q.sharding.spec[1] == "fsdp" and len(q.addressable_shards) == 8
    tokens, positions, mask = padded_batch(left=True)
    ours = np.asarray(FORWARD(single.model, tokens, positions, mask, None)[0])
    theirs = np.asarray(FORWARD(sharded.model, tokens, positions, mask, None)[0])
    assert np.abs(ours[mask] - theirs[mask]).max() <= 1e-4  # fsdp splits reductions: fp32 order differs
    for a, b in zip(jax.tree.leaves(nnx.state(single.model)), jax.tree.leaves(nnx.state(sharded.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_model_agrees_with_float32(tiny_gemma2_dir):
    f32 = load_model(str(tiny_gemma2_dir))
    bf16 = load_model(str(tiny_gemma2_dir), dtype="bfloat16")
    assert bf16.model.embed[...].dtype == jnp.bfloat16
    tokens, positions, mask = padded_batch(left=False)
    a = np.asarray(FORWARD(f32.model, tokens, positions, mask, None)[0])
    b = np.asarray(FORWARD(bf16.model, tokens, positions, mask, None)[0].astype(jnp.float32))
    assert np.mean(a.argmax(-1)[mask] == b.argmax(-1)[mask]) >= 0.9


@pytest.mark.parametrize("chunk", [0, 4])
def test_bfloat16_loss_path_has_float32_logits(tiny_gemma2_dir, chunk):
    """bf16 activations: the lm head accumulates and returns fp32, the final soft-cap runs in fp32, and the
    loss's ce / kl (plain and chunked paths) equal token_losses over an fp32 head on the same bf16 hidden
    states; logits rounded to bf16 (the old path) are measurably off."""
    from diffpo_jax.training.loss import response_token_losses, sequences, token_losses

    model = load_model(str(tiny_gemma2_dir), dtype="bfloat16").model
    cap = model.cfg.final_logit_softcap
    assert cap is not None
    rng = np.random.default_rng(0)
    b, p, n = 2, 6, 12
    batch = {
        "prompt": rng.integers(3, tiny.VOCAB, (b, p)),
        "prompt_mask": np.ones((b, p), bool),
        "best": rng.integers(3, tiny.VOCAB, (b, n)),
        "best_mask": np.ones((b, n), bool),
        "worse": rng.integers(3, tiny.VOCAB, (b, n)),
        "worse_mask": np.ones((b, n), bool),
    }
    batch = {k: jnp.asarray(v, jnp.int32 if v.dtype != bool else bool) for k, v in batch.items()}
    hidden, _ = model(*sequences(batch)[:3], segments=sequences(batch)[3], return_hidden=True)
    assert hidden.dtype == jnp.bfloat16
    logits = model.head(hidden)
    assert logits.dtype == jnp.float32
    table = model.embed[...].astype(jnp.bfloat16).astype(jnp.float32)  # tied (Gemma-2)
    exact = jnp.tanh(jnp.einsum("bse,ve->bsv", hidden.astype(jnp.float32), table, precision="highest") / cap) * cap
    np.testing.assert_allclose(logits, exact, atol=1e-4, rtol=1e-4)
    rounded = exact.astype(jnp.bfloat16).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(rounded - exact))) > 10 * float(jnp.max(jnp.abs(logits - exact)))

    ce, kl = response_token_losses(model, batch, chunk)
    teacher = exact[:, p - 1 : p - 1 + n]
    student = jnp.concatenate([exact[:, p - 1 : p], exact[:, p + n : p + 2 * n - 1]], axis=1)
    ref_ce, ref_kl = token_losses(teacher, student, batch["best"])
    np.testing.assert_allclose(ce, ref_ce, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(kl, ref_kl, atol=1e-4, rtol=1e-4)


def test_indivisible_dimensions_are_reported(tiny_llama_dir):
    """2 kv heads over tensor = 4 stay replicated: the k and v projections are named; a mesh that divides
    every dimension names none."""
    from diffpo_jax.model import abstract_model
    from diffpo_jax.sharding import indivisible_dims

    state = nnx.state(abstract_model(load_model(str(tiny_llama_dir)).cfg))
    got = indivisible_dims(state, make_mesh((1, 2, 4)))
    assert got == [
        "layers.attn.k_proj dim 2 (kv_heads = 2) / tensor = 4",
        "layers.attn.v_proj dim 2 (kv_heads = 2) / tensor = 4",
    ]
    assert indivisible_dims(state, make_mesh((1, 8, 1))) == []


def test_the_tensor_axis_must_fit_in_one_host():
    from types import SimpleNamespace

    from diffpo_jax.sharding import check_tensor_within_host

    def grid(shape, per_host):
        return np.array([SimpleNamespace(process_index=i // per_host) for i in range(8)], object).reshape(shape)

    check_tensor_within_host(grid((1, 2, 4), per_host=4))  # each tensor group is one host's 4 devices
    check_tensor_within_host(grid((2, 4, 1), per_host=4))
    with pytest.raises(ValueError, match=r"mesh \[1, 1, 8\]: the tensor axis \(8 devices\) spans processes 0, 1"):
        check_tensor_within_host(grid((1, 1, 8), per_host=4))


def test_a_multi_slice_job_gets_a_hybrid_mesh_with_data_across_slices():
    """TPU devices of 2 slices (2x2 chips each, 2 hosts per slice): `data` spans the slices, fsdp and tensor
    stay inside one; a data size the slices do not divide is an error; one slice: the plain device mesh."""
    from types import SimpleNamespace

    from diffpo_jax.sharding import check_tensor_within_host, device_grid

    devices = [
        SimpleNamespace(
            id=i,
            slice_index=i // 4,
            process_index=i // 2,
            platform="tpu",
            device_kind="TPU v5 lite",
            coords=(i % 2, i // 2 % 2, 0),
            core_on_chip=0,
        )
        for i in range(8)
    ]
    grid = device_grid((-1, 2, 1), devices)
    assert grid.shape == (4, 2, 1)
    assert [{d.slice_index for d in grid[k].flat} for k in range(4)] == [{0}, {0}, {1}, {1}]
    check_tensor_within_host(grid)
    grid = device_grid((2, 2, 2), devices)
    assert [{d.slice_index for d in grid[k].flat} for k in range(2)] == [{0}, {1}]
    with pytest.raises(ValueError, match=r"mesh shape \[1, 8, 1\]: data 1 is not a multiple of the 2 slices"):
        device_grid((1, 8, 1), devices)
    one_slice = [SimpleNamespace(**{**vars(d), "slice_index": 0}) for d in devices]
    assert sorted(d.id for d in device_grid((1, 8, 1), one_slice).flat) == list(range(8))


# ------------------------------------------------------------------------------------------ attention


def with_attention(loaded, implementation: str):
    """The loaded model's weights under a model whose config picks another attention implementation."""
    graphdef, _ = nnx.split(abstract_model(loaded.cfg.replace(attention=implementation)))
    return nnx.merge(graphdef, nnx.state(loaded.model))


def test_xla_attention_equals_the_einsum_reference():
    """jax.nn.dot_product_attention (its XLA path: what the cuDNN kernel is tested against) on grouped
    heads, a causal + window + segment mask and fully masked (padding) query rows."""
    rng = np.random.default_rng(0)
    b, t, s, h, kv, d = 2, 5, 11, 4, 2, 8
    q, keys, values = (
        jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((b, t, h, d), (b, s, kv, d), (b, s, kv, d))
    )
    q_pos = np.arange(s - t, s)[None].repeat(b, 0)
    delta = q_pos[:, :, None] - np.arange(s)[None, None]
    allowed = (delta >= 0) & (delta < 6) & (rng.random((b, t, s)) < 0.8)
    allowed[1, 2] = False  # a padding query sees nothing
    ref = attend(q, keys, values, jnp.asarray(allowed), scale=d**-0.5, softcap=None, implementation="einsum")
    got = attend(q, keys, values, jnp.asarray(allowed), scale=d**-0.5, softcap=None, implementation="xla")
    assert np.abs(np.asarray(ref)).max() > 0.5
    np.testing.assert_allclose(np.asarray(got)[allowed.any(-1)], np.asarray(ref)[allowed.any(-1)], atol=1e-6, rtol=0)


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_xla_attention_model_matches_transformers(tiny_llama_dir, left):
    model = with_attention(load_model(str(tiny_llama_dir)), "xla")
    tokens, positions, mask = padded_batch(left)
    ours = np.asarray(FORWARD(model, tokens, positions, mask, None)[0])
    ref = reference_logits(tiny_llama_dir, tokens, positions, mask)
    assert np.abs(ours[mask] - ref[mask]).max() <= 1e-4


@pytest.mark.parametrize("arch, implementation", [("gemma2", "xla"), ("llama", "cudnn")])
def test_attention_kernel_that_cannot_run_falls_back(tiny_llama_dir, tiny_gemma2_dir, arch, implementation, caplog):
    """The model asking for a kernel whose preconditions fail (Gemma-2's soft-cap on xla; cuDNN on this CPU)
    runs the einsum reference, with the reason logged once, instead of an error at trace time (choose's own
    cases: tests/test_attention.py)."""
    from diffpo_jax import attention

    attention._log_once.cache_clear()
    loaded = load_model(str(tiny_gemma2_dir if arch == "gemma2" else tiny_llama_dir))
    tokens, positions, mask = padded_batch(True)
    ref = np.asarray(FORWARD(loaded.model, tokens, positions, mask, None)[0])
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        got = np.asarray(FORWARD(with_attention(loaded, implementation), tokens, positions, mask, None)[0])
    np.testing.assert_array_equal(got, ref)
    (message,) = {r.getMessage() for r in caplog.records}
    assert message.startswith(f"attention {implementation!r} falls back to einsum: ")


def packed_batch(b: int = 4, p: int = 7, n: int = 12) -> dict:
    """A loss batch (training/loss.py) whose second row's prompt is left-padded by 3; P + 2N = 31 slots,
    longer than Gemma-2's window (8) and not a multiple of splash's 128-slot tiles."""
    rng = np.random.default_rng(2)
    prompt_mask = np.ones((b, p), bool)
    prompt_mask[1, :3] = False
    return {
        "prompt": rng.integers(3, tiny.VOCAB, (b, p)).astype(np.int32),
        "prompt_mask": prompt_mask,
        "best": rng.integers(3, tiny.VOCAB, (b, n)).astype(np.int32),
        "best_mask": np.ones((b, n), bool),
        "worse": rng.integers(3, tiny.VOCAB, (b, n)).astype(np.int32),
        "worse_mask": np.ones((b, n), bool),
    }


@pytest.mark.parametrize("window", [0, 5])
def test_packed_pattern_is_the_position_mask_on_real_queries(window):
    """The static pattern splash gets, over the real keys, equals the mask the model builds from the loss's
    positions and segments, on every real query row; padding query rows see nothing there."""
    from diffpo_jax.training.loss import sequences

    _, positions, mask, segments = (np.asarray(x) for x in sequences(packed_batch()))
    packed = Packed(segments, mask, (window,))
    key_pos = np.where(mask, positions, np.iinfo(np.int32).max // 2)
    delta = positions[:, :, None] - key_pos[:, None, :]
    dense = (delta >= 0) & ((window == 0) | (delta < window)) & packed.visible()
    static = packed.pattern(window)[None] & mask[:, None, :]
    assert (dense[mask] == static[mask]).all() and not dense[~mask].any()
    assert static[mask].sum(-1).min() >= 1 and (static[0, 7:19, 19:] == 0).all()  # best never sees worse
    with pytest.raises(ValueError, match="static \\[T\\] layout rising from 0"):
        Packed(np.array([1, 1, 2]), mask, (0,))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_splash_loss_and_gradients_equal_einsum(tiny_llama_dir, tiny_gemma2_dir, arch):
    """Training's packed rows through the splash kernel (interpreted on CPU: the kernel TPUs run): the loss
    terms and their gradients equal the einsum reference's, on one device and on a (2, 2, 2) mesh (rows
    over data x fsdp, heads over tensor, through shard_map); a left-padded prompt, and for Gemma-2 the
    soft-cap and sliding windows shorter than the rows (one kernel per window, picked per layer)."""
    from diffpo_jax.training.loss import LossConfig, diffpo_loss, response_token_losses

    folder = tiny_llama_dir if arch == "llama" else tiny_gemma2_dir
    batch = packed_batch()
    loss_cfg = LossConfig(con_weight=1.0)

    def terms(model, batch):
        ce, kl = response_token_losses(model, batch)
        n = jnp.sum(batch["best_mask"]).astype(jnp.float32)
        return diffpo_loss(ce, kl, batch, loss_cfg, num_tokens=n)[1]

    def run(implementation, mesh):
        loaded = load_model(str(folder), mesh=mesh, with_tokenizer=False)
        graphdef, params = nnx.split(with_attention(loaded, implementation))
        jbatch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}

        @jax.jit
        def f(params, jbatch):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                grads = jax.grad(lambda p: sum(terms(nnx.merge(graphdef, p), jbatch).values()))(params)
                return terms(nnx.merge(graphdef, params), jbatch), grads

        parts, grads = f(params, jbatch)
        return {k: float(v) for k, v in parts.items()}, jax.tree.map(np.asarray, nnx.to_pure_dict(grads))

    one = make_mesh((1, 1, 1), jax.devices()[:1])
    ref_terms, ref_grads = run("einsum", one)
    assert ref_terms["con"] > 1e-3
    for mesh in (one, make_mesh((2, 2, 2))):
        got_terms, got_grads = run("splash", mesh)
        for k in ref_terms:
            assert got_terms[k] == pytest.approx(ref_terms[k], rel=1e-5, abs=1e-6), (k, mesh.shape)
        for (path, ref), got in zip(jax.tree_util.tree_flatten_with_path(ref_grads)[0], jax.tree.leaves(got_grads)):
            np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max(), rtol=0, err_msg=f"{path} {mesh.shape}")
