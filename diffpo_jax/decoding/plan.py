"""Will this decode fit? `refine|generate --plan DEVICES[/HOSTS] --device-memory GIB`, no weights loaded.

Without weights or data, the decode loop (`_advance`: the Jacobi passes of `refine`, the AR steps of
`generate`), the one-row prefill of row refill (`_refill`) and the start of a batch (`_start`: its rows'
prefills one after the other; a decode of one batch runs `_start` and `_advance`, a longer one all three) are compiled ahead of time over DEVICES / HOSTS
simulated CPU devices (one process's share: each process decodes its own records over its own devices)
with abstract shapes: the slots' state ([L, B, S, Kv, D] KV cache with S = prompt + max new tokens
(+ block)), the weights as the decoder shards them. XLA's memory analysis gives per-device bytes; peak =
argument + output - alias + temp of the largest of the three programs. The largest batch that fits comes
from two compiles (the state grows linearly in the rows) and is rounded down to a multiple of the
data x fsdp devices. As for `train --plan`, the figures are XLA:CPU's for the same sharded program, a
guide to the accelerator's. One correction: XLA:CPU runs bfloat16 matmuls by converting the weights to
float32 (a float32 copy of every weight in temp, which an accelerator never makes), so a bfloat16 plan
compiles the float32 program and halves its bytes (its fp32 logits, counted at half, are a small part).

Layout: `--mesh` when given; otherwise the smallest tensor-parallel degree t (a divisor of the local
devices and of the KV heads) whose peak at the requested batch fits the device memory, devices / t on
`data` (the runtime default, all devices on `data` with replicated weights, is t = 1): Gemma-2-9B's 18.5 GB
of bf16 weights cannot sit replicated on a 16 GiB TPU v5e chip.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from diffpo_jax.sharding import MESH_AXES

GIB = 1024**3
HEADROOM = 0.9  # of the device memory a plan may fill (allocator fragmentation, runtime buffers)


def compile_decode(model_cfg, mesh, *, kind: str, rows: int, prompt_len: int, max_new_tokens: int, block: int):
    """{"loop": compiled _advance, "refill": compiled _refill, "start": compiled _start (of `rows` rows)} of
    `kind` ("refine" | "generate") for `rows` slots over `mesh`, on abstract shapes (nothing allocated):
    every program a decode runs, in one batch or with row refill."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from diffpo_jax.decoding import jacobi, sampler
    from diffpo_jax.decoding import slots as slots_lib
    from diffpo_jax.model import abstract_model
    from diffpo_jax.sharding import batch_sharding, param_shardings

    graphdef, state = nnx.split(abstract_model(model_cfg))
    shardings = param_shardings(state, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    if kind == "refine":
        opts = jacobi.JacobiOptions(block, max_new_tokens, stop_tokens=(1,))
        empty = lambda: jacobi._empty(model_cfg, rows, prompt_len, max_new_tokens + block, opts)
    else:
        empty = lambda: sampler._empty(model_cfg, rows, prompt_len, max_new_tokens=max_new_tokens, pad_id=0)
    placed = jax.eval_shape(lambda: empty())
    shard_of = slots_lib.place_shardings(placed, mesh)
    s = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), placed, shard_of)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    rows_of = lambda *shape: jax.ShapeDtypeStruct(
        (rows, *shape), jnp.int32, sharding=batch_sharding(mesh, 1 + len(shape))
    )
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        if kind == "refine":
            loop = jacobi._advance.lower(graphdef, state, s, np.int32(1), np.zeros(rows, bool), opts=opts)
            refill = jacobi._refill.lower(
                graphdef,
                state,
                s,
                np.int32(0),
                i32(prompt_len),
                np.int32(1),
                i32(max_new_tokens + block),
                np.int32(1),
                np.int32(0),
                opts=opts,
            )
            start = jacobi._start.lower(
                graphdef,
                state,
                rows_of(prompt_len),
                rows_of(),
                rows_of(max_new_tokens + block),
                rows_of(),
                rows_of(),
                batch_size=rows,
                opts=opts,
            )
        else:
            key = jax.eval_shape(lambda: jax.random.key(0))
            loop = sampler._advance.lower(graphdef, state, s, np.zeros(rows, bool), 0.7, 1.0, stop_tokens=(1,))
            refill = sampler._refill.lower(
                graphdef, state, s, np.int32(0), i32(prompt_len), np.int32(1), key, 0.7, 1.0, stop_tokens=(1,), pad_id=0
            )
            keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))
            keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=batch_sharding(mesh, 1))
            start = sampler._start.lower(
                graphdef,
                state,
                rows_of(prompt_len),
                rows_of(),
                keys,
                np.float32(0.7),
                np.float32(1.0),
                batch_size=rows,
                max_new_tokens=max_new_tokens,
                stop_tokens=(1,),
                pad_id=0,
            )
    return {"loop": loop.compile(), "refill": refill.compile(), "start": start.compile()}


