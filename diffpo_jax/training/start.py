"""What a run starts from: its model (`start_model`: a --model source or a preset's random init, or the run
dir when resuming) and its data (`prepare_data`: a built dataset, or a source built into the run dir once;
`split_records`: the training records and the held-out ones)."""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
from etils import epath
from flax import nnx

from diffpo_jax.config import PRESET, load_preset
from diffpo_jax.data.trajectories import MANIFEST, build
from diffpo_jax.distributed import is_main_process
from diffpo_jax.lora import base_reference, write_adapter_config
from diffpo_jax.model import Transformer, abstract_model
from diffpo_jax.paths import as_path, local_dir, sync
from diffpo_jax.sharding import param_shardings
from diffpo_jax.sources import (
    LoadedModel,
    ModelSourceError,
    check_base_identity,
    load_model,
    stop_token_ids,
    write_base_identity,
)
from diffpo_jax.training.config import TrainConfig, TrainConfigError
from diffpo_jax.training.evaluation import EVAL_IDS, holdout_split, read_records
from diffpo_jax.weights.checkpoint import (
    read_generation_config,
    read_orbax_config,
    tokenizer_from_dir,
    write_model_files,
)


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


def start_model(cfg: TrainConfig, run_dir: epath.Path, start: int, mesh, say):
    """(model config, tokenizer, stop tokens, initial params or None when resuming): from the run dir or
    `cfg.model` (whose model files, generation_config.json included, the run dir gets at its first start).
    A LoRA run loads its frozen base from `cfg.model` at every start (its checkpoints hold the adapters):
    its first start records the base's identity (sources.BASE_IDENTITY), a resume refuses another base."""
    if start:
        say(f"resuming {run_dir} from step {start}")
        if cfg.lora.rank:
            check_base_identity(run_dir, cfg.model)
        else:
            model_cfg, tokenizer = read_orbax_config(run_dir), tokenizer_from_dir(run_dir)
            return model_cfg, tokenizer, stop_token_ids(model_cfg, tokenizer, read_generation_config(run_dir)), None
    loaded = init_model(cfg.model, seed=cfg.seed, dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh=mesh)
    if not start:
        write_model_files(run_dir, loaded.cfg, loaded.tokenizer, loaded.generation)
        if cfg.lora.rank:
            write_adapter_config(run_dir, cfg.lora, base_reference(cfg.model))
            write_base_identity(run_dir, cfg.model)
        say(f"model {loaded.source} -> {run_dir}")
    return loaded.cfg, loaded.tokenizer, loaded.stop_tokens, nnx.to_pure_dict(nnx.state(loaded.model))


def split_records(
    cfg: TrainConfig, data_dir: epath.Path, run_dir: epath.Path
) -> tuple[list[int] | None, list[dict] | None]:
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
