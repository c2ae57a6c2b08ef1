"""The training job: config, model init, the loop, checkpoints, resume, SIGTERM, metrics.

    result = train(load_config("configs/train/tiny.yaml", ["optimizer.learning_rate=1e-4"]))

Run dir (`output_dir`), a train run dir of weights/checkpoint.py, so `--model RUN_DIR` loads it anywhere:
  config.json, tokenizer files     the model (written once, by process 0)
  train_config.json                the TrainConfig of the latest start (see Resume)
  checkpoints/<step>/              params, opt_state, meta {"step", "data": loader state}: every
                                   `save_every` steps, on SIGTERM and at the end; the last
                                   `keep_checkpoints` kept; written asynchronously
  metrics.jsonl                    one line per step (process 0); held-out evaluation (`eval` section)
                                   adds its eval_* metrics to the lines of the steps it ran after
                                   (step 0: before the first update); in a bucket, the newest lines
                                   are in metrics.jsonl.part-* until the run ends (MetricsLog)
  eval_ids.json                    the held-out record ids (when eval.holdout_prompts > 0)
  tensorboard/                     event files with the same scalars (process 0)
  data/                            the built dataset, when `data` is a source file rather than a built dir
  adapter_config.json              LoRA runs (`lora.rank` > 0): PEFT's config naming the frozen base
                                   (`model`); checkpoints then hold the adapters alone (lora.py)

Resume: a run started with an `output_dir` that holds a checkpoint continues from its latest step:
params, optimizer state, step and data-iterator position are restored (onto the current mesh), the
model comes from the run dir, and metrics of steps past that checkpoint are dropped before the new
ones are written, so the logs read like one uninterrupted run. The config must be the run's
(train_config.json): keys that do not change what is trained (RESUMABLE_KEYS) may differ, any other
difference stops with a one-line TrainConfigError naming the keys unless they are in
`allow_config_change` (`--allow-config-change KEY,...`; a section name allows all its keys); the
accepted config is then written as the new train_config.json. SIGTERM (e.g. TPU preemption) stops
after the step in flight, skips an evaluation due after it (the grace period is for the checkpoint),
saves a checkpoint, waits for it and returns `stopped=True`; with several processes, a SIGTERM to any
one of them stops all of them after the same step (`any_process`). Several processes need an
`output_dir` they all see (a bucket URL or a shared filesystem: process 0 alone writes the model files and
data/, each host its checkpoint shards): checked first, in seconds (distributed.check_shared_folder).

Models (`model`): anything `sources.load_model` accepts, or `preset:NAME`: the architecture of
configs/models/NAME.yaml, randomly initialised (`seed`), paired with the embedded SmolLM2's tokenizer
and sized to it (its 49152-token vocabulary, its bos / eos / pad ids), so tiny smoke-test models
tokenize real text with a chat template and their run dirs load like any other model.
(`preset:tiny-llama`: 64 hidden units, 2 layers, 6.4M parameters, nearly all embeddings.)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from diffpo_jax.attention import IMPLEMENTATIONS
from diffpo_jax.config import PRESET, LoraConfig, load_preset
from diffpo_jax.data.loader import make_loader
from diffpo_jax.data.trajectories import MANIFEST, build
from diffpo_jax.distributed import check_shared_folder, is_main_process
from diffpo_jax.lora import TARGETS, base_reference, init_adapters, split_trainable, write_adapter_config
from diffpo_jax.model import Transformer, abstract_model
from diffpo_jax.paths import as_path, is_url, local_dir, sync
from diffpo_jax.sharding import indivisible_dims, make_mesh, param_shardings
from diffpo_jax.sources import LoadedModel, ModelSourceError, load_model, stop_token_ids
from diffpo_jax.training.evaluation import EVAL_IDS, EvalConfig, holdout_split, make_evaluator, read_records
from diffpo_jax.training.loss import CON_GRADIENTS, CON_POSITIONS, LossConfig
from diffpo_jax.training.step import (
    OptimizerConfig,
    TrainState,
    abstract_state,
    global_batch,
    init_state,
    make_optimizer,
    make_train_step,
    model_params,
    state_shardings,
)
from diffpo_jax.weights.checkpoint import (
    TrainCheckpoints,
    read_generation_config,
    read_orbax_config,
    tokenizer_from_dir,
    write_model_files,
)


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
SHARED_CHECK = ".shared-check"  # the token file of check_shared_folder, there for a second at start-up
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


# ---------------------------------------------------------------- model and data


@functools.lru_cache(maxsize=1)
def embedded_tokenizer():
    """The embedded SmolLM2's tokenizer (read from its GGUF file: seconds, so once per process)."""
    from diffpo_jax.weights.gguf import embedded_gguf_path, load_gguf_tokenizer

    return load_gguf_tokenizer(embedded_gguf_path())


