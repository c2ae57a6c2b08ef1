"""Orbax checkpoints: self-describing model dirs (params only) and train runs (params, optimizer, data).

Layouts (every Orbax dir carries the HF `config.json` and tokenizer files of its model):
  model dir  OUT/config.json, tokenizer files, params/         params: Orbax checkpoint of a nested
                                                               dict of arrays (`nnx.to_pure_dict`)
  run dir    RUN/config.json, tokenizer files, checkpoints/<step>/{params, opt_state, meta}
             (an `ocp.CheckpointManager`; meta is JSON {"step": int, "data": <loader state>})
  step dir   RUN/checkpoints/<step>

Restores build targets of `jax.ShapeDtypeStruct`s carrying the shardings wanted now, so a checkpoint
loads onto any device count or mesh, never needing the one it was saved on. Writes of whole dirs go to
a temp dir beside the destination, renamed at the end (`staged_dir`): an interrupted write never
leaves a dir that looks complete (on object stores the rename is a copy, see paths.py). Paths may be
URLs (`gs://...`, paths.py): they reach Orbax unchanged. In a multi-host run every process calls these
functions (saves and restores are collective); only process 0 writes the files beside the arrays.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import SingleDeviceSharding

from diffpo_jax.config import ModelConfig, read_hf_config
from diffpo_jax.distributed import is_main_process
from diffpo_jax.model import abstract_model
from diffpo_jax.paths import as_path, local_dir, remove_tree, sync, written_locally
from diffpo_jax.sharding import param_shardings

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
PARAMS = "params"
CHECKPOINTS = "checkpoints"


class CheckpointError(ValueError):
    """An Orbax dir that cannot be read or an output dir that cannot be written; str() names the path."""


def _pure(params: Any) -> dict:
    """A params pytree as a plain nested dict of arrays (the on-disk format)."""
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def _like(target: Any, pure: dict) -> Any:
    """`pure` in the container type of `target` (an nnx.State or a plain dict)."""
    if not isinstance(target, nnx.State):
        return pure
    state = jax.tree.map(lambda x: x, target)  # a fresh State: the caller's target is left as it was
    nnx.replace_by_pure_dict(state, pure)
    return state


# ---------------------------------------------------------------- output dirs


def check_out_dir(out_dir: epath.Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty `out_dir` unless `overwrite`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def staged_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[epath.Path]:
    """A temp dir beside `out_dir` to write into; renamed to `out_dir` when the block succeeds and
    removed when it fails. An existing `out_dir` is replaced only after the new one is complete."""
    out_dir = as_path(out_dir)
    check_out_dir(out_dir, overwrite)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if is_main_process():
        remove_tree(tmp)  # left by an interrupted run
        tmp.mkdir(parents=True)
    sync(f"staged_dir:start:{out_dir}")
    try:
        yield tmp
        sync(f"staged_dir:done:{out_dir}")
    except BaseException:
        if is_main_process():
            remove_tree(tmp)
        raise
    if is_main_process():
        old = out_dir.with_name(f".{out_dir.name}.old")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        remove_tree(old)
    sync(f"staged_dir:renamed:{out_dir}")


# ---------------------------------------------------------------- model dirs


def write_model_files(
    out_dir: str | os.PathLike, cfg: ModelConfig, tokenizer: Any, generation: dict | None = None
) -> None:
    """config.json (`cfg.to_hf()`, torch_dtype = the stored param dtype), the tokenizer's files and, when
    given, generation_config.json (the source model's, carried through Orbax dirs to the HF export)."""
    if not is_main_process():
        return
    out_dir = as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG).write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    if tokenizer is not None:
        with written_locally(out_dir) as local:
            tokenizer.save_pretrained(os.fspath(local))
    if generation is not None:
        (out_dir / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")


def tokenizer_from_dir(path: str | os.PathLike):
    """The HF tokenizer saved in folder `path` (a URL's files are read from this host's cache), or None
    when it holds no tokenizer files."""
    path = local_dir(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(path))


def read_generation_config(model_dir: str | os.PathLike) -> dict | None:
    """The generation_config.json in `model_dir` (an HF folder, or the model files of an Orbax dir:
    `model_files_dir`); None when there is none."""
    f = as_path(model_dir) / GENERATION_CONFIG
    return json.loads(f.read_text()) if f.is_file() else None


def save_params(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    params: Any,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    generation: dict | None = None,
) -> epath.Path:
    """Write a model dir: config.json, tokenizer files, generation_config.json (when given) and `params/`
    (written from every process's shards)."""
    out_dir = as_path(out_dir)
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        write_model_files(tmp, cfg, tokenizer, generation)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS, _pure(params))
        checkpointer.wait_until_finished()
        checkpointer.close()
    return out_dir