def peak_bytes(compiled: dict) -> int:
    """The largest per-device peak (argument + output - alias + temp) of the loop, the refill and the start."""

    def one(c):
        m = c.memory_analysis()
        return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes

    return max(one(c) for c in compiled.values())


def tensor_degrees(model_cfg, local_devices: int) -> list[int]:
    """Tensor-parallel degrees to try: divisors of the local device count that divide the KV heads."""
    return [t for t in range(1, local_devices + 1) if local_devices % t == 0 and model_cfg.num_kv_heads % t == 0]


def plan(
    model_cfg,
    *,
    devices: int,
    hosts: int = 1,
    kind: str,
    batch: int,
    prompt_len: int,
    max_new_tokens: int,
    block: int = 32,
    device_memory_gib: float | None = None,
    mesh_shape: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """Per-device memory of decoding `batch` rows (per process) over DEVICES / HOSTS local devices, the
    layout (module doc) and the largest batch that fits `device_memory_gib`. Raises ValueError."""
    import jax

    from diffpo_jax.sharding import make_mesh, resolve_mesh_shape

    local = devices // hosts
    if devices % hosts or local < 1:
        raise ValueError(f"--plan {devices}/{hosts}: DEVICES must be a positive multiple of HOSTS")
    if len(jax.devices()) < local:
        raise ValueError(f"--plan: jax has {len(jax.devices())} devices (the CLI simulates them before jax starts)")
    budget = None if device_memory_gib is None else device_memory_gib * GIB * HEADROOM
    half = model_cfg.dtype == "bfloat16"  # compiled in float32, bytes halved (module doc)
    compiled_cfg = model_cfg.replace(dtype="float32", param_dtype="float32") if half else model_cfg

    def measure(shape, rows):
        mesh = make_mesh(shape, jax.devices()[:local])
        peak = peak_bytes(
            compile_decode(
                compiled_cfg,
                mesh,
                kind=kind,
                rows=rows,
                prompt_len=prompt_len,
                max_new_tokens=max_new_tokens,
                block=block,
            )
        )
        return peak // 2 if half else peak

    if mesh_shape is not None:
        candidates = [resolve_mesh_shape(mesh_shape, local)]
    else:
        candidates = [(local // t, 1, t) for t in tensor_degrees(model_cfg, local)]
    chosen = None
    for shape in candidates:
        shards = shape[0] * shape[1]
        rows = max(shards, batch - batch % shards)
        peak = measure(shape, rows)
        chosen = (shape, rows, peak)
        if budget is None or peak <= budget or mesh_shape is not None:
            break
    shape, rows, peak = chosen
    out = {
        "devices": devices,
        "hosts": hosts,
        "kind": kind,
        "mesh": dict(zip(MESH_AXES, shape)),
        "batch": rows,
        "peak": peak,
        "fits": budget is None or peak <= budget,
        "device_memory_gib": device_memory_gib,
        "default_layout": mesh_shape is None,
    }
    if budget is not None:
        out["max_batch"] = largest_batch(lambda b: measure(shape, b), shape[0] * shape[1], rows, peak, budget)
    return out


def largest_batch(peak_at, shards: int, rows: int, peak: int, budget: float, compiles: int = 6) -> int:
    """The largest multiple of `shards` rows whose peak_at(rows) <= budget, given peak_at(rows) = peak: secant
    steps on the (nearly linear, slightly convex) peak from (rows, 2 rows), then bisection between the
    largest batch seen to fit and the smallest seen not to; at most `compiles` more compiles."""
    fits, over = ({rows: peak} if peak <= budget else {}), ({} if peak <= budget else {rows: peak})
    a, pa = rows, peak
    b = 2 * rows
    for _ in range(compiles):
        b = max(shards, b - b % shards)
        if b in fits or b in over:
            break
        pb = peak_at(b)
        (fits if pb <= budget else over)[b] = pb
        lo, hi = max(fits, default=0), min(over, default=None)
        if hi is not None and hi - lo <= max(shards, lo // 32):
            break
        slope = (pb - pa) / (b - a) if b != a else 0
        guess = int(b + (budget - pb) / slope) if slope > 0 else 2 * b
        if hi is not None and not lo < guess < hi:  # the secant left the bracket: bisect
            guess = (lo + hi) // 2
        a, pa, b = b, pb, guess
    return max(fits, default=0)


def lines(p: dict[str, Any]) -> list[str]:
    """The plan as the CLIs print it."""
    size = lambda n: f"{n / GIB:.2f} GiB"
    mesh = " x ".join(f"{k} {v}" for k, v in p["mesh"].items())
    how = "(smallest tensor-parallel degree that fits)" if p["default_layout"] else "(--mesh)"
    out = [
        f"plan {p['kind']} {p['devices']}/{p['hosts']}: per process {p['devices'] // p['hosts']} devices, "
        f"mesh {mesh} {how}",
        f"  batch {p['batch']}: peak {size(p['peak'])} per device (XLA, AOT: weights, slot state and the largest "
        f"of the decode loop, the refill and the start)",
    ]
    if "max_batch" in p:
        out.append(
            f"  device memory {p['device_memory_gib']} GiB ({HEADROOM:.0%} usable): "
            f"{'fits' if p['fits'] else 'does NOT fit'}; largest batch that fits: {p['max_batch']}"
        )
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """--plan, --device-memory and --prompt-len (refine, generate)."""
    ap.add_argument(
        "--plan",
        metavar="DEVICES[/HOSTS]",
        help="print the AOT-compiled per-device memory of this decode on that many devices (no "
        "weights or input; decoding/plan.py), e.g. --plan 8 --device-memory 80",
    )
    ap.add_argument(
        "--device-memory",
        type=float,
        metavar="GIB",
        help="--plan: memory per device; adds the layout and the largest batch that fit",
    )
    ap.add_argument("--prompt-len", type=int, default=1024, help="--plan: the prompt bucket (tokens)")


def main(args: argparse.Namespace, kind: str) -> int:
    """The CLIs' --plan: print the plan of decoding args.model with the CLI's options; 0, or 2 with a line."""
    from diffpo_jax.config import config_without_weights
    from diffpo_jax.sharding import simulate_devices

    try:
        devices, _, hosts = args.plan.partition("/")
        devices, hosts = int(devices), int(hosts or 1)
        if devices < 1 or hosts < 1 or devices % hosts:
            raise ValueError
    except ValueError:
        print(f"error: --plan {args.plan!r}: expected DEVICES or DEVICES/HOSTS, e.g. 32/8", file=sys.stderr)
        return 2
    simulate_devices(devices // hosts)
    try:
        dtype = args.dtype or "bfloat16"  # the accelerator default (decoding/devices.py)
        cfg = config_without_weights(args.base or args.model).replace(dtype=dtype, param_dtype=dtype)
        p = plan(
            cfg,
            devices=devices,
            hosts=hosts,
            kind=kind,
            batch=args.batch_size * getattr(args, "num_samples", 1),
            prompt_len=args.prompt_len,
            max_new_tokens=args.max_new_tokens,
            block=getattr(args, "block_size", 1),
            device_memory_gib=args.device_memory,
            mesh_shape=args.mesh,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: --plan: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines(p)))
    return 0
