"""The training job: the loop, checkpoints, resume and SIGTERM (its config: config.py; the model and data it
starts from: start.py; what it logs: metrics.py).

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
  tensorboard/                     event files with the same scalars (process 0; not for a URL run dir,
                                   whose event files would be uploaded whole at each flush: MetricsLog)
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
after the step in flight, skips an evaluation due after it (the grace period is for the checkpoint; one
sent during an evaluation stops the run right after it), saves a checkpoint, waits for it and returns `stopped=True`; with several processes, a SIGTERM to any
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
import json
import math
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from diffpo_jax.data.loader import make_loader
from diffpo_jax.distributed import check_shared_folder, is_main_process
from diffpo_jax.lora import init_adapters, split_trainable
from diffpo_jax.model import abstract_model
from diffpo_jax.paths import as_path
from diffpo_jax.sharding import indivisible_dims, param_shardings
from diffpo_jax.training.config import TRAIN_CONFIG, TrainConfig, check_mesh, check_resume_config, validate
from diffpo_jax.training.evaluation import make_evaluator
from diffpo_jax.training.metrics import MetricsLog, eval_line, progress_line
from diffpo_jax.training.start import prepare_data, split_records, start_model
from diffpo_jax.training.step import (
    TrainState,
    abstract_state,
    global_batch,
    init_state,
    make_optimizer,
    make_train_step,
    model_params,
    state_shardings,
)
from diffpo_jax.weights.checkpoint import TrainCheckpoints

SHARED_CHECK = ".shared-check"  # the token file of check_shared_folder, there for a second at start-up


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


@dataclasses.dataclass
class TrainResult:
    run_dir: epath.Path
    start_step: int  # the step resumed from (0 for a fresh run)
    step: int  # the last step done
    total_steps: int
    history: list[dict[str, Any]]  # the metrics of the steps this call ran
    stopped: bool  # True when SIGTERM ended it early (a checkpoint of `step` was saved)


def train(cfg: TrainConfig, log=print, allow_config_change: tuple[str, ...] = ()) -> TrainResult:
    """Run (or resume) the job of `cfg`; see module doc. `log` gets the progress lines (process 0);
    `allow_config_change`: keys (or sections) a resume may change beyond RESUMABLE_KEYS."""
    say = log if is_main_process() else (lambda _: None)
    cfg = validate(cfg)
    run_dir = as_path(cfg.output_dir)  # a URL stays one (paths.py)
    check_shared_folder(run_dir / SHARED_CHECK, f"output_dir {run_dir}")  # before anything is written
    mesh, cfg = check_mesh(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = TrainCheckpoints(
        run_dir, every=cfg.save_every, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints
    )
    start = checkpoints.latest_step() or 0
    if start:
        check_resume_config(cfg, run_dir, allow_config_change)
    model_cfg, tokenizer, stop_tokens, params = start_model(cfg, run_dir, start, mesh, say)
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
    train_idx, held = split_records(cfg, data_dir, run_dir)
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
    if metrics_log.note:
        say(metrics_log.note)
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
                stop = any_process(sigterm.raised)  # and after it: one sent during it stops now, not a step later
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