def _layout(path: epath.Path) -> tuple[str, epath.Path] | None:
    """("model" | "run" | "step", the dir holding config.json), or None for anything else."""
    if path.parent.name == CHECKPOINTS and (path / PARAMS).is_dir():
        return "step", path.parent.parent
    if (path / CONFIG).is_file() and (path / PARAMS).is_dir():
        return "model", path
    if (path / CONFIG).is_file() and (path / CHECKPOINTS).is_dir():
        return "run", path
    return None


def is_orbax_dir(path: str | os.PathLike) -> bool:
    """True for a model dir, a train run dir or one of its step dirs."""
    path = as_path(path)
    return path.is_dir() and _layout(path) is not None


def _checked_layout(path: str | os.PathLike) -> tuple[str, epath.Path, epath.Path]:
    """(kind, absolute path or URL, dir holding config.json); a CheckpointError for anything else."""
    path = as_path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    layout = _layout(path) if path.is_dir() else None
    if layout is None:
        raise CheckpointError(
            f"{path}: not an Orbax checkpoint (expected a model dir with {CONFIG} and {PARAMS}/, "
            f"a train run dir with {CONFIG} and {CHECKPOINTS}/, or a step dir {CHECKPOINTS}/<step>)"
        )
    return layout[0], path, layout[1]


def is_train_run(path: str | os.PathLike) -> bool:
    """True for a train run dir or one of its step dirs (a CheckpointError for what is no Orbax dir)."""
    return _checked_layout(path)[0] != "model"


def model_files_dir(path: str | os.PathLike) -> epath.Path:
    """The dir holding config.json and the tokenizer files of an Orbax dir."""
    return _checked_layout(path)[2]


def params_dir(path: str | os.PathLike) -> epath.Path:
    """The Orbax params checkpoint inside a model dir, step dir, or a run dir's latest step."""
    kind, path, _ = _checked_layout(path)
    if kind != "run":
        return path / PARAMS
    steps = ocp.utils.checkpoint_steps(path / CHECKPOINTS)
    if not steps:
        raise CheckpointError(f"{path / CHECKPOINTS}: no finished checkpoint in this train run")
    return path / CHECKPOINTS / str(max(steps)) / PARAMS


def read_orbax_config(path: str | os.PathLike) -> ModelConfig:
    """The model config of an Orbax dir; `param_dtype` is the dtype the params were stored in."""
    config = model_files_dir(path) / CONFIG
    hf = read_hf_config(config)
    cfg = ModelConfig.from_hf(hf, source=str(config))
    return cfg.replace(param_dtype=hf.get("torch_dtype") or hf.get("dtype") or "float32")


def restore_params(
    path: str | os.PathLike,
    cfg: ModelConfig,
    mesh: jax.sharding.Mesh | None = None,
    which: nnx.filterlib.Filter = nnx.Param,
) -> nnx.State:
    """The params of an Orbax dir as an nnx.State, each array restored straight onto its sharding under
    `mesh` (`param_shardings`), or onto the first local device when `mesh` is None, in `cfg.param_dtype`.
    `which`: the params of a model of `cfg` that the dir holds (nnx.LoRAParam: a LoRA run's adapters)."""
    where = params_dir(path)
    abstract = nnx.state(abstract_model(cfg), which)
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(abstract))
    else:
        shardings = nnx.to_pure_dict(param_shardings(abstract, mesh))
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nnx.to_pure_dict(abstract), shardings
    )
    try:
        restored = ocp.StandardCheckpointer().restore(where, target)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: params do not match {CONFIG} ({reason})") from None
    return _like(abstract, restored)


# ---------------------------------------------------------------- train runs


class TrainCheckpoints:
    """RUN_DIR/checkpoints: params, optimizer state and data-iterator state, every `every` steps,
    the last `keep` kept. Saves are asynchronous when `async_save` (call `wait` before reading them)."""

    def __init__(self, run_dir: str | os.PathLike, *, every: int, keep: int, async_save: bool = True):
        self.directory = as_path(run_dir) / CHECKPOINTS
        self.every = every
        # The schedule is decided here (`save`), not by Orbax, whose default also saves a run's first step.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Save when `step` is due (a multiple of `every`) or `force`; True when a save was started."""
        if not force and step % self.every:
            return False
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(_pure(params)),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave({"step": step, "data": data_state}),
        )
        return self._manager.save(step, args=args, force=True)

    def restore(self, step: int, params_target: Any, opt_state_target: Any) -> tuple[Any, Any, dict]:
        """(params, opt_state, data_state) of `step`. Targets are pytrees of `jax.ShapeDtypeStruct`s
        with shardings (params as an nnx.State or a plain dict); results take their shardings."""
        if step not in self._manager.all_steps():
            raise CheckpointError(f"{self.directory}: no checkpoint for step {step} (have {self._manager.all_steps()})")
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_pure(params_target)),
            opt_state=ocp.args.StandardRestore(opt_state_target),
            meta=ocp.args.JsonRestore(),
        )
        restored = self._manager.restore(step, args=args)
        return _like(params_target, restored.params), restored.opt_state, restored.meta["data"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
