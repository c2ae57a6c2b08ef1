"""A multi-process worker for tests: start jax.distributed from the DIFFPO_* environment, sum a
globally sharded array, print it; fetch a hub model through a stand-in for huggingface_hub that prints
its calls (one download per host); with `die`, process 1 dies at once and the others keep working."""

import os
import sys
import time

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np

from diffpo_jax import distributed, sources
from diffpo_jax.sharding import batch_sharding, make_mesh

distributed.initialize()
mesh = make_mesh((1, -1, 1))
local = np.arange(jax.local_device_count(), dtype=np.float32) + jax.local_device_count() * jax.process_index()
x = jax.make_array_from_process_local_data(batch_sharding(mesh, 1), local)
total = jax.jit(jnp.sum)(x)
print(
    f"process {jax.process_index()}/{jax.process_count()} devices {jax.device_count()} sum {float(total)}", flush=True
)


def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
    print(f"snapshot_download {repo_id} local_files_only={local_files_only}", flush=True)
    return "/nonexistent/snapshot"


huggingface_hub.snapshot_download = snapshot_download
print(f"fetched {sources._download('org/model')}", flush=True)
if "die" in sys.argv[1:]:
    if jax.process_index() == 1:
        os._exit(9)
    for _ in range(600):  # the survivor keeps running collectives until the runtime stops it
        jax.jit(jnp.sum)(x).block_until_ready()
        time.sleep(0.5)
    print("survivor was never stopped", flush=True)
