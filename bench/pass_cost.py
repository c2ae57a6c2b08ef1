"""What one Jacobi pass costs against one AR step, by window size, and why: the matmuls of M rows.

    python -m bench.pass_cost [--model SPEC] [--prompts 8] [--max-new-tokens 32] [--windows 1,2,4,8,16]
        [--rows 1,2,4,8,16,32] [--profile] [--results DIR]

Refinement beats AR decoding when passes per token x (cost of a pass / cost of an AR step) < 1. This
measures both factors on one machine, one row at a time (the latency case Jacobi decoding is for):
1. AR greedy on the first --prompts prompts of bench/data/self_distill_prompts.jsonl: seconds per token
   (one AR step; the prefill amortised over the answer), and the weight-streaming bound of a step:
   parameter bytes / the device's memory bandwidth (a 512 MiB array read and written on the device).
2. Jacobi refinement of the model's own temperature-0.7 samples of the same prompts with a window of W
   tokens, for each W: passes per token, seconds per pass (and in AR steps), refine tokens/s over AR
   tokens/s; every answer must equal the AR answer.
3. The model's matmuls alone, M rows (a W-token pass multiplies M = W rows by every weight): the
   layers' q/k/v, o, gate/up and down projections chained through num_layers, then the lm head, on
   random weights of the model's shapes; seconds per call against M = 1.
4. `--profile`: one AR decode of the first prompt and one refinement of its draft at the largest
   window under jax.profiler: the XLA ops summed per op kind (bench/train_speed.py's `jax_profile`),
   thread-seconds per generated token: where a step's time goes beyond the matmuls.
Timings after a warm-up call of each shape. Writes bench/results/pass_cost.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench import common

PROMPTS = Path(__file__).resolve().parent / "data" / "self_distill_prompts.jsonl"


def timed(fn, repeats: int = 1) -> float:
    """Seconds per call of fn after one warm-up call (fn blocks until its result is ready)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bandwidth() -> float:
    """Bytes per second the default device's memory streams, a 512 MiB array read and written once: on
    CPU a numpy copy (XLA:CPU's own elementwise op runs at a fraction of it: it maps a fresh output
    buffer per call), on a GPU / TPU x + 1 under jit in its HBM."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() == "cpu":
        a, b = np.ones(2**27, np.float32), np.empty(2**27, np.float32)
        return 2 * a.nbytes / min(timed(lambda: np.copyto(b, a)) for _ in range(3))
    x = jnp.ones(2**27, jnp.float32)
    add = jax.jit(lambda x: x + 1.0)
    return 2 * x.nbytes / min(timed(lambda: add(x).block_until_ready()) for _ in range(3))


def matmul_chain_seconds(cfg, rows: int) -> float:
    """Seconds per call of the model's projections on `rows` rows (module doc, step 3)."""
    import jax
    import jax.numpy as jnp

    e, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    rng = np.random.default_rng(0)

    def w(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02)

    layers = [(w(e, qkv), w(cfg.num_heads * d, e), w(e, 2 * i), w(i, e)) for _ in range(cfg.num_layers)]
    head = w(e, cfg.vocab_size)

    @jax.jit
    def chain(x, layers, head):
        for wqkv, wo, wgu, wd in layers:
            h = x @ wqkv
            x = x + h[:, : cfg.num_heads * d] @ wo
            gu = x @ wgu
            x = x + (jax.nn.silu(gu[:, :i]) * gu[:, i:]) @ wd
        return x @ head

    x = jnp.ones((rows, e), jnp.float32)
    return min(timed(lambda: chain(x, layers, head).block_until_ready(), repeats=5) for _ in range(2))


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.pass_cost", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", default=None, help="anything diffpo_jax.sources.load_model accepts (default: embedded SmolLM2)"
    )
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--windows", default="1,2,4,8,16")
    ap.add_argument("--rows", default="1,2,4,8,16,32", help="M values of the matmul chain (1 first)")
    ap.add_argument("--profile", action="store_true", help="also profile one AR decode and one refinement (step 4)")
    common.add_results_option(ap)
    args = ap.parse_args(argv)
    import jax
    from flax import nnx

    from diffpo_jax.decoding.batching import Decoder
    from diffpo_jax.sources import load_model

    line = common.machine()
    loaded = load_model(args.model)
    decoder = Decoder(loaded, batch_size=1, max_new_tokens=args.max_new_tokens)
    texts = [json.loads(t)["prompt"] for t in PROMPTS.read_text().splitlines()[: args.prompts]]
    prompts = [decoder.prompt_tokens(t) for t in texts]

    def one(p, temperature, seed=0):
        return decoder.sample([p], jax.random.split(jax.random.key(seed), 1), temperature=temperature, top_p=1.0)[0]

    drafts = [one(p, 0.7, seed).tokens + [decoder.end_of_turn] for seed, p in enumerate(prompts)]
    greedy = [one(p, 0.0) for p in prompts]
    ar_s = timed(lambda: [one(p, 0.0) for p in prompts])
    tokens = sum(o.stats["tokens"] for o in greedy)
    step = ar_s / tokens
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(loaded.model)))
    bound = param_bytes / bandwidth()

    rows = []
    for w in map(int, args.windows.split(",")):
        outs = [decoder.refine([p], [d], block_size=w)[0] for p, d in zip(prompts, drafts)]
        if [o.tokens for o in outs] != [g.tokens for g in greedy]:
            raise SystemExit(f"window {w}: refined answers differ from AR greedy")
        seconds = timed(lambda w=w: [decoder.refine([p], [d], block_size=w) for p, d in zip(prompts, drafts)])
        passes = sum(o.stats["passes"] for o in outs)
        rows.append([w, passes / tokens, seconds / passes, seconds / passes / step, ar_s / seconds])
    mm = {m: matmul_chain_seconds(loaded.cfg, m) for m in map(int, args.rows.split(","))}

    body = common.header("Jacobi pass cost against the AR step", "pass_cost", "bench.pass_cost", argv, line)
    body += (
        f"\n- model {loaded.source}, fp32, batch 1, {len(prompts)} prompts, {tokens} answer tokens; drafts: the model's "
        f"temperature-0.7 samples; every refined answer equals AR greedy\n"
        f"- AR step: {step * 1e3:.1f} ms per token; weight-streaming bound {bound * 1e3:.1f} ms "
        f"({param_bytes / 2**20:.0f} MiB of parameters at {param_bytes / bound / 1e9:.1f} GB/s): the step is "
        f"{step / bound:.1f}x the bound\n\n"
    )
    body += common.table(
        ["window W", "passes / token", "ms / pass", "pass / AR step", "refine / AR tokens/s"],
        [[w, p, s * 1e3, r, x] for w, p, s, r, x in rows],
    )
    body += "\n\nThe same model's matmuls alone (projections of every layer + lm head, random weights), M rows per call:\n\n"
    body += common.table(["M rows", "ms / call", "vs M = 1"], [[m, s * 1e3, s / mm[1]] for m, s in mm.items()])
    profiles = {}
    if args.profile:
        from bench.train_speed import jax_profile, profile_table

        w = max(map(int, args.windows.split(",")))
        profiles = {
            "AR decode": (jax_profile(lambda: one(prompts[0], 0.0), 10), greedy[0].stats["tokens"]),
            f"refine, window {w}": (
                jax_profile(lambda: decoder.refine([prompts[0]], [drafts[0]], block_size=w), 10),
                greedy[0].stats["tokens"],
            ),
        }
        for name, (ops, n) in profiles.items():
            body += (
                f"\n\nProfile of one {name} of prompt 1 ({n} tokens), XLA ops per kind, thread-ms per token "
                "(the host waits in `np.asarray`):\n\n"
            )
            body += profile_table([(k, 1e3 * t / n, c) for k, t, c in ops], "thread-ms / token")
    common.report(args.results, "pass_cost", body)
    return {"step": step, "bound": bound, "windows": rows, "matmul": mm, "profiles": profiles}


if __name__ == "__main__":
    main()
