"""The train config: its schema (TrainConfig and its sections), YAML presets with key=value overrides,
the checks that need no devices (`validate`), fitting it to a mesh (`fit_to_mesh`: `--plan` uses it too)
and the check a resumed run's config must pass (`check_resume_config`, training/trainer.py's Resume)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import yaml
from etils import epath

from diffpo_jax.attention import IMPLEMENTATIONS
from diffpo_jax.config import PRESET, LoraConfig
from diffpo_jax.lora import TARGETS
from diffpo_jax.sharding import make_mesh
from diffpo_jax.training.evaluation import EvalConfig
from diffpo_jax.training.loss import CON_GRADIENTS, CON_NORMS, CON_POSITIONS, TEACHERS, LossConfig
from diffpo_jax.training.step import OptimizerConfig


class TrainConfigError(ValueError):
    """A train config that cannot be used; str() is the one-line message naming the file and key."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training job. YAML presets: configs/train/*.yaml; sections `loss` and `optimizer` nest."""

    model: str = "embedded"  # any --model source, or preset:NAME (random init, see module doc)
    data: str | None = None  # a built trajectory dataset dir, or a source file built into OUTPUT/data
    output_dir: str | None = None  # the run dir; restarting with the same one resumes
    mesh: tuple[int, int, int] = (1, -1, 1)  # (data, fsdp, tensor) sizes; one -1 takes the rest
    dtype: str = "float32"  # activations / matmuls
    param_dtype: str = "float32"  # stored weights, gradients, optimizer state (fp32 = master weights)
    remat: bool = False  # recompute each layer in the backward pass
    attention: str = "auto"  # attention implementation (diffpo_jax/attention.py): auto | einsum | xla | cudnn | splash
    seed: int = 0  # data order, y(t) draws, preset: init
    global_batch_size: int = 8  # rows per optimizer update, all processes and micro-batches together
    grad_accum: int = 1  # micro-batches per update; 0 = auto (one row per data x fsdp device per micro-batch)
    prompt_len: int = 768  # P: prompts keep their last P tokens
    response_len: int = 256  # N (paper: 256)
    num_epochs: int = 1
    max_steps: int | None = None  # stop (and end the cosine schedule) earlier than the epochs would
    stop_after: int | None = None  # end this invocation after this step, checkpointed, schedule unchanged
    # (for time-limited jobs: rerun the same command to go on)
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    eval: EvalConfig = EvalConfig()  # held-out evaluation (training/evaluation.py); off by default
    lora: LoraConfig = LoraConfig()  # rank > 0: train adapters only, the base frozen (module doc, lora.py)
    save_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    log_every: int = 10  # steps between progress lines (metrics.jsonl gets every step)
    metrics_flush_s: float = 30.0  # a bucket's metrics.jsonl: at most one write per this many seconds (MetricsLog)
    tensorboard: bool = True
    # DEVICES[/HOSTS] [key=value ...] this config is meant for: documentation that `--plan` can check
    topologies: tuple[str, ...] = ()


_SECTIONS = {"loss": LossConfig, "optimizer": OptimizerConfig, "eval": EvalConfig, "lora": LoraConfig}
TRAIN_CONFIG = "train_config.json"
# Keys a resumed run may change freely: where it runs (mesh, micro-batching, remat, attention: the same
# updates up to rounding), when it stops, how it logs, saves and evaluates; not what it trains on
# (eval.holdout_prompts sets the training split, so it is not among them). output_dir is the run dir.
RESUMABLE_KEYS = (
    "output_dir",
    "mesh",
    "grad_accum",
    "remat",
    "attention",
    "stop_after",
    "log_every",
    "save_every",
    "keep_checkpoints",
    "async_checkpoints",
    "tensorboard",
    "metrics_flush_s",
    "topologies",
    "eval.every",
    "eval.max_rows",
    "eval.batch_size",
    "eval.block_size",
)


