"""The one tiny training run the training tests start from (the tiny model on the bundled trajectories,
8 rows a step) and the `train` CLI as a subprocess; each test states only what it changes."""

import json
import os
import sys
from pathlib import Path

from tests.files import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = dict(
    global_batch_size=8,
    prompt_len=48,
    response_len=8,
    num_epochs=1,
    seed=0,
    log_every=1,
    tensorboard=False,
    optimizer={"learning_rate": 3e-3, "warmup_ratio": 0.03},
)


def write_config(path: Path, model, data, **changes) -> Path:
    """TINY_RUN with `changes` (whole sections replaced) for `model` on `data`, written to `path`."""
    path.write_text(json.dumps(TINY_RUN | {"model": str(model), "data": str(data)} | changes))  # JSON is YAML
    return path


def train_command(config: Path, run_dir, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "diffpo_jax.train", "--config", str(config), f"output_dir={run_dir}", *overrides]


def with_compile_cache(env: dict, cache: Path) -> dict:
    """`env` sharing the session's XLA compilation cache (see conftest's xla_cache_dir)."""
    return dict(env, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")
