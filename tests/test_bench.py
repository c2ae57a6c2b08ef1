"""Smoke tests of the benchmarks on tiny configs: each main() runs in-process and its checks hold.

Not timed: the figures themselves are in bench/RESULTS.md.
"""

from bench import refine_speed


def test_refine_speed_tiny(tiny_llama_dir, tmp_path):
    results = tmp_path / "RESULTS.md"
    out = refine_speed.main([
        "--model", str(tiny_llama_dir), "--prompts", "2", "--max-new-tokens", "8", "--block-sizes", "4,8",
        "--official-block", "8", "--results", str(results),
    ])  # fmt: skip
    assert out["mismatches"] == 0  # every method reached jax_ar's greedy answers
    r = out["results"]
    assert {k[0] for k in r} == {"jax_ar", "hf_generate", "jacobi", "official"}
    assert len([k for k in r if k[0] == "jacobi"]) == 2 * 2 * 2  # blocks x realign x draft kinds
    tokens = r[("jax_ar", "-", "-", "-")]["tokens"]
    assert r[("jax_ar", "-", "-", "-")]["forwards"] == r[("hf_generate", "-", "-", "-")]["forwards"] == tokens
    # A draft equal to the answer, in one window: one prefill and one pass per prompt.
    assert r[("jacobi", "greedy", 8, True)]["forwards"] == 2 * 2
    text = results.read_text()
    assert "<!-- begin refine_speed -->" in text and "| official | sampled | 8 |" in text
