"""Will this run fit that pod? `python -m diffpo_jax.train --config C [overrides] --plan DEVICES[/HOSTS]`.

Without weights or data, the train config is checked against DEVICES accelerators over HOSTS processes
(default 1): the mesh resolves, a `tensor` group fits within one host, the global batch splits into
micro-batches over data x fsdp (`trainer.fit_to_mesh`, which also resolves `grad_accum: 0` = auto).
Then the train step is compiled ahead of time on DEVICES simulated CPU devices with abstract shapes
(no weights are allocated) and XLA's memory analysis gives the per-device bytes: argument (the train
state and batch), temp, and peak = argument + output - alias + temp. A failed check exits 2 with a
one-line reason. The per-device figures are those of XLA's CPU compiler for the same sharded program:
a guide to the accelerator's (whose compiler fuses and schedules differently), not its exact number.

The model config comes without downloading anything: `preset:NAME`, `embedded`, a configs/models preset
whose `hf_repo` is the model (google/gemma-2-9b-it -> configs/models/gemma-2-9b-it.yaml), or a local
folder / run dir with a config.json. Each train preset lists the topologies it is meant for under
`topologies` (tests/test_plan.py plans every one).
"""

from __future__ import annotations

import math
from typing import Any

from diffpo_jax.config import ModelConfig, config_without_weights
from diffpo_jax.sharding import MESH_AXES
from diffpo_jax.training.config import TrainConfig, TrainConfigError, fit_to_mesh

GIB = 1024**3


def parse_topology(text: str) -> tuple[int, int]:
    """'32' -> (32, 1); '32/8' -> (32 devices, 8 hosts)."""
    devices, _, hosts = str(text).partition("/")
    try:
        n, h = int(devices), int(hosts or 1)
    except ValueError:
        raise TrainConfigError(f"--plan {text!r}: expected DEVICES or DEVICES/HOSTS, e.g. 32/8") from None
    if n < 1 or h < 1 or n % h:
        raise TrainConfigError(f"--plan {text!r}: DEVICES must be a positive multiple of HOSTS")
    return n, h


def model_config(spec: str) -> ModelConfig:
    """The config of train model `spec` without its weights (config.config_without_weights)."""
    try:
        return config_without_weights(spec)
    except (FileNotFoundError, ValueError) as e:
        raise TrainConfigError(f"--plan: {e}") from None


def compile_train_step(
    model_cfg: ModelConfig,
    mesh,
    *,
    rows: int,
    prompt_len: int,
    response_len: int,
    loss_cfg,
    optimizer_cfg,
    grad_accum: int = 1,
):
    """(the train step AOT-compiled on abstract shapes over `mesh`, abstract trained params): `rows` global
    rows of P prompt + N response tokens; nothing is allocated. With `model_cfg.lora` the adapters train
    and the base is frozen, as in the trainer."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from diffpo_jax.data.loader import BATCH_KEYS
    from diffpo_jax.lora import split_trainable
    from diffpo_jax.model import abstract_model
    from diffpo_jax.sharding import batch_sharding, param_shardings
    from diffpo_jax.training.step import abstract_state, make_optimizer, make_train_step, state_shardings

    graphdef, state = nnx.split(abstract_model(model_cfg))
    trained, frozen = split_trainable(state, model_cfg)
    abstract_params = nnx.to_pure_dict(trained)
    tx, schedule = make_optimizer(optimizer_cfg, total_steps=1000)
    shardings = state_shardings(
        tx,
        nnx.to_pure_dict(param_shardings(trained, mesh)),
        abstract_params,
        mesh,
        nnx.to_pure_dict(param_shardings(frozen, mesh)),
    )
    train_step = make_train_step(graphdef, tx, schedule, loss_cfg, shardings, mesh, grad_accum)
    batch = {
        k: jax.ShapeDtypeStruct(
            (rows, prompt_len if k.startswith("prompt") else response_len),
            bool if k.endswith("mask") else jnp.int32,
            sharding=batch_sharding(mesh, 2),
        )
        for k in BATCH_KEYS
    }
    target = abstract_state(tx, abstract_params, shardings, nnx.to_pure_dict(frozen))
    return train_step.lower(target, batch).compile(), abstract_params


def memory(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program: argument, output, alias, temp, peak."""
    m = compiled.memory_analysis()
    out = {
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes,
    }
    return out | {"peak": out["argument"] + out["output"] - out["alias"] + out["temp"]}