def _build(cls, values: dict[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise TrainConfigError(f"{where}: unknown key {key!r} (known: {', '.join(fields)})")
    kwargs = {}
    for key, value in values.items():
        if key in _SECTIONS and cls is TrainConfig:
            if not isinstance(value, dict):
                raise TrainConfigError(f"{where}: {key!r} must be a mapping")
            value = _build(_SECTIONS[key], value, f"{where}: {key}")
        elif key == "mesh":
            if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) for v in value)):
                raise TrainConfigError(f"{where}: mesh must be 3 integers [data, fsdp, tensor], got {value!r}")
            value = tuple(value)
        elif key in ("topologies", "target_modules"):
            if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
                raise TrainConfigError(f"{where}: {key} must be a list of strings, got {value!r}")
            value = tuple(value)
        else:
            default = fields[key].default
            if isinstance(default, bool) and not isinstance(value, bool):
                raise TrainConfigError(f"{where}: {key} must be true or false, got {value!r}")
            if isinstance(default, float) and not isinstance(value, bool) and isinstance(value, (int, str)):
                try:
                    value = float(value)  # YAML reads 1e-4 (no dot) as a string
                except ValueError:
                    raise TrainConfigError(f"{where}: {key} must be a number, got {value!r}") from None
            if value is not None and default is not None and not isinstance(value, type(default)):
                raise TrainConfigError(f"{where}: {key} must be a {type(default).__name__}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """A YAML preset (or the defaults, path None) with `key=value` overrides (`section.key=value` for
    loss / optimizer; values parsed as YAML)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise TrainConfigError(f"{path}: no such train config") from None
        except yaml.YAMLError as e:
            raise TrainConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise TrainConfigError(f"{path}: expected a mapping of config keys")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise TrainConfigError(f"override {item!r}: expected key=value")
        *section, name = key.split(".")
        target = values
        for part in section:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise TrainConfigError(f"override {item!r}: {part!r} is not a section")
        target[name] = yaml.safe_load(text)
    return validate(_build(TrainConfig, values, str(path or "config")))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks that need no devices or files."""
    for key in ("data", "output_dir"):
        if not getattr(cfg, key):
            raise TrainConfigError(f"config: {key} is required (set it in the YAML or pass {key}=...)")
    for key in (
        "global_batch_size",
        "prompt_len",
        "response_len",
        "num_epochs",
        "save_every",
        "keep_checkpoints",
        "log_every",
    ):
        if getattr(cfg, key) < 1:
            raise TrainConfigError(f"config: {key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.metrics_flush_s < 0:
        raise TrainConfigError(f"config: metrics_flush_s must be >= 0, got {cfg.metrics_flush_s}")
    if cfg.grad_accum < 0:
        raise TrainConfigError(f"config: grad_accum must be >= 1, or 0 (auto), got {cfg.grad_accum}")
    if cfg.grad_accum and cfg.global_batch_size % cfg.grad_accum:
        raise TrainConfigError(
            f"config: global_batch_size {cfg.global_batch_size} is not a multiple of grad_accum {cfg.grad_accum}"
        )
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise TrainConfigError(f"config: max_steps must be >= 1, got {cfg.max_steps}")
    if cfg.attention not in IMPLEMENTATIONS:
        raise TrainConfigError(f"config: attention must be one of {', '.join(IMPLEMENTATIONS)}, got {cfg.attention!r}")
    if cfg.loss.con_positions not in CON_POSITIONS:
        raise TrainConfigError(
            f"config: loss.con_positions must be one of {', '.join(CON_POSITIONS)}, got {cfg.loss.con_positions!r}"
        )
    if cfg.loss.con_gradient not in CON_GRADIENTS:
        raise TrainConfigError(
            f"config: loss.con_gradient must be one of {', '.join(CON_GRADIENTS)}, got {cfg.loss.con_gradient!r}"
        )
    for key in ("holdout_prompts", "every"):
        if getattr(cfg.eval, key) < 0:
            raise TrainConfigError(f"config: eval.{key} must be >= 0, got {getattr(cfg.eval, key)}")
    for key in ("max_rows", "batch_size", "block_size"):
        if getattr(cfg.eval, key) < 1:
            raise TrainConfigError(f"config: eval.{key} must be >= 1, got {getattr(cfg.eval, key)}")
    if cfg.loss.con_norm not in CON_NORMS:
        raise TrainConfigError(
            f"config: loss.con_norm must be one of {', '.join(CON_NORMS)}, got {cfg.loss.con_norm!r}"
        )
    if cfg.loss.teacher not in TEACHERS:
        raise TrainConfigError(f"config: loss.teacher must be one of {', '.join(TEACHERS)}, got {cfg.loss.teacher!r}")
    if cfg.loss.teacher == "frozen" and not cfg.lora.rank:
        raise TrainConfigError("config: loss.teacher=frozen needs lora.rank > 0 (the frozen base is the teacher)")
    if cfg.loss.con_warmup_steps < 0:
        raise TrainConfigError(f"config: loss.con_warmup_steps must be >= 0, got {cfg.loss.con_warmup_steps}")
    if cfg.loss.con_window < 1:
        raise TrainConfigError(f"config: loss.con_window must be >= 1, got {cfg.loss.con_window}")
    if cfg.loss.chunk < 0:
        raise TrainConfigError(f"config: loss.chunk must be >= 0, got {cfg.loss.chunk}")
    return validate_lora(cfg)


def validate_lora(cfg: TrainConfig) -> TrainConfig:
    lora = cfg.lora
    if lora.rank < 0:
        raise TrainConfigError(f"config: lora.rank must be >= 0 (0: no LoRA), got {lora.rank}")
    if not lora.rank:
        return cfg
    if lora.alpha <= 0:
        raise TrainConfigError(f"config: lora.alpha must be > 0, got {lora.alpha}")
    if lora.dropout:
        raise TrainConfigError(f"config: lora.dropout must be 0 (flax's nnx.LoRA has no dropout), got {lora.dropout}")
    if not lora.target_modules or set(lora.target_modules) - set(TARGETS):
        raise TrainConfigError(
            f"config: lora.target_modules must be some of {', '.join(TARGETS)}, got {list(lora.target_modules)}"
        )
    if cfg.model.startswith(PRESET):
        raise TrainConfigError(
            f"config: lora needs a trained base, not {cfg.model} (a random init): save it first "
            "(a run or `convert from-hf`) and give its dir as model"
        )
    return cfg


def fit_to_mesh(cfg: TrainConfig, shape: tuple[int, int, int], devices_per_host: int) -> TrainConfig:
    """`cfg` with grad_accum resolved (0 = auto: one row per data-parallel device per micro-batch), after
    checking that its batch splits over a (data, fsdp, tensor) mesh of this shape and that a tensor group
    fits within one host; TrainConfigError (one line) otherwise. No devices needed (`--plan` uses it)."""
    data, fsdp, tensor = shape
    if devices_per_host % tensor:
        raise TrainConfigError(
            f"config: mesh {list(shape)}: tensor = {tensor} does not fit within one host's {devices_per_host} devices"
        )
    shards = data * fsdp
    grad_accum = cfg.grad_accum
    if not grad_accum:
        if cfg.global_batch_size % shards:
            raise TrainConfigError(
                f"config: grad_accum auto: global_batch_size {cfg.global_batch_size} does not "
                f"split over data x fsdp = {shards} devices"
            )
        grad_accum = cfg.global_batch_size // shards
    rows = cfg.global_batch_size // grad_accum
    if cfg.global_batch_size % grad_accum or rows % shards:
        raise TrainConfigError(
            f"config: global_batch_size / grad_accum = {cfg.global_batch_size} / {grad_accum} rows do not split over "
            f"data x fsdp = {shards} devices"
        )
    return dataclasses.replace(cfg, grad_accum=grad_accum)


def check_mesh(cfg: TrainConfig):
    """(the mesh, cfg fitted to it)."""
    try:
        mesh = make_mesh(cfg.mesh)
    except ValueError as e:
        raise TrainConfigError(f"config: mesh: {e}") from None
    return mesh, fit_to_mesh(cfg, tuple(mesh.devices.shape), jax.local_device_count())


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every key whose value differs, sorted by key."""
    a, b = _flat(old), _flat(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def check_resume_config(cfg: TrainConfig, run_dir: epath.Path, allow: tuple[str, ...] = ()) -> None:
    """Stop a resume whose config changes keys other than RESUMABLE_KEYS and `allow` (module doc)."""
    path = run_dir / TRAIN_CONFIG
    if not path.is_file():
        return
    free = set(RESUMABLE_KEYS) | set(allow)
    as_json = lambda c: json.loads(json.dumps(dataclasses.asdict(c)))
    # keys added since the run started (e.g. the lora section) had their defaults then
    old = _flat(as_json(TrainConfig())) | _flat(json.loads(path.read_text()))
    changes = config_changes(old, as_json(cfg))
    blocked = [c for c in changes if c[0] not in free and c[0].split(".")[0] not in free]
    if blocked:
        listed = "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in blocked)
        raise TrainConfigError(
            f"{path}: resuming with a changed config ({listed}); pass --allow-config-change "
            f"{','.join(k for k, _, _ in blocked)} to accept"
        )
