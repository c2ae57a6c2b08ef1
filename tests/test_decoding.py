"""The decoders on tiny random models (fp32): AR greedy == transformers, Jacobi == AR greedy token for
token whatever the draft and block size, stop tokens, hold_draft_prefix, the iteration cap, re-alignment,
sampling and no recompilation. Shapes are shared so each (block size, options) compiles once."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from diffpo_jax.decoding import generate, jacobi_decode, sample
from diffpo_jax.decoding.jacobi import _realign
from diffpo_jax.model import abstract_model
from diffpo_jax.sources import load_model
from tests import tiny

N = 12  # max_new_tokens
P = 16  # prompt padding
D = 24  # draft padding (> N: drafts longer than max_new_tokens fit)
LENS = np.array([5, 9, 3, 12, 5, 9, 3, 12], np.int32)  # each prompt twice, so 8 draft kinds


@pytest.fixture(scope="module")
def setup(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir))
    graphdef, state = nnx.split(lm.model)
    base = np.random.default_rng(0).integers(3, tiny.VOCAB, (4, P)).astype(np.int32)
    prompts = np.concatenate([base, base])
    for i, n in enumerate(LENS):
        prompts[i, n:] = 0
    greedy = generate(graphdef, state, prompts, LENS, max_new_tokens=N)
    return graphdef, state, prompts, np.asarray(greedy.tokens)


def _drafts(greedy, seed: int = 0):
    """8 draft kinds (one per row): random, empty, == greedy, shifted right (a token inserted), shifted
    left (first token deleted), longer than max_new_tokens, shorter, greedy with one token changed. Each
    test draws its own (the same for any test order)."""
    rng = np.random.default_rng(seed)
    rows = [
        list(rng.integers(3, tiny.VOCAB, N)),
        [],
        list(greedy[2]),
        [7] + list(greedy[3]),
        list(greedy[4][1:]),
        list(greedy[5]) + list(rng.integers(3, tiny.VOCAB, D - N)),
        list(greedy[6][: N // 2]),
        list(greedy[7][:5]) + [(greedy[7][5] + 1) % tiny.VOCAB] + list(greedy[7][6:]),
    ]
    out = np.zeros((len(rows), D), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, np.array([len(r) for r in rows], np.int32)


def test_ar_greedy_matches_transformers(setup, tiny_llama_dir):
    _, _, prompts, greedy = setup
    ref = tiny.load_reference(tiny_llama_dir)
    ref.generation_config.eos_token_id = None
    for row in range(4):
        ids = torch.tensor(prompts[row : row + 1, : LENS[row]], dtype=torch.long)
        out = ref.generate(ids, do_sample=False, max_new_tokens=N, pad_token_id=0)
        assert out[0, LENS[row] :].tolist() == greedy[row].tolist()


@pytest.mark.parametrize(
    "block_size,realign", [(1, True), (4, True), (4, False), (16, True), (16, False), (N + 3, True)]
)
def test_jacobi_equals_greedy(setup, block_size, realign):
    graphdef, state, prompts, greedy = setup
    drafts, draft_lens = _drafts(greedy)
    r = jacobi_decode(
        graphdef, state, prompts, LENS, drafts, draft_lens, block_size=block_size, max_new_tokens=N, realign=realign
    )
    np.testing.assert_array_equal(np.asarray(r.tokens), greedy)
    assert np.all(np.asarray(r.lengths) == N) and np.all(r.converged) and not np.any(r.stopped)
    passes = np.asarray(r.passes)
    assert np.all(passes <= N) and np.all(np.asarray(r.committed) == N)
    assert passes[2] == math.ceil(N / block_size)  # draft == greedy: one pass per block
    if realign:  # shifted drafts re-seeded from the draft: at most two passes per block
        assert passes[3] <= 2 * math.ceil(N / block_size) and passes[4] <= 2 * math.ceil(N / block_size)


def test_jacobi_equals_greedy_with_xla_attention(setup, tiny_llama_dir):
    """The fused attention's CPU path (attention.py "xla"): AR greedy and Jacobi give the einsum model's tokens."""
    _, state, prompts, greedy = setup
    graphdef, _ = nnx.split(abstract_model(load_model(str(tiny_llama_dir)).cfg.replace(attention="xla")))
    np.testing.assert_array_equal(np.asarray(generate(graphdef, state, prompts, LENS, max_new_tokens=N).tokens), greedy)
    drafts, draft_lens = _drafts(greedy)
    r = jacobi_decode(graphdef, state, prompts, LENS, drafts, draft_lens, block_size=4, max_new_tokens=N)
    np.testing.assert_array_equal(np.asarray(r.tokens), greedy)


def test_gemma2_sliding_window(tiny_gemma2_dir):
    """Gemma-2 (window 8 < prompt + response) with a shifted draft: Jacobi == AR greedy."""
    lm = load_model(str(tiny_gemma2_dir))
    graphdef, state = nnx.split(lm.model)
    prompts = np.random.default_rng(1).integers(3, tiny.VOCAB, (2, P)).astype(np.int32)
    lens = np.array([P, 6], np.int32)
    greedy = np.asarray(generate(graphdef, state, prompts, lens, max_new_tokens=N).tokens)
    drafts = np.concatenate([greedy[:, 1:], greedy[:, :1]], axis=1)
    r = jacobi_decode(graphdef, state, prompts, lens, drafts, np.array([N, 3]), block_size=4, max_new_tokens=N)
    np.testing.assert_array_equal(np.asarray(r.tokens), greedy)


def test_stop_tokens(setup):
    """A stop token the greedy answer contains ends each row there (kept, then padding), in both decoders;
    a draft ending early with it does not end the row early."""
    graphdef, state, prompts, greedy = setup
    stop = int(greedy[0, 4])
    expected = np.full_like(greedy, -1)
    lengths = np.full(len(greedy), N)
    for i, row in enumerate(greedy):
        hits = np.flatnonzero(row == stop)
        lengths[i] = hits[0] + 1 if hits.size else N
        expected[i, : lengths[i]] = row[: lengths[i]]
    ar = generate(graphdef, state, prompts, LENS, max_new_tokens=N, stop_tokens=(stop,), pad_id=-1)
    drafts, draft_lens = _drafts(greedy)
    drafts[1, :3], draft_lens[1] = [greedy[1, 0], greedy[1, 1], stop], 3  # ends early with the stop token
    jr = jacobi_decode(
        graphdef,
        state,
        prompts,
        LENS,
        drafts,
        draft_lens,
        block_size=4,
        max_new_tokens=N,
        stop_tokens=(stop,),
        pad_id=-1,
    )
    for r in (ar, jr):
        np.testing.assert_array_equal(np.asarray(r.tokens), expected)
        np.testing.assert_array_equal(np.asarray(r.lengths), lengths)
        np.testing.assert_array_equal(np.asarray(r.stopped), lengths < N)
    assert (lengths < N).sum() >= 2 and np.all(jr.converged)


def test_hold_draft_prefix(setup):
    """The first R draft tokens are kept as they are and the rest is the greedy continuation of
    prompt + those tokens (a draft shorter than R is kept whole)."""
    graphdef, state, prompts, greedy = setup
    r_hold = 3
    drafts, draft_lens = _drafts(greedy)
    held_lens = np.minimum(draft_lens, r_hold)
    extended = np.zeros((len(prompts), P + r_hold), np.int32)
    for i in range(len(prompts)):
        extended[i, : LENS[i] + held_lens[i]] = list(prompts[i, : LENS[i]]) + list(drafts[i, : held_lens[i]])
    cont = np.asarray(generate(graphdef, state, extended, LENS + held_lens, max_new_tokens=N).tokens)
    r = jacobi_decode(
        graphdef, state, prompts, LENS, drafts, draft_lens, block_size=4, max_new_tokens=N, hold_draft_prefix=r_hold
    )
    tokens = np.asarray(r.tokens)
    for i in range(len(prompts)):
        h = held_lens[i]
        assert tokens[i, :h].tolist() == drafts[i, :h].tolist()
        assert tokens[i, h:].tolist() == cont[i, : N - h].tolist()
    np.testing.assert_array_equal(np.asarray(r.committed), N - held_lens)
    assert held_lens[0] == r_hold and held_lens[1] == 0 and tokens[0, :3].tolist() != greedy[0, :3].tolist()


@pytest.mark.slow
def test_per_row_held_prefix_equals_fixed_holds(setup):
    """hold_lens: each row holds its own number of draft tokens (the official script's random 0..12), and
    gets exactly the answer and stats of a run holding that many tokens in every row."""
    graphdef, state, prompts, greedy = setup
    drafts, draft_lens = _drafts(greedy)
    holds = np.array([0, 3, 1, 2, 3, 0, 2, 1], np.int32)
    kwargs = dict(block_size=4, max_new_tokens=N, hold_draft_prefix=3)
    got = jax.device_get(jacobi_decode(graphdef, state, prompts, LENS, drafts, draft_lens, hold_lens=holds, **kwargs))
    for r_hold in range(4):
        want = jax.device_get(
            jacobi_decode(graphdef, state, prompts, LENS, drafts, draft_lens, **kwargs | dict(hold_draft_prefix=r_hold))
        )
        rows = holds == r_hold
        for name in ("tokens", "lengths", "passes", "committed"):
            np.testing.assert_array_equal(getattr(got, name)[rows], getattr(want, name)[rows], err_msg=name)


def test_iteration_cap_and_no_recompile(setup):
    """max_iterations caps the passes (rows marked not converged; what they committed is still the greedy
    prefix); new values of every traced input reuse the compilation of test_jacobi_equals_greedy."""
    graphdef, state, prompts, greedy = setup
    drafts, draft_lens = _drafts(greedy)
    kwargs = dict(block_size=4, max_new_tokens=N, realign=True)
    from diffpo_jax.decoding import jacobi

    jacobi_decode(graphdef, state, prompts, LENS, drafts, draft_lens, max_iterations=N, **kwargs)
    before = (jacobi._start._cache_size(), jacobi._advance._cache_size())
    r = jacobi_decode(
        graphdef, state, prompts, LENS[::-1].copy(), drafts[::-1].copy(), draft_lens, max_iterations=2, **kwargs
    )
    r = jacobi_decode(graphdef, state, prompts, LENS, drafts, draft_lens, max_iterations=2, **kwargs)
    assert (jacobi._start._cache_size(), jacobi._advance._cache_size()) == before
    assert np.all(np.asarray(r.passes) == 2) and not np.all(r.converged)
    lengths, tokens = np.asarray(r.lengths), np.asarray(r.tokens)
    np.testing.assert_array_equal(np.asarray(r.converged), lengths == N)
    for i in range(len(prompts)):
        assert 2 <= lengths[i] and tokens[i, : lengths[i]].tolist() == greedy[i, : lengths[i]].tolist()


def test_trajectory_records_the_state_after_each_pass(setup):
    """trajectory=True changes nothing else; states[:, k] is the response after pass k: its committed part
    is what max_iterations = k + 1 commits, the offsets past the window hold the draft, the last state is
    the answer, and slots past a row's last pass are padding."""
    graphdef, state, prompts, greedy = setup
    drafts, draft_lens = _drafts(greedy)
    kwargs = dict(block_size=4, max_new_tokens=N, realign=True, pad_id=-1)
    plain = jacobi_decode(graphdef, state, prompts, LENS, drafts, draft_lens, **kwargs)
    r = jacobi_decode(graphdef, state, prompts, LENS, drafts, draft_lens, trajectory=True, **kwargs)
    for field in ("tokens", "lengths", "passes", "committed", "converged"):
        np.testing.assert_array_equal(np.asarray(getattr(r, field)), np.asarray(getattr(plain, field)))
    assert plain.states is None
    states, passes = np.asarray(r.states), np.asarray(r.passes)
    assert states.shape == (len(prompts), N, N) and passes.max() > 2
    for k in range(passes.max()):
        capped = jacobi_decode(graphdef, state, prompts, LENS, drafts, draft_lens, max_iterations=k + 1, **kwargs)
        lengths, tokens = np.asarray(capped.lengths), np.asarray(capped.tokens)
        for i in range(len(prompts)):
            if k < passes[i]:
                n = lengths[i]
                assert states[i, k, :n].tolist() == tokens[i, :n].tolist()
                past = np.arange(n + 4, N)  # offsets past the window: the draft (pad past its end)
                expected = np.where(past < draft_lens[i], drafts[i, np.minimum(past, D - 1)], -1)
                assert states[i, k, n + 4 :].tolist() == expected.tolist(), (i, k)
            else:
                assert np.all(states[i, k] == -1)
    for i in range(len(prompts)):
        assert states[i, passes[i] - 1].tolist() == greedy[i].tolist()


def test_realign_reseeds_after_insertion():
    """Trailing tokens (committed..., next) found in the draft: the guesses continue the draft from there;
    no match: the window is unchanged."""
    draft = jnp.array([[10, 11, 12, 13, 14, 15, 16, 17], [10, 11, 12, 13, 14, 15, 16, 17]])
    tokens = jnp.array([[99, 10, 11, 0, 0, 0], [50, 51, 52, 0, 0, 0]])  # row 0: a token was inserted
    n = jnp.array([3, 3])
    window = jnp.array([[12, 1, 2, 3], [53, 1, 2, 3]])  # next token, then guesses
    out = _realign(window, tokens, n, draft, jnp.array([8, 8]))
    np.testing.assert_array_equal(np.asarray(out), [[12, 13, 14, 15], [53, 1, 2, 3]])
    out = _realign(window, tokens, n, draft, jnp.array([3, 8]))  # draft ends at the match: guesses kept
    np.testing.assert_array_equal(np.asarray(out), [[12, 1, 2, 3], [53, 1, 2, 3]])


def test_sample_greedy_top_p_and_temperature():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.split(jax.random.key(0), 4000)
    assert np.all(np.asarray(sample(logits, keys, jnp.float32(0.0), jnp.float32(1.0))) == 0)
    assert np.all(np.asarray(sample(logits, keys, jnp.float32(1.0), jnp.float32(1e-6))) == 0)
    nucleus = np.asarray(sample(logits, keys, jnp.float32(1.0), jnp.float32(0.7)))  # mass before token 2 is 0.8
    assert set(nucleus.tolist()) == {0, 1} and abs(np.mean(nucleus == 0) - 0.5 / 0.8) < 0.03
    full = np.bincount(np.asarray(sample(logits, keys, jnp.float32(1.0), jnp.float32(1.0))), minlength=4) / 4000
    np.testing.assert_allclose(full, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    hot = np.bincount(np.asarray(sample(logits, keys, jnp.float32(0.5), jnp.float32(1.0))), minlength=4) / 4000
    p = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(hot, p / p.sum(), atol=0.03)


def test_generate_sampling_is_seeded_per_row(setup):
    """Same keys, same tokens; other keys, other tokens; a row's tokens follow its own key and prompt
    whatever the other rows (rows and keys permuted together: tokens permuted the same way)."""
    graphdef, state, prompts, greedy = setup
    kw = dict(max_new_tokens=N, temperature=0.9, top_p=0.95)
    keys = jax.random.split(jax.random.key(1), len(prompts))
    a = np.asarray(generate(graphdef, state, prompts, LENS, keys, **kw).tokens)
    b = np.asarray(generate(graphdef, state, prompts, LENS, keys, **kw).tokens)
    c = np.asarray(
        generate(graphdef, state, prompts, LENS, jax.random.split(jax.random.key(2), len(prompts)), **kw).tokens
    )
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, greedy)
    perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])
    permuted = generate(graphdef, state, prompts[perm], LENS[perm], keys[perm], **kw)
    np.testing.assert_array_equal(np.asarray(permuted.tokens), a[perm])
    assert not np.array_equal(a[0], a[4])  # rows 0 and 4: one prompt, two keys, two answers


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(hold_draft_prefix=3),
        dict(max_iterations=2),
        dict(hold_draft_prefix=3, hold_lens=np.array([3, 0, 1, 2, 3, 2, 1, 0])),
    ],
    ids=["plain", "hold", "cap", "hold-per-row"],
)
def test_row_refill_equals_one_batch(setup, options):
    """jacobi_stream: 8 rows through 3 slots (a finished row's slot takes the next row) give every row the
    tokens and stats jacobi_decode gives it in one batch of 8, with a held draft prefix and a pass cap."""
    from diffpo_jax.decoding.jacobi import jacobi_stream

    graphdef, state, prompts, greedy = setup
    drafts, draft_lens = _drafts(greedy)
    kwargs = dict(block_size=4, max_new_tokens=N, **options)
    want = jax.device_get(jacobi_decode(graphdef, state, prompts, LENS, drafts, draft_lens, **kwargs))
    got = jacobi_stream(graphdef, state, prompts, LENS, drafts, draft_lens, batch_size=3, **kwargs)
    for name in ("tokens", "lengths", "stopped", "converged", "passes", "committed"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    if "max_iterations" in options:
        assert np.all(got.passes == 2) and not np.all(got.converged)
    else:  # rows finish at different passes, so slots are refilled mid-run
        assert len(set(want.passes.tolist())) > 1


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_generate_row_refill_equals_one_batch(setup, temperature):
    """generate_stream: 8 rows through 3 slots give every row the tokens generate gives it in one batch
    (its key decides its samples), rows ending at different steps on a stop token."""
    from diffpo_jax.decoding.sampler import generate_stream

    graphdef, state, prompts, greedy = setup
    stop = int(greedy[1, 4])  # ends row 1 (and any row that draws it) early
    kw = dict(max_new_tokens=N, temperature=temperature, top_p=0.95, stop_tokens=(stop,))
    keys = jax.random.split(jax.random.key(1), len(prompts))
    want = jax.device_get(generate(graphdef, state, prompts, LENS, keys, **kw))
    got = generate_stream(graphdef, state, prompts, LENS, keys, batch_size=3, **kw)
    for name in ("tokens", "lengths", "stopped"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert want.stopped.any() and len(set(want.lengths.tolist())) > 1  # slots are refilled mid-run


def test_refine_random_hold_is_drawn_from_the_record_index():
    """refine --hold-draft-prefix random:R: each record's held tokens, uniform in 0..R, depend on its input
    index alone (any batching, process count or resume gives the same)."""
    from diffpo_jax import refine as refine_cli

    args = refine_cli.parse_args(["--input", "i", "--output", "o", "--hold-draft-prefix", "random:12"])
    holds = refine_cli.hold_lens(args.hold_draft_prefix, list(range(200)))
    assert refine_cli.hold_max(args.hold_draft_prefix) == 12 and set(holds) == set(range(13))
    assert refine_cli.hold_lens("random:12", [7, 3]) == [holds[7], holds[3]]
    assert (
        refine_cli.hold_lens(5, [0, 1]) is None
        and refine_cli.parse_args(["--input", "i", "--output", "o", "--hold-draft-prefix", "5"]).hold_draft_prefix == 5
    )
    for bad in ("random:x", "-1", "random:"):
        with pytest.raises(SystemExit):
            refine_cli.parse_args(["--input", "i", "--output", "o", "--hold-draft-prefix", bad])
