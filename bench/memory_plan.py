"""Memory plan: per-device bytes and FLOPs of the DiffPO train step for big models on TPU-sized meshes,
from ahead-of-time compilation on abstract shapes (no weights are ever allocated).

  python -m bench.memory_plan [--models gemma-2-2b-it,gemma-2-9b-it,llama-3-8b-instruct]
      [--meshes 1x8x1,1x4x2,1x32x1,1x8x4] [--prompt-len 256] [--response-len 256] [--chunk 128]
      [--results DIR]

The mesh is simulated: XLA_FLAGS=--xla_force_host_platform_device_count=32 is set before jax is imported
(when run as a script that is the first to import jax; imported as a library it changes nothing), and a DATAxFSDPxTENSOR mesh takes the first devices. For
each (preset, mesh): the model config from configs/models (`load_preset`) with bf16 activations, fp32
parameters (the master weights: params, gradients and AdamW moments are fp32, see
diffpo_jax/training/step.py) and remat on; the train state and the batch are `jax.ShapeDtypeStruct`s
carrying their shardings (`state_shardings`, `batch_sharding`); `make_train_step(...).lower(state,
batch).compile()`. One row of the batch per data-parallel shard (global batch = data x fsdp; devices
along `tensor` share their row), each row a P-token prompt and N-token best / worse responses
(teacher and student packed as one row of P + 2N tokens, training/loss.py).

Reported per device: `compiled.memory_analysis()` argument / output / alias / temp bytes, and
peak = argument + output - alias + temp (the donated state is counted once); `cost_analysis()` FLOPs
of the per-device program, and the analytic 8 * params * tokens / devices (forward 2, backward 4,
remat's recomputed forward 2, per parameter and token; attention, ~2% at 512 tokens, excluded).
XLA's HLO cost analysis counts a while-loop body once, whatever its trip count (the layer scan, the
loss's chunk map), so its figure is about one layer's work plus what lies outside the loops: the
analytic column is the step's FLOPs.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "jax" not in sys.modules:  # simulated devices: set before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=32").strip()

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from bench import common  # noqa: E402

GIB = 1024**3
HEADERS = [
    "model",
    "mesh (data x fsdp x tensor)",
    "params",
    "global batch",
    "argument GiB",
    "output GiB",
    "alias GiB",
    "temp GiB",
    "peak GiB / device",
    "TFLOP / device (XLA)",
    "TFLOP / device (8NT)",
    "compile s",
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.memory_plan", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models",
        default="gemma-2-2b-it,gemma-2-9b-it,llama-3-8b-instruct",
        help="presets (configs/models) or YAML paths",
    )
    ap.add_argument("--meshes", default="1x8x1,1x4x2,1x32x1,1x8x4", help="DATAxFSDPxTENSOR, comma separated")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=128, help="loss lm-head chunk (LossConfig.chunk; 0 = all at once)")
    ap.add_argument("--no-remat", dest="remat", action="store_false")
    common.add_results_option(ap)
    args = ap.parse_args(argv)
    args.models = args.models.split(",")
    try:
        args.meshes = [tuple(int(x) for x in m.split("x")) for m in args.meshes.split(",")]
    except ValueError:
        ap.error(f"--meshes {args.meshes!r}: expected e.g. 1x8x1,1x8x4")
    if any(len(m) != 3 for m in args.meshes):
        ap.error("--meshes: each mesh is DATAxFSDPxTENSOR")
    return args


def compile_train_step(
    preset: str, mesh_shape: tuple[int, int, int], prompt_len: int, response_len: int, chunk: int, remat: bool = True
):
    """(compiled train step, abstract params, global rows): `preset`'s train step AOT-compiled on abstract
    shapes over a (data, fsdp, tensor) mesh of the first devices, one row per data-parallel shard
    (diffpo_jax/training/plan.py, what `train --plan` runs)."""
    import jax

    from diffpo_jax.config import load_preset
    from diffpo_jax.sharding import make_mesh
    from diffpo_jax.training.loss import LossConfig
    from diffpo_jax.training.plan import compile_train_step as compile_step
    from diffpo_jax.training.step import OptimizerConfig

    devices = math.prod(mesh_shape)
    if devices > len(jax.devices()):
        raise SystemExit(f"mesh {mesh_shape} needs {devices} devices, jax has {len(jax.devices())}")
    cfg = load_preset(preset)[0].replace(dtype="bfloat16", param_dtype="float32", remat=remat)
    mesh = make_mesh(mesh_shape, jax.devices()[:devices])
    rows = mesh_shape[0] * mesh_shape[1]
    compiled, params = compile_step(
        cfg,
        mesh,
        rows=rows,
        prompt_len=prompt_len,
        response_len=response_len,
        loss_cfg=LossConfig(chunk=chunk),
        optimizer_cfg=OptimizerConfig(),
    )
    return compiled, params, rows


def plan(preset: str, mesh_shape: tuple[int, int, int], args) -> dict:
    """AOT-compile the train step of `preset` on a simulated mesh; its memory and cost analyses."""
    import jax

    p, n = args.prompt_len, args.response_len
    t = time.perf_counter()
    compiled, abstract_params, rows = compile_train_step(preset, mesh_shape, p, n, args.chunk, args.remat)
    compile_s = time.perf_counter() - t
    from diffpo_jax.training.plan import memory

    devices = math.prod(mesh_shape)
    mem = memory(compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
    tokens = rows * (p + 2 * n)  # one packed row [prompt, best, worse] per data-parallel shard
    return {
        "params": params,
        "rows": rows,
        **mem,
        "flops": float(cost.get("flops", float("nan"))),
        "analytic_flops": 8 * params * tokens / devices,
        "compile_s": compile_s,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = common.machine()
    print(machine, flush=True)
    print(common.table(HEADERS, []), flush=True)
    results, rows = {}, []
    for preset in args.models:
        for mesh_shape in args.meshes:
            r = plan(preset, mesh_shape, args)
            results[(preset, mesh_shape)] = r
            row = [
                preset,
                "x".join(map(str, mesh_shape)),
                f"{r['params'] / 1e9:.2f}B",
                r["rows"],
                *(r[k] / GIB for k in ("argument", "output", "alias", "temp", "peak")),
                r["flops"] / 1e12,
                r["analytic_flops"] / 1e12,
                r["compile_s"],
            ]
            rows.append(row)
            print(common.table(HEADERS, [row]).splitlines()[-1], flush=True)
    if str(args.results) != "-":
        head = common.header("Memory plan", "memory_plan", "bench.memory_plan", argv, machine)
        setup = (
            f"- bf16 activations, fp32 params / grads / AdamW moments, remat {'on' if args.remat else 'off'}, "
            f"loss lm-head chunk {args.chunk}; per row P = {args.prompt_len} prompt + N = {args.response_len} "
            f"response tokens (best and worse packed after one prompt: P + 2N per row); one row per data-parallel shard\n"
        )
        common.write_section(args.results, "memory_plan", head + setup + "\n" + common.table(HEADERS, rows) + "\n")
    return results


if __name__ == "__main__":
    main()
