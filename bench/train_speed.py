"""Train-step speed, side by side in one run: the diffpo-jax step (diffpo_jax/training/step.py) against a
PyTorch CLLM-style step (bench/torch_step.py) on the same model, weights and batch.

  python -m bench.train_speed [--model SPEC] [--batch 2] [--prompt-len 64] [--response-len 128]
      [--steps 3] [--profile] [--results DIR]

Both run fp32 on one device (JAX: a 1x1x1 mesh; torch: `--torch-threads`, default all cores), no remat,
the same AdamW (lr 1e-5 constant, no weight decay) after clipping the global gradient norm to 1, and
the same loss (L_AR + 1e3 * L_Con, plain lm head). The batch is random token ids (seeded) in the
trajectory loader's layout: `--batch` rows of a left-padded prompt and right-padded best / worse
responses (rows get different amounts of padding). The first step of each starts from the same
weights, so their losses must agree (checked; a difference is printed loudly). Timing: one warm-up
step each (JAX: the compile, reported as first step - median step), then `--steps` timed steps of
each, interleaved (jax, torch, jax, ...) so load swings on a shared machine hit both alike.
Tokens/s counts the batch's teacher and student sequences, 2 x batch x (P + N), for both steps: the
same work unit (the JAX step packs each pair's shared prompt once, so it runs P fewer positions per pair).
Each timed step also records the process's system CPU time and minor page faults (getrusage; the steps
run one at a time, so each delta is that step's).

`--profile` then runs one more step of each under its framework's profiler and prints where the time
goes: JAX, the XLA ops of the compiled step from a `jax.profiler` trace, summed per op kind
(`ynn_fusion.31` -> `ynn_fusion`) in thread-seconds (XLA runs independent ops on parallel threads);
torch, `torch.profiler`'s self CPU time per aten op on the calling thread.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench import common

LEARNING_RATE, CON_WEIGHT, MAX_GRAD_NORM = 1e-5, 1e3, 1.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", default=None, help="anything diffpo_jax.sources.load_model accepts (default: embedded SmolLM2)"
    )
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="profile one more step of each and print the top ops")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="default: all cores")
    common.add_results_option(ap)
    return ap.parse_args(argv)


def make_batch(b: int, p: int, n: int, vocab: int, pad: int, seed: int) -> dict[str, np.ndarray]:
    """A trajectory-loader-shaped batch of random ids; row r has r * p // (2b) prompt pads on the left and
    its best / worse answers cut short by different amounts."""
    rng = np.random.default_rng(seed)
    cols = np.arange(p)
    prompt_mask = cols[None, :] >= (np.arange(b) * p // (2 * b))[:, None]
    batch = {"prompt": np.where(prompt_mask, rng.integers(3, vocab, (b, p)), pad), "prompt_mask": prompt_mask}
    for key, lens in (("best", n - np.arange(b) * n // (3 * b)), ("worse", n - np.arange(b) * n // (2 * b) - 1)):
        mask = np.arange(n)[None, :] < lens[:, None]
        batch[key], batch[f"{key}_mask"] = np.where(mask, rng.integers(3, vocab, (b, n)), pad), mask
    return {k: v.astype(np.int32) if v.dtype != bool else v for k, v in batch.items()}


def jax_runner(loaded, batch):
    """step() -> loss: the diffpo-jax train step on a one-device mesh, state carried between calls."""
    import jax
    from flax import nnx

    from diffpo_jax.sharding import make_mesh, param_shardings
    from diffpo_jax.training.loss import LossConfig
    from diffpo_jax.training.step import (
        OptimizerConfig,
        global_batch,
        init_state,
        make_optimizer,
        make_train_step,
        state_shardings,
    )

    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    graphdef, state = nnx.split(loaded.model)
    params = nnx.to_pure_dict(state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    opt = OptimizerConfig(learning_rate=LEARNING_RATE, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM)
    tx, schedule = make_optimizer(opt, total_steps=10**6)  # cosine over 1e6 steps: constant here
    shardings = state_shardings(tx, nnx.to_pure_dict(param_shardings(state, mesh)), abstract, mesh)
    train_step = make_train_step(graphdef, tx, schedule, LossConfig(con_weight=CON_WEIGHT), shardings, mesh)
    holder = {"state": init_state(jax.tree.map(lambda x: x.copy(), params), tx, shardings)}
    device_batch = global_batch(batch, mesh)

    def step() -> float:
        holder["state"], metrics = train_step(holder["state"], device_batch)
        return float(jax.block_until_ready(metrics["loss"]))

    return step


def timed(steps: dict[str, Callable[[], float]], count: int) -> dict[str, dict]:
    """Per name: one untimed warm-up call (JAX: the compile; compile_s = its time - the median), then
    `count` timed calls, interleaved (a, b, a, b, ...) so load swings on a shared machine hit both."""
    out = {}
    for name, step in steps.items():
        t = time.perf_counter()
        out[name] = {"first_loss": step(), "first_s": time.perf_counter() - t, "times": [], "sys": [], "faults": []}
    for _ in range(count):
        for name, step in steps.items():
            before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            step()
            out[name]["times"].append(time.perf_counter() - t)
            after = resource.getrusage(resource.RUSAGE_SELF)
            out[name]["sys"].append(after.ru_stime - before.ru_stime)
            out[name]["faults"].append(after.ru_minflt - before.ru_minflt)
    for r in out.values():
        r["step_s"], r["sys_s"], r["faults_per_step"] = (float(np.median(r[k])) for k in ("times", "sys", "faults"))
        r["compile_s"] = max(r.pop("first_s") - r["step_s"], 0.0)
    return out


def jax_profile(step: Callable[[], float], top: int) -> list[tuple[str, float, int]]:
    """Run `step` once under jax.profiler; (op kind, thread-seconds, calls) of its XLA ops, largest first,
    the rest summed as 'other'."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            step()
        (trace,) = Path(tmp).glob("plugins/profile/*/perfetto_trace.json.gz")
        data = json.loads(gzip.decompress(trace.read_bytes()))
    events = data["traceEvents"] if isinstance(data, dict) else data
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        name = e.get("name", "")
        # Complete events only; python frames ('$file:line'), runtime internals ('A::B') and markers are not ops.
        if e.get("ph") != "X" or name.startswith(("$", "end: ")) or "::" in name:
            continue
        kind = re.sub(r"(\.\d+)+$", "", name)
        totals[kind][0] += e["dur"] / 1e6
        totals[kind][1] += 1
    return _top(totals, top)


