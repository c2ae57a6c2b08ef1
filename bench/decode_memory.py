"""How much memory do the decode loops hold besides their state? compile().memory_analysis() of the jitted
Jacobi and AR loops (`_advance`: every decode's loop, row refill's and one batch's), of the prefill of row
refill (`_refill`, one row) and of the start of a batch (`_start`: `jacobi_decode` / `generate` and the
stream's first B rows, one row's prefill after the other), on a small-vocabulary config where the KV cache
dominates.

    python -m bench.decode_memory [--preset tiny-llama] [--batch 8] [--prompt 256] [--new 256] [--block 16]
        [--vocab V] [--layers 8] [--results DIR]

Per function: temp bytes (buffers XLA allocates besides arguments and outputs) in units of one KV cache
(k + v), and the bytes of the output aliased to donated arguments (in units of the state), for the
backend jax runs on (bench/accelerator_check.sh runs it on the GPU's compiler too). Writes
bench/results/decode-memory-BACKEND.md.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common


def analyse(
    preset: str = "tiny-llama",
    batch: int = 8,
    prompt: int = 256,
    new: int = 256,
    block: int = 16,
    vocab: int | None = None,
    layers: int | None = 8,
) -> dict[str, dict[str, float]]:
    from diffpo_jax.config import load_preset
    from diffpo_jax.decoding import jacobi, sampler
    from diffpo_jax.model import Transformer

    cfg, _ = load_preset(preset)
    if vocab:
        cfg = cfg.replace(vocab_size=vocab)
    if layers:  # a real model's depth: one layer's slice of the cache is then a small part of it
        cfg = cfg.replace(num_layers=layers)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    out = {}

    def record(name, compiled, state_tree, cache_tree):
        m = compiled.memory_analysis()
        cache = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache_tree))
        size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state_tree))
        out[name] = {
            "temp_caches": m.temp_size_in_bytes / cache,
            "alias_states": m.alias_size_in_bytes / size,
            "cache_bytes": cache,
        }

    opts = jacobi.JacobiOptions(block, new, stop_tokens=(2,))
    js = jax.eval_shape(lambda: jacobi._empty(cfg, batch, prompt, new + block, opts))
    kw = dict(stop_tokens=(2,), pad_id=0)
    record(
        "jacobi _advance",
        jacobi._advance.lower(graphdef, state, js, np.int32(new), np.zeros(batch, bool), opts=opts).compile(),
        js,
        js.cache,
    )
    record(
        "jacobi _refill",
        jacobi._refill.lower(
            graphdef,
            state,
            js,
            np.int32(0),
            i32(prompt),
            np.int32(1),
            i32(new + block),
            np.int32(1),
            np.int32(0),
            opts=opts,
        ).compile(),
        js,
        js.cache,
    )
    record(
        "jacobi _start",
        jacobi._start.lower(
            graphdef,
            state,
            i32(batch, prompt),
            i32(batch),
            i32(batch, new + block),
            i32(batch),
            i32(batch),
            batch_size=batch,
            opts=opts,
        ).compile(),
        js,
        js.cache,
    )
    ss = jax.eval_shape(lambda: sampler._empty(cfg, batch, prompt, max_new_tokens=new, pad_id=0))
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    record(
        "sampler _advance",
        sampler._advance.lower(graphdef, state, ss, np.zeros(batch, bool), 0.7, 1.0, stop_tokens=(2,)).compile(),
        ss,
        ss.cache,
    )
    record(
        "sampler _start",
        sampler._start.lower(
            graphdef,
            state,
            i32(batch, prompt),
            i32(batch),
            keys,
            np.float32(0.7),
            np.float32(1.0),
            batch_size=batch,
            max_new_tokens=new,
            **kw,
        ).compile(),
        ss,
        ss.cache,
    )
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.decode_memory", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-llama")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--vocab", type=int, help="override the preset's vocabulary size")
    ap.add_argument("--layers", type=int, default=8, help="override the preset's depth (default 8)")
    common.add_results_option(ap)
    args = ap.parse_args(argv)
    figures = analyse(args.preset, args.batch, args.prompt, args.new, args.block, args.vocab, args.layers)
    name = f"decode-memory-{jax.default_backend()}"
    rows = [
        [name, f"{m['temp_caches']:.2f}", f"{m['alias_states']:.2f}", f"{m['cache_bytes'] / 2**20:.2f}"]
        for name, m in figures.items()
    ]
    body = common.header(
        f"Decode memory on {jax.default_backend()}", name, "bench.decode_memory", argv, common.machine()
    )
    body += (
        "\n"
        + common.table(
            ["function", "temp (KV caches)", "output aliased to donated state (states)", "one KV cache (MiB)"], rows
        )
        + "\n"
    )
    common.report(args.results, name, body)


if __name__ == "__main__":
    main()