def random_model(preset: str, tokenizer: Any, *, seed: int, dtype: str, param_dtype: str, mesh) -> LoadedModel:
    """configs/models/PRESET.yaml sized to `tokenizer` (vocab size = len(tokenizer), its bos / eos / pad
    ids), randomly initialised straight onto its shardings (the same values on any mesh)."""
    try:
        cfg, _ = load_preset(preset)
    except (FileNotFoundError, ValueError) as e:
        raise ModelSourceError(str(e)) from None
    cfg = cfg.replace(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    abstract = abstract_model(cfg)
    shardings = nnx.to_pure_dict(param_shardings(nnx.state(abstract), mesh))
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)))), out_shardings=shardings)
    model = nnx.merge(nnx.graphdef(abstract), init())
    return LoadedModel(cfg, model, tokenizer, f"{PRESET}{preset} (random init, seed {seed})", {}, None)


def init_model(spec: str, *, seed: int, dtype: str, param_dtype: str, mesh) -> LoadedModel:
    """`preset:NAME` (random init) or anything `sources.load_model` accepts."""
    if spec.startswith(PRESET):
        return random_model(
            spec[len(PRESET) :], embedded_tokenizer(), seed=seed, dtype=dtype, param_dtype=param_dtype, mesh=mesh
        )
    return load_model(spec, dtype=dtype, param_dtype=param_dtype, mesh=mesh)


def prepare_data(data: str, run_dir: epath.Path) -> epath.Path:
    """The local dir to read the dataset from: a built dataset dir, or a source (file or hub id) built
    into RUN_DIR/data once; either may be a URL, read from this host's copy (paths.local_dir)."""
    path = as_path(data)
    if not (path / MANIFEST).is_file():
        path = run_dir / "data"
        if not (path / MANIFEST).is_file():
            if is_main_process():
                build([data], path)
            sync("diffpo_jax.train:data")
    return local_dir(path)


# ---------------------------------------------------------------- metrics


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a killed process counts as past any step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


PART_LINES = 1000  # lines per part object of a bucket's metrics.jsonl (MetricsLog)


