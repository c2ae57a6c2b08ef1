"""The DiffPO loss against independent PyTorch / NumPy computations; stop-gradient; chunked == plain."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from diffpo_jax.sources import load_model
from diffpo_jax.training.loss import (
    LossConfig,
    chunked_token_losses,
    con_mask,
    diffpo_loss,
    first_mismatch,
    response_token_losses,
    sequences,
    token_losses,
)
from tests import tiny

P, N = 7, 9  # N = 9 is no multiple of the chunk sizes below: the chunked path pads


def random_logits(seed, shape, scale=4.0):
    return np.random.default_rng(seed).normal(0, scale, shape).astype(np.float32)


def test_token_losses_match_torch():
    teacher, student = random_logits(0, (3, N, 50)), random_logits(1, (3, N, 50))
    targets = np.random.default_rng(2).integers(0, 50, (3, N)).astype(np.int32)
    ce, kl = token_losses(jnp.asarray(teacher), jnp.asarray(student), jnp.asarray(targets))
    t, s = torch.tensor(teacher), torch.tensor(student)
    ref_ce = F.cross_entropy(t.reshape(-1, 50), torch.tensor(targets, dtype=torch.long).reshape(-1), reduction="none")
    ref_kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    np.testing.assert_allclose(np.asarray(ce), ref_ce.reshape(3, N).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(kl), ref_kl.numpy(), rtol=1e-5, atol=1e-5)
    assert float(kl.min()) > 0.1  # distinct distributions: the KL comparison is not between zeros


def test_token_losses_are_fp32_for_bf16_logits():
    teacher, student = random_logits(0, (2, N, 50)), random_logits(1, (2, N, 50))
    targets = jnp.zeros((2, N), jnp.int32)
    ce, kl = token_losses(jnp.asarray(teacher, jnp.bfloat16), jnp.asarray(student, jnp.bfloat16), targets)
    assert ce.dtype == kl.dtype == jnp.float32
    ref_ce, ref_kl = token_losses(
        jnp.asarray(teacher, jnp.bfloat16).astype(jnp.float32),
        jnp.asarray(student, jnp.bfloat16).astype(jnp.float32),
        targets,
    )
    np.testing.assert_array_equal(np.asarray(ce), np.asarray(ref_ce))
    np.testing.assert_array_equal(np.asarray(kl), np.asarray(ref_kl))


def test_no_gradient_reaches_the_teacher_distribution():
    teacher, student = jnp.asarray(random_logits(3, (2, N, 20))), jnp.asarray(random_logits(4, (2, N, 20)))
    targets = jnp.asarray(np.random.default_rng(5).integers(0, 20, (2, N)), jnp.int32)
    kl_grad_t, kl_grad_s = jax.grad(lambda t, s: token_losses(t, s, targets)[1].sum(), argnums=(0, 1))(teacher, student)
    ce_grad_t, ce_grad_s = jax.grad(lambda t, s: token_losses(t, s, targets)[0].sum(), argnums=(0, 1))(teacher, student)
    assert not np.any(np.asarray(kl_grad_t))  # KL: the teacher is a constant target
    assert not np.any(np.asarray(ce_grad_s))  # AR loss: teacher forward only
    # d KL(p || softmax(s)) / ds = softmax(s) - p ; d CE / dt = softmax(t) - onehot
    p, q = jax.nn.softmax(teacher), jax.nn.softmax(student)
    np.testing.assert_allclose(np.asarray(kl_grad_s), np.asarray(q - p), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ce_grad_t), np.asarray(p - jax.nn.one_hot(targets, 20)), atol=1e-6)


@pytest.mark.parametrize("con_positions", ["all", "draft"])
def test_diffpo_loss_is_the_masked_mean_over_valid_positions(con_positions):
    rng = np.random.default_rng(6)
    ce, kl = rng.random((4, N)).astype(np.float32), rng.random((4, N)).astype(np.float32)
    best_lens, worse_lens = rng.integers(1, N + 1, 4), rng.integers(1, N + 1, 4)
    best_mask, worse_mask = (np.arange(N) < best_lens[:, None]), (np.arange(N) < worse_lens[:, None])
    batch = {"best_mask": jnp.asarray(best_mask), "worse_mask": jnp.asarray(worse_mask)}
    cfg = LossConfig(con_weight=1e3, con_positions=con_positions)
    total, parts = diffpo_loss(
        jnp.asarray(ce), jnp.asarray(kl), batch, cfg, num_tokens=jnp.asarray(best_mask.sum(), jnp.float32)
    )
    n = best_mask.sum()
    # "draft": KL only where the student's input is a draft token, i.e. i < len(y(t)) (and y(T) has a token)
    kl_valid = best_mask if con_positions == "all" else best_mask & (np.arange(N) < worse_lens[:, None])
    assert con_positions == "all" or 0 < kl_valid.sum() < best_mask.sum()
    ar, con = (ce * best_mask).sum() / n, (kl * kl_valid).sum() / n
    np.testing.assert_allclose(float(parts["ar"]), ar, rtol=1e-6)
    np.testing.assert_allclose(float(parts["con"]), con, rtol=1e-6)
    np.testing.assert_allclose(float(total), ar + 1e3 * con, rtol=1e-6)


def test_frontier_covers_the_window_after_the_first_mismatch():
    """con_positions="frontier", con_window=3: the draft's positions m+1 .. m+3 after the first mismatch m."""
    best = np.array([[5, 6, 7, 8, 9, 10, 11, 12]] * 4, np.int32)
    worse = best.copy()
    worse[0, 2] = 1  # m = 2: positions 3, 4, 5
    worse[1, 6:] = 1  # m = 6: positions 7 (8 is past N)
    best_mask = np.ones((4, 8), bool)
    worse_mask = np.ones((4, 8), bool)
    worse_mask[2, 4:] = False  # same tokens, y(t) ends at 4: m = 4, nothing past it is a draft position
    # row 3: y(t) == y(T): no mismatch, nothing covered
    batch = {
        k: jnp.asarray(v) for k, v in dict(best=best, worse=worse, best_mask=best_mask, worse_mask=worse_mask).items()
    }
    expected = np.zeros((4, 8), bool)
    expected[0, 3:6] = expected[1, 7] = True
    np.testing.assert_array_equal(np.asarray(first_mismatch(batch)), [2, 6, 4, 8])
    np.testing.assert_array_equal(np.asarray(con_mask(batch, "frontier", 3)), expected)
    kl = np.random.default_rng(0).random((4, 8)).astype(np.float32)
    _, parts = diffpo_loss(
        jnp.zeros((4, 8)),
        jnp.asarray(kl),
        batch,
        LossConfig(con_positions="frontier", con_window=3),
        num_tokens=jnp.float32(32),
    )
    np.testing.assert_allclose(float(parts["con"]), (kl * expected).sum() / 32, rtol=1e-6)