def plan(cfg: TrainConfig, topology: str, *, compile: bool = True) -> dict[str, Any]:
    """Check `cfg` against `topology` and, with `compile`, AOT-compile its train step on that many of
    jax's devices (the CLI simulates them). Returns the figures `lines` prints; raises TrainConfigError."""
    from diffpo_jax.sharding import resolve_mesh_shape

    devices, hosts = parse_topology(topology)
    try:
        shape = resolve_mesh_shape(cfg.mesh, devices)
    except ValueError as e:
        raise TrainConfigError(f"config: mesh: {e}") from None
    cfg = fit_to_mesh(cfg, shape, devices // hosts)
    model_cfg = model_config(cfg.model).replace(
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        remat=cfg.remat,
        attention=cfg.attention,
        lora=cfg.lora if cfg.lora.rank else None,
    )
    shards = shape[0] * shape[1]
    micro = cfg.global_batch_size // cfg.grad_accum
    out = {
        "topology": topology,
        "devices": devices,
        "hosts": hosts,
        "mesh": dict(zip(MESH_AXES, shape)),
        "grad_accum": cfg.grad_accum,
        "rows_per_micro_batch": micro,
        "rows_per_device": micro // shards,
        "rows_per_host": cfg.global_batch_size // hosts,
        "tokens_per_step": cfg.global_batch_size * (cfg.prompt_len + 2 * cfg.response_len),
    }
    if compile:
        import jax
        from flax import nnx

        from diffpo_jax.model import abstract_model
        from diffpo_jax.sharding import indivisible_dims, make_mesh

        if len(jax.devices()) < devices:
            raise TrainConfigError(
                f"--plan {topology}: jax has {len(jax.devices())} devices (simulated devices are "
                "set up by the CLI before jax starts)"
            )
        mesh = make_mesh(shape, jax.devices()[:devices])
        compiled, params = compile_train_step(
            model_cfg,
            mesh,
            rows=cfg.global_batch_size,
            prompt_len=cfg.prompt_len,
            response_len=cfg.response_len,
            loss_cfg=cfg.loss,
            optimizer_cfg=cfg.optimizer,
            grad_accum=cfg.grad_accum,
        )
        out["params"] = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
        out["lora_rank"] = cfg.lora.rank
        out["replicated"] = indivisible_dims(nnx.state(abstract_model(model_cfg)), mesh)
        out["memory"] = memory(compiled)
    return out


def lines(p: dict[str, Any]) -> list[str]:
    """The plan as the CLI prints it."""
    mesh = " x ".join(f"{k} {v}" for k, v in p["mesh"].items())
    out = [
        f"plan {p['topology']}: {p['devices']} devices on {p['hosts']} host(s), mesh {mesh}",
        f"  batch: {p['grad_accum']} micro-batch(es) of {p['rows_per_micro_batch']} rows, {p['rows_per_device']} "
        f"row(s) per data-parallel device, {p['rows_per_host']} rows per host per step, "
        f"{p['tokens_per_step']:,} tokens per step (P + 2N per row)",
    ]
    if "memory" in p:
        m = p["memory"]
        size = lambda n: f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"
        params = f"{p['params'] / 1e9:.2f}B" if p["params"] >= 1e9 else f"{p['params'] / 1e6:.1f}M"
        lora = f" trained (LoRA rank {p['lora_rank']} adapters, the base frozen)" if p.get("lora_rank") else ""
        out.append(
            f"  model: {params} params{lora}; per device (XLA, AOT): state + batch "
            f"{size(m['argument'])}, temp {size(m['temp'])}, peak {size(m['peak'])}"
        )
        if p["replicated"]:
            out.append(f"  replicated (mesh axes do not divide them): {'; '.join(p['replicated'])}")
    return out