def torch_profile(step: Callable[[], float], top: int) -> list[tuple[str, float, int]]:
    """Run `step` once under torch.profiler; (aten op, self CPU seconds, calls), largest first, rest as 'other'."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return _top({e.key: [e.self_cpu_time_total / 1e6, e.count] for e in prof.key_averages()}, top)


def _top(totals: dict[str, list], top: int) -> list[tuple[str, float, int]]:
    ranked = sorted(((k, float(s), int(n)) for k, (s, n) in totals.items()), key=lambda r: -r[1])
    rest = ranked[top:]
    return ranked[:top] + ([("other", sum(r[1] for r in rest), sum(r[2] for r in rest))] if rest else [])


def profile_table(rows: list[tuple[str, float, int]], unit: str) -> str:
    total = sum(r[1] for r in rows)
    return common.table(
        ["op", unit, "share", "calls"], [[f"`{k}`", s, f"{100 * s / total:.0f}%", n] for k, s, n in rows]
    )


HEADERS = [
    "step",
    "batch x (P + N)",
    "step s (median)",
    "tokens/s",
    "sys CPU s / step",
    "minor faults / step",
    "first-step loss",
    "compile s",
]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from bench.torch_step import TorchStep
    from diffpo_jax.sources import load_model

    torch.set_num_threads(args.torch_threads)
    loaded = load_model(args.model, with_tokenizer=False)
    cfg = loaded.cfg
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_ids or (0,))[0]
    batch = make_batch(args.batch, args.prompt_len, args.response_len, cfg.vocab_size, pad, args.seed)
    ref = AutoModelForCausalLM.from_pretrained(**loaded.reference, dtype=torch.float32)
    machine = common.machine()
    print(machine, flush=True)
    tokens = 2 * args.batch * (args.prompt_len + args.response_len)
    shape = f"{args.batch} x ({args.prompt_len} + {args.response_len})"

    torch_step = TorchStep(
        ref, learning_rate=LEARNING_RATE, weight_decay=0.0, con_weight=CON_WEIGHT, max_grad_norm=MAX_GRAD_NORM
    )
    steps = {"jax": jax_runner(loaded, batch), "torch": lambda: torch_step.step(batch)[0]}
    results = timed(steps, args.steps)
    rows = []
    for name, label in (("jax", "diffpo-jax (jit, fp32)"), ("torch", "PyTorch CLLM-style (eager, fp32)")):
        r = results[name]
        r["tokens_per_s"] = tokens / r["step_s"]
        rows.append(
            [
                label,
                shape,
                r["step_s"],
                r["tokens_per_s"],
                r["sys_s"],
                int(r["faults_per_step"]),
                r["first_loss"],
                r["compile_s"] if name == "jax" else "-",
            ]
        )
    ratio = results["jax"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
    a, b = results["jax"]["first_loss"], results["torch"]["first_loss"]
    loss_rel = abs(a - b) / max(abs(b), 1e-12)
    text = (
        common.table(HEADERS, rows)
        + f"\n\ndiffpo-jax / PyTorch tokens/s: **{ratio:.2f}x**; first-step loss relative difference {loss_rel:.1e}\n"
    )
    profiles = None
    if args.profile:
        profiles = {"jax": jax_profile(steps["jax"], 12), "torch": torch_profile(steps["torch"], 12)}
        text += "\nOne profiled step each (`--profile`). diffpo-jax, XLA ops summed per kind:\n\n"
        text += profile_table(profiles["jax"], "thread-s") + "\n\nPyTorch, self CPU time per op:\n\n"
        text += profile_table(profiles["torch"], "s") + "\n"
    print(text, flush=True)
    if loss_rel > 1e-3:
        print(f"!!! LOSS MISMATCH: diffpo-jax {a} vs PyTorch {b} on the same weights and batch", flush=True)
    if str(args.results) != "-":
        head = common.header("Train-step speed", "train_speed", "bench.train_speed", argv, machine)
        common.write_section(
            args.results, "train_speed", f"{head}- model {loaded.source}, {tokens} tokens per step\n\n{text}"
        )
    return {"results": results, "ratio": ratio, "loss_rel": loss_rel, "profiles": profiles}


if __name__ == "__main__":
    main()
