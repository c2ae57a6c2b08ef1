"""python -m diffpo_jax.train --config configs/train/PRESET.yaml [--model SPEC] [key=value ...]

Trains a DiffPO model (L = L_AR + w * L_Con, training/loss.py) on a trajectory dataset and writes a
train run dir (`output_dir`): checkpoints, metrics.jsonl, TensorBoard events, plus config.json and the
tokenizer, so `--model RUN_DIR` works in every CLI and `convert to-hf RUN_DIR OUT` exports it.
Rerunning with the same output_dir resumes from its latest checkpoint (with the run's config: other
values of keys that change what is trained stop it, unless --allow-config-change KEY,...); SIGTERM
saves and exits 0.

Overrides: `key=value` for top-level keys (`max_steps=20`, `mesh=[2,2,2]`, `output_dir=runs/x`) and
`loss.KEY` / `optimizer.KEY` / `eval.KEY` / `lora.KEY` (`optimizer.learning_rate=1e-5`, `lora.rank=16`:
LoRA adapters on a frozen base, ARCHITECTURE.md "LoRA"); values are YAML. --model SPEC is the
same as model=SPEC: anything --model accepts elsewhere, or preset:NAME (a random model, see
training/trainer.py). Exit 2 on bad config, model or data, with a one-line message.
`--plan DEVICES[/HOSTS]` only checks the config against that topology and prints the AOT-compiled
per-device memory (training/plan.py).
"""

from __future__ import annotations

import argparse
import sys

from diffpo_jax import distributed
from diffpo_jax.data.trajectories import TrajectoryDataError
from diffpo_jax.distributed import DistributedError
from diffpo_jax.sources import ModelSourceError
from diffpo_jax.training.config import TrainConfigError, load_config
from diffpo_jax.training.trainer import train
from diffpo_jax.weights.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffpo_jax.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="a YAML preset, e.g. configs/train/tiny.yaml (default: built-in defaults)")
    ap.add_argument("--model", help="the model to start from (overrides the config's model)")
    ap.add_argument(
        "--allow-config-change",
        default="",
        metavar="KEY,...",
        help="on resume, accept new values of these keys (dotted, or a section name)",
    )
    ap.add_argument(
        "--plan",
        metavar="DEVICES[/HOSTS]",
        help="check the config against this topology and print its AOT-compiled per-device memory "
        "(no weights or data; training/plan.py), e.g. --plan 32/8",
    )
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    distributed.add_arguments(ap)
    args = ap.parse_args(argv)
    overrides = list(args.overrides) + ([f"model={args.model}"] if args.model else [])
    if args.plan:
        return plan_main(args.config, overrides, args.plan)
    try:
        distributed.initialize_from_args(args)
        cfg = load_config(args.config, overrides)
        allow = tuple(k for k in args.allow_config_change.split(",") if k)
        result = train(cfg, log=lambda line: print(line, flush=True), allow_config_change=allow)
    except (TrainConfigError, ModelSourceError, TrajectoryDataError, CheckpointError, DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if result.step in (result.total_steps, cfg.stop_after) or result.stopped else 1


def plan_main(config: str | None, overrides: list[str], topology: str) -> int:
    from diffpo_jax.sharding import simulate_devices
    from diffpo_jax.training import plan

    try:
        simulate_devices(plan.parse_topology(topology)[0])
        # a plan reads no data and writes nothing: placeholders for the two paths a run needs (overrides win)
        cfg = load_config(config, ["data=(plan)", "output_dir=(plan)", *overrides])
        for line in plan.lines(plan.plan(cfg, topology)):
            print(line, flush=True)
    except TrainConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