def test_unknown_con_positions_is_an_error():
    ones = jnp.ones((1, N), bool)
    with pytest.raises(ValueError, match="con_positions"):
        diffpo_loss(
            jnp.zeros((1, N)),
            jnp.zeros((1, N)),
            {"best_mask": ones, "worse_mask": ones},
            LossConfig(con_positions="some"),
            num_tokens=jnp.float32(N),
        )


def make_batch(seed=0, b=3):
    """Left-padded prompts of lengths P, 4, 1; best lengths N, 5, 2; worse lengths 3, N, 6 (pad id 0)."""
    rng = np.random.default_rng(seed)
    prompt_mask = np.arange(P)[None] >= P - np.array([P, 4, 1])[:b, None]
    best_mask = np.arange(N)[None] < np.array([N, 5, 2])[:b, None]
    worse_mask = np.arange(N)[None] < np.array([3, N, 6])[:b, None]
    tok = lambda shape, m: np.where(m, rng.integers(3, tiny.VOCAB, shape), 0).astype(np.int32)
    return dict(
        prompt=tok((b, P), prompt_mask),
        prompt_mask=prompt_mask,
        best=tok((b, N), best_mask),
        best_mask=best_mask,
        worse=tok((b, N), worse_mask),
        worse_mask=worse_mask,
    )


def test_sequences_pack_prompt_best_and_worse_in_one_row():
    batch = make_batch()
    tokens, positions, mask, segments = (
        np.asarray(x) for x in sequences({k: jnp.asarray(v) for k, v in batch.items()})
    )
    np.testing.assert_array_equal(tokens[2], np.concatenate([batch["prompt"][2], batch["best"][2], batch["worse"][2]]))
    # row 1 (prompt of 4 tokens): P - 4 padding columns, prompt positions 0..3, both answers at 4 .. 3 + N
    np.testing.assert_array_equal(mask[1], [False] * (P - 4) + [True] * (4 + 2 * N))
    np.testing.assert_array_equal(positions[1][P - 4 :], np.concatenate([np.arange(4 + N), np.arange(4, 4 + N)]))
    np.testing.assert_array_equal(segments, [0] * P + [1] * N + [2] * N)  # static: one layout for every row


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gemma2_dir"])
def model(request):
    return load_model(str(request.getfixturevalue(request.param))).model


