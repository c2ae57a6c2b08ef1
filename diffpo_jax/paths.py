"""Paths a user gives: local paths or URLs (`gs://`, `s3://`, ... whatever etils.epath knows).

One path type throughout, `etils.epath.Path` (Orbax's own): `as_path` keeps a URL a URL (never a local
`./gs:/bucket` folder) and makes a local path absolute. Orbax reads and writes URLs itself (its
arrays through TensorStore's GCS driver); the project's own small files (config.json, metrics.jsonl,
train_config.json, manifests) go through epath. Three libraries only know local files, so they are
bridged explicitly:
  - reading (the HF tokenizer, array_record datasets): `local_dir` copies a URL dir's top-level files
    to this host's cache (DIFFPO_CACHE, default ~/.cache/diffpo_jax), once per host;
  - writing (the HF tokenizer's files, safetensors, array_record): `written_locally` hands out a local
    temp dir whose files are copied to the URL dir at the end.
On object stores a rename is a copy and a delete, not atomic: a staged dir (`.NAME.partial`) renamed
into place can be seen half-copied by a reader at that moment, and a killed rename can leave both.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

from etils import epath

ENV_CACHE = "DIFFPO_CACHE"


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a URL unchanged, a local path with ~ expanded and made absolute."""
    if is_url(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def remove_tree(path: epath.Path) -> None:
    """Remove a dir and what it holds, if it exists."""
    if path.exists():
        path.rmtree()


# ---------------------------------------------------------------- once per host


@functools.cache
def first_on_host() -> bool:
    """True for the lowest-numbered process of this host (one all-gather of host-name hashes, cached)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return True
    mine = np.frombuffer(hashlib.sha256(socket.gethostname().encode()).digest()[:4], np.int32)
    hosts = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)
    return int(np.flatnonzero(hosts == mine[0])[0]) == jax.process_index()


def sync(name: str) -> None:
    """A barrier over all processes (nothing with one)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------- local bridges


def cache_dir() -> epath.Path:
    return as_path(os.environ.get(ENV_CACHE) or "~/.cache/diffpo_jax")


def local_dir(path: str | os.PathLike) -> epath.Path:
    """A local dir with the top-level files of `path`: `path` itself when local; for a URL, a copy in
    this host's cache made by the host's first process (the others wait at a barrier; collective)."""
    path = as_path(path)
    if not is_url(path):
        return path
    local = cache_dir() / "remote" / hashlib.sha256(os.fspath(path).encode()).hexdigest()[:16]
    if first_on_host():
        staged = local.with_name(local.name + ".partial")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for item in path.iterdir():
            if item.is_file():
                item.copy(staged / item.name, overwrite=True)
        shutil.rmtree(local, ignore_errors=True)
        os.replace(staged, local)
    sync(f"diffpo_jax.paths.local_dir:{path}")
    return local


@contextlib.contextmanager
def written_locally(out_dir: epath.Path) -> Iterator[epath.Path]:
    """A local dir to write files for `out_dir` into: `out_dir` itself when local; for a URL, a temp
    dir whose files are copied into `out_dir` when the block succeeds."""
    if not is_url(out_dir):
        yield out_dir
        return
    with tempfile.TemporaryDirectory(prefix="diffpo_jax-") as tmp:
        yield epath.Path(tmp)
        for item in epath.Path(tmp).iterdir():
            item.copy(out_dir / item.name, overwrite=True)
