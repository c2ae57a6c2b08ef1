"""Decode memory and compile-count invariants, from XLA's own compiled programs (no accelerator needed):
the decode loops update the KV cache in place and alias the donated state, the prefill projects the last
position only (its memory does not grow with the vocabulary), and row refill compiles once under a mesh."""

import jax
import numpy as np
import pytest

from bench.decode_memory import analyse


@pytest.fixture(scope="module")
def small_vocab():
    return analyse(vocab=128)


def test_decode_loops_hold_one_cache_and_alias_the_donated_state(small_vocab):
    for name in ("jacobi _advance", "sampler _advance"):
        m = small_vocab[name]
        assert m["temp_caches"] <= 1.25 * 0.5, (name, m)  # besides the state: under half a cache (was 1.34)
        assert m["alias_states"] == pytest.approx(1.0), (name, m)  # the output state is the donated input
    assert small_vocab["jacobi _refill"]["alias_states"] == pytest.approx(1.0)


def test_prefill_memory_does_not_grow_with_the_vocabulary(small_vocab):
    big = analyse(vocab=32768)
    for name in ("jacobi _refill", "jacobi_decode", "generate"):
        small_bytes = small_vocab[name]["temp_caches"] * small_vocab[name]["cache_bytes"]
        big_bytes = big[name]["temp_caches"] * big[name]["cache_bytes"]
        # [B, P, V] fp32 logits would add 8 x 256 x 32768 x 4 bytes = 256 MiB; the head's weights are arguments
        assert big_bytes - small_bytes < 2**20, (name, small_bytes, big_bytes)


@pytest.mark.parametrize(
    "shape",
    [(8, 1, 1), pytest.param((4, 1, 2), marks=pytest.mark.slow), pytest.param((2, 4, 1), marks=pytest.mark.slow)],
)
def test_row_refill_compiles_once_under_a_mesh(tiny_llama_dir, shape, caplog):
    """The slots' sharding (slots.place) is the one the jitted refill and loop return, so neither compiles
    a second time for the state it gets back."""
    from flax import nnx

    from diffpo_jax.decoding import jacobi, sampler
    from diffpo_jax.sharding import make_mesh
    from diffpo_jax.sources import load_model

    mesh = make_mesh(shape)
    graphdef, state = nnx.split(load_model(str(tiny_llama_dir), mesh=mesh).model)
    rng = np.random.default_rng(0)
    lens = np.array([3, 5, 7, 4] * 5, np.int32)
    prompts = np.where(np.arange(8) < lens[:, None], rng.integers(3, 100, (len(lens), 8)), 0).astype(np.int32)
    drafts = rng.integers(3, 100, (len(lens), 10)).astype(np.int32)
    keys = jax.random.split(jax.random.key(0), len(lens))
    funcs = (jacobi._refill, jacobi._advance, sampler._refill, sampler._advance)
    for f in funcs:
        f.clear_cache()
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), jax.log_compiles(True), caplog.at_level("WARNING"):
        jacobi.jacobi_stream(
            graphdef,
            state,
            prompts,
            lens,
            drafts,
            np.full(len(lens), 10, np.int32),
            batch_size=8,
            block_size=4,
            max_new_tokens=6,
            mesh=mesh,
        )
        sampler.generate_stream(
            graphdef, state, prompts, lens, keys, batch_size=8, max_new_tokens=6, temperature=0.5, mesh=mesh
        )
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Finished XLA compilation of")]
    for name in ("_refill", "_advance"):
        assert sum(f"jit({name})" in m for m in compiled) == 2, (shape, name, compiled)  # the Jacobi one, the AR one


def test_the_decode_program_does_not_grow_with_the_batch():
    """The KV write is one scatter of row windows, not an op per row: the compiled loop and refill have
    about as many instructions at 64 rows as at 8 (XLA's fusion choices vary a little; an unrolled per-row
    write adds 4 per row and layer scan body, and took 83 s and 3.5 GB to compile at 1,024 rows)."""
    from diffpo_jax.config import load_preset
    from diffpo_jax.decoding.plan import compile_decode
    from diffpo_jax.sharding import make_mesh

    cfg = load_preset("tiny-llama")[0]
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])

    def instructions(rows):
        compiled = compile_decode(cfg, mesh, kind="refine", rows=rows, prompt_len=16, max_new_tokens=8, block=4)
        return {name: sum(" = " in line for line in c.as_text().splitlines()) for name, c in compiled.items()}

    small, large = instructions(8), instructions(64)
    for name in small:
        assert large[name] < 1.05 * small[name], (small, large)