def test_response_losses_match_separate_unpadded_forwards(model):
    """One packed, left-padded call == each sequence on its own, right-aligned differently: the teacher on
    [prompt, y(T)], the student on [prompt, y(t) + its pads, attended], positions 0.. from the first real
    prompt token; CE / KL of those logits in NumPy (float64) at the response positions."""
    batch = make_batch()
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    ce, kl = nnx.jit(response_token_losses, static_argnums=2)(model, jbatch, 0)
    ce4, kl4 = nnx.jit(response_token_losses, static_argnums=2)(model, jbatch, 4)  # the chunked path, forward
    np.testing.assert_allclose(np.asarray(ce4), np.asarray(ce), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(kl4), np.asarray(kl), rtol=1e-6, atol=1e-6)
    rows, lengths = [], []
    for r in range(3):
        prompt = batch["prompt"][r][batch["prompt_mask"][r]]
        for response in (batch["best"][r], batch["worse"][r]):
            seq = np.concatenate([prompt, response])
            rows.append(np.pad(seq, (0, P + N - len(seq))))
            lengths.append(len(prompt))
    mask = np.arange(P + N)[None] < (np.array(lengths) + N)[:, None]
    out, _ = nnx.jit(lambda m, t, p, k: m(t, p, k))(
        model, jnp.asarray(np.stack(rows)), jnp.broadcast_to(jnp.arange(P + N), (6, P + N)), jnp.asarray(mask)
    )
    out = np.asarray(out, np.float64)
    for r in range(3):
        t, s = (out[2 * r + j, lengths[2 * r] - 1 : lengths[2 * r] - 1 + N] for j in (0, 1))
        t, s = (z - z.max(-1, keepdims=True) for z in (t, s))
        t, s = (z - np.log(np.exp(z).sum(-1, keepdims=True)) for z in (t, s))
        ref_ce = -t[np.arange(N), batch["best"][r]]
        ref_kl = (np.exp(t) * (t - s)).sum(-1)
        valid = batch["best_mask"][r]
        np.testing.assert_allclose(np.asarray(ce[r])[valid], ref_ce[valid], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(kl[r])[valid], ref_kl[valid], rtol=1e-4, atol=1e-4)
        assert ref_kl[valid].max() > 1e-2  # the student really sees a different response


def test_chunked_equals_plain_values_and_grads(model):
    """chunk 4 over N = 9 positions (three slices, the last one padded) against all positions at once:
    loss values and gradients w.r.t. the lm head (tied for Gemma-2: the embedding) and both hidden states."""
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(7)
    hidden = jnp.asarray(rng.normal(0, 1, (2, 3, N, model.cfg.hidden_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, tiny.VOCAB, (3, N)), jnp.int32)
    valid = jnp.asarray(make_batch()["best_mask"])

    @partial(jax.jit, static_argnums=2)
    def loss_and_grad(params, hidden, chunk):
        def f(params, hidden):
            head = nnx.merge(graphdef, params).head
            if chunk:
                ce, kl = chunked_token_losses(head, hidden[0], hidden[1], targets, chunk)
            else:
                ce, kl = token_losses(head(hidden[0]), head(hidden[1]), targets)
            batch = {"best_mask": valid, "worse_mask": valid}
            return diffpo_loss(ce, kl, batch, LossConfig(con_weight=1e3), num_tokens=jnp.sum(valid).astype(jnp.float32))

        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, hidden)

    (plain, plain_parts), plain_grads = loss_and_grad(params, hidden, 0)
    (chunked, chunked_parts), chunked_grads = loss_and_grad(params, hidden, 4)
    np.testing.assert_allclose(float(chunked), float(plain), rtol=1e-6)
    np.testing.assert_allclose(float(chunked_parts["con"]), float(plain_parts["con"]), rtol=1e-6)
    assert float(plain_parts["con"]) > 1e-2 and float(plain_parts["ar"]) > 1.0
    leaves = [(p, g, c) for (p, g), c in zip(jax.tree.leaves_with_path(plain_grads), jax.tree.leaves(chunked_grads))]
    assert sum(float(jnp.abs(g).max()) > 0 for _, g, _ in leaves) == 2  # the head, the hidden states
    assert float(jnp.abs(plain_grads[1][0]).min(axis=-1).max()) > 0  # teacher hidden: from the AR loss
    assert float(jnp.abs(plain_grads[1][1]).min(axis=-1).max()) > 0  # student hidden: from the KL
    for path, g_plain, g_chunked in leaves:
        scale = float(jnp.abs(g_plain).max())
        np.testing.assert_allclose(
            np.asarray(g_chunked), np.asarray(g_plain), rtol=1e-5, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path)
        )


