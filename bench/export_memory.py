"""Export memory: what `convert to-hf` holds on each device and on the host while it writes a model
sharded over a mesh, against the largest tensor and the whole model.

    python -m bench.export_memory [--model SPEC] [--mesh 1,8,1] [--max-shard-size 64MB] [--results DIR]

The model (default: the embedded SmolLM2, fp32) is loaded onto `--mesh` (8 simulated CPU devices unless
XLA_FLAGS says otherwise) and written with `weights.export.export_hf` twice: as the export does it in one
process (each tensor's shards copied to the host and assembled there), and through the replicated gather
that a multi-process export uses (each tensor, one layer at a time, replicated onto every device). Per
device: the peak bytes of live arrays beyond the device's own parameter shards, sampled after every
tensor (or layer) is gathered and brought over; host: tracemalloc's peak during the export (numpy buffers; safetensors' own
write buffer is not traced). Both files are compared byte for byte with an export of the same weights
from one device. Writes bench/results/export_memory.md.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import collections
import tempfile
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

from bench import common

MIB = 2**20


def device_bytes() -> dict:
    """Bytes of live device buffers per device (each buffer once: a shard's single-device view shares it)."""
    import jax

    buffers = {}
    for a in jax.live_arrays():
        for shard in a.addressable_shards:
            buffers[(shard.device, shard.data.unsafe_buffer_pointer())] = shard.data.nbytes
    used = collections.Counter()
    for (device, _), nbytes in buffers.items():
        used[device] += nbytes
    return used


def measure(export, cfg, params, tokenizer, out: Path, max_shard_size: str) -> tuple[float, float]:
    """(peak extra MiB on the worst device, host peak MiB) of one export of `params` into `out`."""
    from diffpo_jax.weights import export as export_module

    base = device_bytes()
    peak = collections.Counter()
    host_tensor, gather = export_module.host_tensor, export_module._gather_fn

    def note():
        for device, used in device_bytes().items():
            peak[device] = max(peak[device], used - base.get(device, 0))

    def sampling_gather(sharding, stacked):  # a gather's output is sampled while it is alive
        fn = gather(sharding, stacked)

        def call(*a):
            y = fn(*a)
            note()
            return y

        return call

    def sampled(x, layer):
        result = host_tensor(x, layer)
        note()
        return result

    export_module.host_tensor, export_module._gather_fn = sampled, sampling_gather
    tracemalloc.start()
    try:
        export(out, cfg, params, tokenizer, max_shard_size=max_shard_size)
        host = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        export_module.host_tensor, export_module._gather_fn = host_tensor, gather
    return max(peak.values(), default=0) / MIB, host / MIB


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.export_memory", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=None, help="anything diffpo_jax.sources.load_model accepts (default: embedded SmolLM2)"
    )
    ap.add_argument("--mesh", default="1,8,1")
    ap.add_argument("--max-shard-size", default="64MB")
    common.add_results_option(ap)
    args = ap.parse_args(argv)
    import jax
    from flax import nnx

    from diffpo_jax.sharding import make_mesh
    from diffpo_jax.sources import load_model
    from diffpo_jax.weights import export as export_module

    mesh = make_mesh(tuple(int(x) for x in args.mesh.split(",")))
    sharded = load_model(args.model, mesh=mesh)
    single = load_model(args.model)
    params = nnx.state(sharded.model)
    leaves = jax.tree.leaves(params)
    per_layer = [x.nbytes // x.shape[0] if x.ndim == 3 else x.nbytes for x in leaves]  # stacked: one layer
    largest, total = max(per_layer) / MIB, sum(x.nbytes for x in leaves) / MIB
    work = Path(tempfile.mkdtemp(prefix="export_memory-"))
    export_module.export_hf(
        work / "one-device", single.cfg, nnx.state(single.model), single.tokenizer, max_shard_size=args.max_shard_size
    )
    reference = {p.name: p.read_bytes() for p in (work / "one-device").iterdir()}
    rows = []
    for name, host_tensor in (
        ("shards to the host (one process)", export_module.host_tensor),
        ("replicated gather (multi-process path)", export_module.replicated_host_tensor),
    ):
        original = export_module.host_tensor
        export_module.host_tensor = host_tensor
        try:
            device_mib, host_mib = measure(
                export_module.export_hf,
                sharded.cfg,
                params,
                sharded.tokenizer,
                work / name.split()[0],
                args.max_shard_size,
            )
        finally:
            export_module.host_tensor = original
        files = {p.name: p.read_bytes() for p in (work / name.split()[0]).iterdir()}
        rows.append([name, device_mib, device_mib / largest, host_mib, host_mib / largest, files == reference])
        print(rows[-1], flush=True)
    body = "\n".join(
        [
            common.header("Export memory", "export_memory", "bench.export_memory", argv, common.machine()),
            f"{args.model or 'SmolLM2-135M-Instruct (embedded)'}, fp32, mesh {dict(mesh.shape)} ({mesh.size} devices), "
            f"model {total:.0f} MiB, largest tensor (one layer of a stacked one) {largest:.0f} MiB, shard files "
            f"{args.max_shard_size}.\n",
            common.table(
                [
                    "gather",
                    "device peak beyond its shards (MiB)",
                    "x largest tensor",
                    "host peak (MiB)",
                    "x largest tensor",
                    "bytes = 1-device export",
                ],
                rows,
            ),
        ]
    )
    common.report(args.results, "export_memory", body)
    if not all(r[-1] for r in rows):
        raise SystemExit("export_memory: an export differs from the one-device export")
    return {r[0]: r[1:] for r in rows}


if __name__ == "__main__":
    main()
