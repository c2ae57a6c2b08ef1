"""Gemma-2-9B bf16 decode plan on the code before the carried cache (run as `PYTHONPATH=. python
/path/to/bench/decode_plan_before.py` in a worktree of d9bad42): decoding/plan.py's measurement (fp32 program,
bytes halved) with that code's slot shardings. Kept in git history only (the RESULTS "before" figures)."""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from diffpo_jax.config import load_preset
from diffpo_jax.decoding import jacobi
from diffpo_jax.model import abstract_model
from diffpo_jax.sharding import make_mesh, param_shardings, batch_sharding
cfg = load_preset("gemma-2-9b-it")[0].replace(dtype="float32", param_dtype="float32")
mesh = make_mesh((8, 1, 1))
graphdef, state = nnx.split(abstract_model(cfg))
state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, param_shardings(state, mesh))
def peak(c):
    m = c.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes) / 2 / 2**30
for rows in (48, 96):
    s = jax.eval_shape(lambda: jacobi._empty(cfg, rows, 1024, 256 + 32, block_size=32, max_new_tokens=256, pad_id=0, trajectory=False))
    sh = lambda k, x: NamedSharding(mesh, P(None, ("data", "fsdp"))) if k == "cache" else batch_sharding(mesh, x.ndim)
    s = s.replace(**{k: jax.tree.map(lambda x, k=k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh(k, x)), getattr(s, k))
                     for k in ("cache", "tokens", "n", "window", "passes", "stopped", "done", "capped", "prompt_lens", "drafts", "draft_lens", "held_n")})
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        loop = jacobi._advance.lower(graphdef, state, s, np.int32(1), np.zeros(rows, bool), stop_tokens=(1,), pad_id=0, realign=True).compile()
        refill = jacobi._refill.lower(graphdef, state, s, np.int32(0), i32(1024), np.int32(1), i32(288), np.int32(1), np.int32(0), hold_draft_prefix=0, stop_tokens=(1,), pad_id=0).compile()
    print(rows, "loop", round(peak(loop), 2), "refill", round(peak(refill), 2), "GiB")