def test_effective_con_weight_reads_the_paper_w_per_vocabulary_entry_and_warms_up():
    from diffpo_jax.training.loss import effective_con_weight

    token, vocab = LossConfig(con_weight=1000.0), LossConfig(con_weight=1000.0, con_norm="vocab")
    assert float(effective_con_weight(token, 0, 256_000)) == 1000.0
    # PyTorch KLDivLoss(reduction="mean") over [tokens, V]: the per-token KL divided by V
    np.testing.assert_allclose(float(effective_con_weight(vocab, 0, 256_000)), 1000.0 / 256_000, rtol=1e-6)
    np.testing.assert_allclose(float(effective_con_weight(vocab, 0, 49_152)), 0.020345, rtol=1e-4)
    ramp = LossConfig(con_weight=2.0, con_warmup_steps=4)
    assert [float(effective_con_weight(ramp, s, 10)) for s in (0, 1, 2, 4, 9)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="con_norm"):
        effective_con_weight(LossConfig(con_norm="mean"), 0, 10)


def test_diffpo_loss_takes_the_effective_weight():
    ce, kl = jnp.ones((1, 3)), jnp.full((1, 3), 2.0)
    batch = {"best_mask": jnp.ones((1, 3), bool), "worse_mask": jnp.ones((1, 3), bool)}
    cfg = LossConfig(con_weight=1000.0, con_positions="all")
    total, parts = diffpo_loss(ce, kl, batch, cfg, num_tokens=jnp.float32(3.0), con_weight=0.5)
    assert float(parts["con"]) == 2.0 and float(total) == 1.0 + 0.5 * 2.0
    assert float(diffpo_loss(ce, kl, batch, cfg, num_tokens=jnp.float32(3.0))[0]) == 1.0 + 1000.0 * 2.0


def test_vocab_reading_equals_pytorch_kldivloss_mean():
    # w * KLDivLoss(reduction="mean") over [tokens, V] (what a CLLM-derived PyTorch trainer computes) equals
    # effective_con_weight(con_norm="vocab") x our per-token mean KL
    from diffpo_jax.training.loss import effective_con_weight, token_losses

    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(6, 50)).astype(np.float32), rng.normal(size=(6, 50)).astype(np.float32)
    _, kl = token_losses(jnp.asarray(t), jnp.asarray(s), jnp.zeros((6,), jnp.int32))
    ours = float(effective_con_weight(LossConfig(con_weight=1e3, con_norm="vocab"), 0, 50)) * float(jnp.mean(kl))
    torch_loss = 1e3 * F.kl_div(
        F.log_softmax(torch.tensor(s), -1), F.log_softmax(torch.tensor(t), -1), log_target=True, reduction="mean"
    )
    np.testing.assert_allclose(ours, float(torch_loss), rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, 4])
def test_frozen_teacher_takes_the_kl_target_from_the_frozen_model(tiny_llama_dir, chunk):
    """loss.teacher = "frozen": ce is the live model's on [prompt, y(T)], the KL's teacher the frozen model's
    distribution on the same row (run apart), the student the live model's on [prompt, y(t)]; no gradient
    reaches the frozen model."""
    live = load_model(str(tiny_llama_dir)).model
    graphdef, state = nnx.split(live)
    frozen = nnx.merge(graphdef, jax.tree.map(lambda x: x * 0.5, state))  # another model of the same shape
    rng = np.random.default_rng(1)
    b, p, n, v = 2, 5, 7, live.cfg.vocab_size
    batch = {
        "prompt": jnp.asarray(rng.integers(3, v, (b, p)), jnp.int32),
        "prompt_mask": jnp.ones((b, p), bool),
        "best": jnp.asarray(rng.integers(3, v, (b, n)), jnp.int32),
        "best_mask": jnp.ones((b, n), bool),
        "worse": jnp.asarray(rng.integers(3, v, (b, n)), jnp.int32),
        "worse_mask": jnp.ones((b, n), bool),
    }
    pos = jnp.broadcast_to(jnp.arange(p + n), (b, p + n))
    ones = jnp.ones((b, p + n), bool)
    row = lambda m, resp: m(jnp.concatenate([batch["prompt"], resp], 1), pos, ones)[0][:, p - 1 : p - 1 + n]
    ref_ce, _ = token_losses(row(live, batch["best"]), row(live, batch["worse"]), batch["best"])
    _, ref_kl = token_losses(row(frozen, batch["best"]), row(live, batch["worse"]), batch["best"])
    ce, kl = response_token_losses(live, batch, chunk, frozen)
    np.testing.assert_allclose(ce, ref_ce, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(kl, ref_kl, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(kl - response_token_losses(live, batch, chunk)[1]))) > 1e-3  # not the live KL

    def total(frozen_state):
        ce, kl = response_token_losses(live, batch, chunk, nnx.merge(graphdef, frozen_state))
        return jnp.sum(ce) + jnp.sum(kl)

    grads = jax.grad(total)(nnx.state(frozen))
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