class MetricsLog:
    """metrics.jsonl (one line per step) and TensorBoard scalars, on process 0 only. Opened at `start_step`:
    lines of later steps (left by an interrupted run) are dropped first, and TensorBoard purges them.

    A local file is appended to at each line. An object in a store (a URL run dir) cannot be appended to,
    and rewriting it whole at each line uploads O(steps^2) bytes, at more than the one write per second
    GCS allows an object. There lines are kept and written at most every `flush_every_s` seconds, at
    `flush()` (the trainer's checkpoints and SIGTERM stop) and at `close()`, into part objects
    `metrics.jsonl.part-<first step>` of about PART_LINES lines (a write replaces only the newest part):
    O(steps) bytes in all. close() writes the whole metrics.jsonl once and removes the parts; a run
    killed before that leaves them, and the next opening merges them in (a part's line replaces a line
    of the same step: a close cut short between the two leaves both)."""

    def __init__(
        self, run_dir: epath.Path, start_step: int, tensorboard: bool, flush_every_s: float = 30.0, clock=time.monotonic
    ):
        self.enabled = is_main_process()
        self.path = run_dir / "metrics.jsonl"
        self.flush_every_s, self._clock = flush_every_s, clock
        self._file = self._tb = self._lines = None
        self._part, self._parts, self._dirty = [], [], False  # the newest part's lines, the parts written
        if not self.enabled:
            return
        if is_url(self.path):
            stale = sorted(self.path.parent.glob(f"{self.path.name}.part-*"), key=lambda p: p.name)
            by_step = {}
            for source in ([self.path] if self.path.exists() else []) + stale:
                for line in source.read_text().splitlines():
                    by_step[_step_of(line)] = line
            self._lines = [line for step, line in by_step.items() if step <= start_step]
            self.path.write_text("".join(line + "\n" for line in self._lines))
            for part in stale:
                part.unlink()
            self._last = clock()
        else:
            kept = []
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= start_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
            self._file = self.path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            if not self._part:
                self._parts.append(self.path.with_name(f"{self.path.name}.part-{record['step']:09d}"))
            self._lines.append(line)
            self._part.append(line)
            self._dirty = True
            if self._clock() - self._last >= self.flush_every_s:
                self.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    self._tb.add_scalar(tag, value, record["step"])

    def flush(self) -> None:
        """Write the lines not written yet (a bucket's; a local file has them all already)."""
        if self._dirty:
            self._parts[-1].write_text("".join(line + "\n" for line in self._part))
            self._dirty = False
            if len(self._part) >= PART_LINES:
                self._part = []
            self._last = self._clock()

    def close(self) -> None:
        """Everything written; in a bucket, metrics.jsonl whole and no parts. Safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._parts:
            self.path.write_text("".join(line + "\n" for line in self._lines))
            for part in self._parts:
                if part.exists():
                    part.unlink()
            self._part, self._parts, self._dirty = [], [], False
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def progress_line(m: dict[str, Any], total: int) -> str:
    return (
        f"step {m['step']}/{total}  loss {m['loss']:.4f}  ar {m['ar']:.4f}  con {m['con']:.4e}  "
        f"gnorm {m['grad_norm']:.3f}  lr {m['lr']:.3e}  {m['tokens_per_s']:,.0f} tok/s  {m['step_time_s']:.3f} s/step"
    )


class _SigtermFlag:
    """Within the block, SIGTERM sets `.raised` instead of killing the process (main thread only)."""

    def __enter__(self):
        self.raised = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is set on any of them. Every process calls it once per step, so
    after a SIGTERM to one host (a preempted TPU VM) all of them stop after the same step and save it
    together (Orbax's save is collective); a tiny all-gather per step, nothing on one process."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


# ---------------------------------------------------------------- the job


@dataclasses.dataclass
class TrainResult:
    run_dir: epath.Path
    start_step: int  # the step resumed from (0 for a fresh run)
    step: int  # the last step done
    total_steps: int
    history: list[dict[str, Any]]  # the metrics of the steps this call ran
    stopped: bool  # True when SIGTERM ended it early (a checkpoint of `step` was saved)


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


def _check_mesh(cfg: TrainConfig):
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
    as_json = lambda c: json.loads(json.dumps(dataclasses.asdict(c)))  # noqa: E731
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


def _start_model(cfg: TrainConfig, run_dir: epath.Path, start: int, mesh, say):
    """(model config, tokenizer, stop tokens, initial params or None when resuming): from the run dir or
    `cfg.model` (whose model files, generation_config.json included, the run dir gets at its first start).
    A LoRA run loads its frozen base from `cfg.model` at every start (its checkpoints hold the adapters)."""
    if start:
        say(f"resuming {run_dir} from step {start}")
        if not cfg.lora.rank:
            model_cfg, tokenizer = read_orbax_config(run_dir), tokenizer_from_dir(run_dir)
            return model_cfg, tokenizer, stop_token_ids(model_cfg, tokenizer, read_generation_config(run_dir)), None
    loaded = init_model(cfg.model, seed=cfg.seed, dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh=mesh)
    if not start:
        write_model_files(run_dir, loaded.cfg, loaded.tokenizer, loaded.generation)
        if cfg.lora.rank:
            write_adapter_config(run_dir, cfg.lora, base_reference(cfg.model))
        say(f"model {loaded.source} -> {run_dir}")
    return loaded.cfg, loaded.tokenizer, loaded.stop_tokens, nnx.to_pure_dict(nnx.state(loaded.model))


def _split(cfg: TrainConfig, data_dir: epath.Path, run_dir: epath.Path) -> tuple[list[int] | None, list[dict] | None]:
    """(training record indices, held-out records); (None, None) without evaluation."""
    if not cfg.eval.holdout_prompts:
        return None, None
    records = read_records(data_dir)
    try:
        train_idx, held_idx = holdout_split(records, cfg.eval.holdout_prompts)
    except ValueError as e:
        raise TrainConfigError(f"config: {e}") from None
    held = [records[i] for i in held_idx]
    if is_main_process():
        (run_dir / EVAL_IDS).write_text(json.dumps([r["id"] for r in held], indent=1) + "\n")
    return train_idx, held


def train(cfg: TrainConfig, log=print, allow_config_change: tuple[str, ...] = ()) -> TrainResult:
    """Run (or resume) the job of `cfg`; see module doc. `log` gets the progress lines (process 0);
    `allow_config_change`: keys (or sections) a resume may change beyond RESUMABLE_KEYS."""
    say = log if is_main_process() else (lambda _: None)
    cfg = validate(cfg)
    run_dir = as_path(cfg.output_dir)  # a URL stays one (paths.py)
    check_shared_folder(run_dir / SHARED_CHECK, f"output_dir {run_dir}")  # before anything is written
    mesh, cfg = _check_mesh(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = TrainCheckpoints(
        run_dir, every=cfg.save_every, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints
    )
    start = checkpoints.latest_step() or 0
    if start:
        check_resume_config(cfg, run_dir, allow_config_change)
    model_cfg, tokenizer, stop_tokens, params = _start_model(cfg, run_dir, start, mesh, say)
    if is_main_process():  # the config of this start: what the next resume is checked against
        (run_dir / TRAIN_CONFIG).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    model_cfg = model_cfg.replace(
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        remat=cfg.remat,
        attention=cfg.attention,
        lora=cfg.lora if cfg.lora.rank else None,
    )
    abstract = abstract_model(model_cfg)
    trained, frozen = split_trainable(nnx.state(abstract), model_cfg)  # LoRA: (adapters, base); else (all, none)
    graphdef, abstract_params = nnx.graphdef(abstract), nnx.to_pure_dict(trained)
    params_sharding = nnx.to_pure_dict(param_shardings(trained, mesh))
    replicated = indivisible_dims(nnx.state(abstract), mesh)
    if replicated:
        say(f"replicated on mesh {dict(mesh.shape)} (mesh axes do not divide them): {'; '.join(replicated)}")

    data_dir = prepare_data(cfg.data, run_dir)
    train_idx, held = _split(cfg, data_dir, run_dir)
    loader = make_loader(
        data_dir,
        tokenizer,
        global_batch_size=cfg.global_batch_size,
        prompt_len=cfg.prompt_len,
        response_len=cfg.response_len,
        seed=cfg.seed,
        num_epochs=cfg.num_epochs,
        indices=train_idx,
    )
    evaluate = held and make_evaluator(
        cfg.eval, cfg.loss, held, loader.encoder, graphdef, mesh, stop_tokens=stop_tokens
    )
    total = min(loader.num_batches, cfg.max_steps or loader.num_batches)
    tx, schedule = make_optimizer(cfg.optimizer, total)
    shardings = state_shardings(
        tx, params_sharding, abstract_params, mesh, nnx.to_pure_dict(param_shardings(frozen, mesh))
    )
    base = params if model_cfg.lora else {}  # LoRA: the frozen base, loaded at every start
    if start:
        target = abstract_state(tx, abstract_params, shardings)
        restored, opt_state, data_state = checkpoints.restore(start, target.params, target.opt_state)
        step0 = jax.device_put(jnp.asarray(start, jnp.int32), NamedSharding(mesh, PartitionSpec()))
        state = TrainState(step0, restored, opt_state, base)
        loader.set_state(data_state)
    else:
        fresh = init_adapters(model_cfg, cfg.seed, params_sharding) if model_cfg.lora else params
        state = init_state(fresh, tx, shardings, base)
    del params, base
    train_step = make_train_step(graphdef, tx, schedule, cfg.loss, shardings, mesh, cfg.grad_accum)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
    say(
        f"{n_params / 1e6:.1f}M {f'LoRA (rank {cfg.lora.rank}) ' if model_cfg.lora else ''}params, "
        f"mesh {dict(mesh.shape)}, {loader.num_records} records"
        f"{f' (+{len(held)} held out)' if held else ''}, "
        f"{loader.steps_per_epoch} steps/epoch, steps {start}..{total}, batch {cfg.global_batch_size} "
        f"(x{cfg.grad_accum} accumulation), P={cfg.prompt_len} N={cfg.response_len}"
    )
    metrics_log = MetricsLog(run_dir, start, cfg.tensorboard, cfg.metrics_flush_s)
    try:
        if evaluate and not start:
            record = {"step": 0, **evaluate(model_params(state))}
            metrics_log.write(record)
            say(eval_line(record))
        history, step, stopped = _loop(
            cfg, state, train_step, loader, mesh, checkpoints, metrics_log, evaluate, start, total, say
        )
        checkpoints.wait()
        checkpoints.close()
    finally:
        metrics_log.close()  # the lines not written yet, also when a step failed
    if stopped:
        say(f"SIGTERM: stopped after step {step}/{total}, checkpoint saved; rerun the same command to resume")
    elif step < total:
        say(f"stop_after: stopped after step {step}/{total}, checkpoint saved; rerun to go on")
    else:
        say(f"done: {run_dir} (step {step}; data {loader.stats})")
    return TrainResult(run_dir, start, step, total, history, stopped)


def eval_line(m: dict[str, Any]) -> str:
    return (
        f"eval step {m['step']}  ar {m['eval_ar']:.4f}  con {m['eval_con']:.4e}  passes/token "
        f"{m['eval_passes_per_token']:.3f}  equal y(T) {m['eval_equal_best']:.2f}  distinct {m['eval_distinct']:.2f}  "
        f"{m['eval_seconds']:.1f} s"
    )


def _loop(cfg, state, train_step, loader, mesh, checkpoints, metrics_log, evaluate, start, total, say):
    """The steps start+1 .. end: (history, last step, stopped by SIGTERM)."""
    # Teacher + student sequence tokens per step (bench/train_speed's unit); the model runs P fewer per
    # row, since the loss packs each pair's shared prompt once.
    tokens_per_step = 2 * cfg.global_batch_size * (cfg.prompt_len + cfg.response_len)
    history, step, saved = [], start, start
    with _SigtermFlag() as sigterm:
        last = time.perf_counter()
        end = total if cfg.stop_after is None else min(total, cfg.stop_after)
        stop = False
        while step < end and not stop:
            state, metrics = train_step(state, global_batch(next(loader), mesh))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            step += 1
            elapsed = time.perf_counter() - last
            record = {
                "step": step,
                **metrics,
                "tokens_per_s": tokens_per_step / elapsed,
                "step_time_s": elapsed,
                **{f"data_{k}": v for k, v in loader.stats.items()},
            }
            if step % cfg.log_every == 0 or step == total:
                say(progress_line(record, total))
            # checked before an evaluation due now, which a stop skips: SIGTERM's grace is for the checkpoint
            stop = any_process(sigterm.raised)
            if evaluate and not stop and (step == total or (cfg.eval.every and step % cfg.eval.every == 0)):
                record.update(evaluate(model_params(state)))
                say(eval_line(record))
            last = time.perf_counter()
            history.append(record)
            metrics_log.write(record)
            final = step == end or stop
            if checkpoints.save(step, state.params, state.opt_state, loader.get_state(), force=final):
                saved = step
                metrics_log.flush()  # a checkpoint's lines are written with it: a resume from it has them all
        stopped = stop and step < total
        if stopped and saved != step:
            checkpoints.save(step, state.params, state.opt_state, loader.get_state(), force=True)
            metrics_log.flush()
    return history, step, stopped
