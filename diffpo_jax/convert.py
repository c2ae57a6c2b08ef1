"""python -m diffpo_jax.convert: HF weights <-> Orbax checkpoints, LoRA adapters -> PEFT.

  from-hf MODEL OUT_DIR [--dtype float32|bfloat16]
      any --model source (hub id, HF folder, .gguf, "embedded") -> an Orbax model dir: params/ plus
      config.json and the tokenizer files, which every CLI's --model accepts.
  to-hf CKPT OUT_DIR [--dtype float32|bfloat16|float16] [--max-shard-size 5GB]
      an Orbax model dir, train run dir (latest step) or step dir -> an HF folder transformers loads;
      default dtype: as stored for a model dir, bfloat16 for a train run or step dir; a LoRA run's
      is its merged model (base + adapters).
  to-peft RUN_DIR OUT_DIR [--dtype float32|bfloat16|float16]
      a LoRA train run dir (latest step) or step dir -> a PEFT adapter folder (adapter_config.json,
      adapter_model.safetensors, default float32) that peft.PeftModel.from_pretrained loads on the
      transformers base, and every --model accepts.

OUT_DIR must be empty or absent unless --overwrite; outputs are written beside it and renamed at the
end, so an interrupted run leaves no folder that looks complete. Paths may be URLs (gs://..., see
paths.py). With several devices the params are
sharded over all of them (fsdp). Exit 2 on bad input, with a one-line message naming the path.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
from flax import nnx

from diffpo_jax import distributed
from diffpo_jax.distributed import DistributedError
from diffpo_jax.paths import as_path
from diffpo_jax.sharding import make_mesh
from diffpo_jax.sources import ModelSourceError, load_model
from diffpo_jax.weights.checkpoint import check_out_dir, save_params
from diffpo_jax.weights.export import export_checkpoint, export_peft


def default_mesh() -> jax.sharding.Mesh | None:
    """All devices on the fsdp axis, or None (one device) when there is only one."""
    return make_mesh((1, -1, 1)) if jax.device_count() > 1 else None


def from_hf(
    model: str | None,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> os.PathLike:
    """Load `model` (anything `load_model` accepts) in `dtype` and save it as an Orbax model dir."""
    out_dir = as_path(out_dir)
    check_out_dir(out_dir, overwrite)  # before the (possibly long) load
    loaded = load_model(model, dtype=dtype, mesh=mesh)
    return save_params(
        out_dir,
        loaded.cfg,
        nnx.state(loaded.model),
        loaded.tokenizer,
        overwrite=overwrite,
        generation=loaded.generation,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffpo_jax.convert", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="HF / GGUF / hub weights -> Orbax model dir")
    a.add_argument("model", help='hub id, HF folder, .gguf file, or "embedded" (SmolLM2)')
    a.add_argument("out_dir")
    a.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="stored param dtype")
    b = sub.add_parser("to-hf", help="Orbax model / run / step dir -> HF folder (safetensors)")
    b.add_argument("ckpt")
    b.add_argument("out_dir")
    b.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="exported dtype (default: as stored for a model dir, bfloat16 for a train run or step dir)",
    )
    b.add_argument("--max-shard-size", default="5GB", help="split safetensors files past this size (default 5GB)")
    c = sub.add_parser("to-peft", help="LoRA train run / step dir -> PEFT adapter folder")
    c.add_argument("run")
    c.add_argument("out_dir")
    c.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="stored adapter dtype"
    )
    for p in (a, b, c):
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    distributed.add_arguments(ap)
    args = ap.parse_args(argv)

    try:
        distributed.initialize_from_args(args)
        if args.command == "from-hf":
            out = from_hf(args.model, args.out_dir, dtype=args.dtype, overwrite=args.overwrite, mesh=default_mesh())
        elif args.command == "to-peft":
            out = export_peft(
                args.run,
                args.out_dir,
                dtype=args.dtype,
                overwrite=args.overwrite,
                mesh=default_mesh(),
                say=lambda line: print(line, file=sys.stderr),
            )
        else:
            out = export_checkpoint(
                args.ckpt,
                args.out_dir,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                overwrite=args.overwrite,
                mesh=default_mesh(),
            )
    except (ModelSourceError, ValueError, FileNotFoundError, DistributedError) as e:  # CheckpointError: a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
