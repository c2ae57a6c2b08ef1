"""Training: the tiny model learns on the bundled trajectories; sharded steps == the 1-device step;
SIGTERM / SIGKILL + rerun == an uninterrupted run; the run dir is a model (`--model`, convert to-hf);
config errors are one line."""

import json
import os
import re
import signal
import subprocess
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from bench.memory_plan import compile_train_step
from diffpo_jax import convert
from diffpo_jax import train as train_cli
from diffpo_jax.data.loader import make_loader
from diffpo_jax.model import abstract_model
from diffpo_jax.sharding import make_mesh, param_shardings
from diffpo_jax.sources import load_model
from diffpo_jax.training import trainer
from diffpo_jax.training.config import TrainConfigError, load_config
from diffpo_jax.training.metrics import MetricsLog
from diffpo_jax.training.step import (
    global_batch,
    init_state,
    make_optimizer,
    make_train_step,
    state_shardings,
)
from tests.tiny_run import ROOT, read_metrics, train_command, with_compile_cache, write_config

STEPS = 20  # 4 epochs of the 40 bundled trajectories in batches of 8
CHANGES = dict(
    num_epochs=4,
    save_every=4,
    keep_checkpoints=3,
    log_every=5,
    tensorboard=True,
    loss={"con_weight": 1000.0, "chunk": 4},
)
slow = pytest.mark.slow  # runs of the tiny model, which takes the embedded SmolLM2's tokenizer (session fixture)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_init_dir, trajectories_dir):
    path = tmp_path_factory.mktemp("train") / "tiny-test.yaml"
    return write_config(path, tiny_init_dir, trajectories_dir, **CHANGES)


def run_cli(config_file, run_dir, cache, kill_after=None, sig=None):
    """`python -m diffpo_jax.train` in a subprocess (8 CPU devices, from conftest's XLA_FLAGS); with
    kill_after, send `sig` once metrics.jsonl has that many lines. Returns (returncode, output, lines
    seen when signalled)."""
    cmd, env = train_command(config_file, run_dir), with_compile_cache(os.environ, cache)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = None
    if kill_after is not None:
        metrics = Path(run_dir) / "metrics.jsonl"
        while proc.poll() is None:
            seen = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if seen >= kill_after:
                proc.send_signal(sig)
                break
            time.sleep(0.05)
    out = proc.communicate(timeout=600)[0]
    return proc.returncode, out, seen


@pytest.fixture(scope="module")
def reference(config_file, xla_cache_dir, tmp_path_factory):
    """The run dir of an uninterrupted CLI run of STEPS steps on 8 devices (mesh (1, 8, 1))."""
    run_dir = tmp_path_factory.mktemp("train") / "reference"
    rc, out, _ = run_cli(config_file, run_dir, xla_cache_dir)
    assert rc == 0, out
    return run_dir


def losses(history):
    return np.array([[m["loss"], m["ar"], m["con"]] for m in history])


@slow
def test_tiny_model_lowers_both_losses(reference):
    lines = read_metrics(reference)
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    per_step = losses(lines)
    first_epoch, last_epoch = per_step[:5].mean(0), per_step[-5:].mean(0)  # each epoch: all 40 records
    assert last_epoch[1] < first_epoch[1] - 0.5, (first_epoch, last_epoch)  # L_AR
    assert last_epoch[2] < 0.5 * first_epoch[2], (first_epoch, last_epoch)  # L_Con
    np.testing.assert_allclose(per_step[:, 0], per_step[:, 1] + 1000.0 * per_step[:, 2], rtol=1e-6)
    lrs = [m["lr"] for m in lines]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(3e-3) and lrs[-1] < 1e-4  # warmup, cosine to ~0
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir()) == [12, 16, 20]  # keep 3


@slow
def test_sharded_steps_match_one_device(tiny_init_dir, trajectories_dir, config_file, reference):
    """The first 4 updates (fp32) on 1 device (with 2 micro-batches of 4 rows: accumulation is exact too)
    and on a (2,2,2) mesh == the reference run's on (1,8,1)."""
    cfg = load_config(config_file, ["output_dir=unused"])
    loaded = load_model(str(tiny_init_dir))
    loader = make_loader(
        trajectories_dir,
        loaded.tokenizer,
        global_batch_size=cfg.global_batch_size,
        prompt_len=cfg.prompt_len,
        response_len=cfg.response_len,
        num_epochs=cfg.num_epochs,
    )
    batches = [next(loader) for _ in range(4)]
    abstract = abstract_model(loaded.cfg)
    graphdef, abstract_params = nnx.graphdef(abstract), nnx.to_pure_dict(nnx.state(abstract))
    tx, schedule = make_optimizer(cfg.optimizer, STEPS)

    def run(mesh, grad_accum):
        params = nnx.to_pure_dict(nnx.state(load_model(str(tiny_init_dir), mesh=mesh, with_tokenizer=False).model))
        shardings = state_shardings(
            tx, nnx.to_pure_dict(param_shardings(nnx.state(abstract), mesh)), abstract_params, mesh
        )
        step = make_train_step(graphdef, tx, schedule, cfg.loss, shardings, mesh, grad_accum)
        state, out = init_state(params, tx, shardings), []
        for batch in batches:
            state, metrics = step(state, global_batch(batch, mesh))
            out.append([float(metrics[k]) for k in ("loss", "ar", "con", "grad_norm")])
        return np.array(out)

    expected = np.array([[m[k] for k in ("loss", "ar", "con", "grad_norm")] for m in read_metrics(reference)[:4]])
    assert expected[:, 2].min() > 1e-5  # a KL term that is not ~0
    for mesh, grad_accum in ((make_mesh((1, 1, 1), jax.devices()[:1]), 2), (make_mesh((2, 2, 2)), 1)):
        got = run(mesh, grad_accum)
        # fp32 reduction order only: L_AR within 1e-5 (seen <= 1e-6), L_Con within 1e-6 (seen <= 1.2e-7;
        # the total loss, L_AR + 1e3 * L_Con, inherits 1e3 times that), the gradient norm within 1e-5 relative
        np.testing.assert_allclose(got[:, 1], expected[:, 1], rtol=0, atol=1e-5, err_msg=str(mesh.shape))
        np.testing.assert_allclose(got[:, 2], expected[:, 2], rtol=0, atol=1e-6, err_msg=str(mesh.shape))
        np.testing.assert_allclose(got[:, 3], expected[:, 3], rtol=1e-5, err_msg=str(mesh.shape))


def one_epoch(cfg, data_dir, tokenizer):
    """The batches of one epoch of `data_dir` at `cfg`'s batch size and lengths."""
    return make_loader(
        data_dir,
        tokenizer,
        global_batch_size=cfg.global_batch_size,
        prompt_len=cfg.prompt_len,
        response_len=cfg.response_len,
        num_epochs=1,
    )


def one_device_step(cfg, model_cfg, graphdef, params, mesh, grad_accum=1):
    """(the jitted train step of `cfg` on the one-device `mesh`, its first TrainState holding `params`)."""
    abstract = abstract_model(model_cfg)
    tx, schedule = make_optimizer(cfg.optimizer, STEPS)
    shardings = state_shardings(
        tx, nnx.to_pure_dict(param_shardings(nnx.state(abstract), mesh)), nnx.to_pure_dict(nnx.state(abstract)), mesh
    )
    step = make_train_step(graphdef, tx, schedule, cfg.loss, shardings, mesh, grad_accum)
    return step, init_state(params, tx, shardings)


def test_project_conflict_removes_only_the_opposing_component():
    from diffpo_jax.training.step import project_conflict

    g_ar = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0])}
    projected, stats = project_conflict({"a": jnp.array([-1.0, 1.0]), "b": jnp.array([2.0])}, g_ar)
    np.testing.assert_allclose(projected["a"], [0.0, 1.0])
    np.testing.assert_allclose(projected["b"], [2.0])
    assert float(stats["con_ar_cos"]) == pytest.approx(-1 / np.sqrt(6))
    assert float(stats["ar_grad_norm"]) == 1.0 and float(stats["con_grad_norm"]) == pytest.approx(np.sqrt(6))
    agreeing = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([0.0])}
    kept, stats = project_conflict(agreeing, g_ar)
    np.testing.assert_allclose(kept["a"], [1.0, 1.0])
    assert float(stats["con_ar_cos"]) > 0


def test_balance_norm_rescales_the_kl_gradient_to_the_ar_norm():
    from diffpo_jax.training.step import balance_norm

    g_ar = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # norm 5
    scaled, stats = balance_norm({"a": jnp.array([0.0, -1.0]), "b": jnp.array([0.0])}, g_ar)
    np.testing.assert_allclose(scaled["a"], [0.0, -5.0])
    np.testing.assert_allclose(scaled["b"], [0.0])
    assert float(stats["con_ar_cos"]) == 0 and float(stats["ar_grad_norm"]) == 5 and float(stats["con_grad_norm"]) == 1
    zero, _ = balance_norm({"a": jnp.zeros(2), "b": jnp.zeros(1)}, g_ar)  # no KL gradient: nothing to rescale
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(zero))


@slow
@pytest.mark.parametrize("mode", ["project", "balance"])
def test_two_term_step_uses_the_adjusted_gradient(tiny_init_dir, trajectories_dir, config_file, mode):
    """con_gradient=project / balance: the step's gradient norm, the terms' cosine and norms equal PCGrad /
    the norm rescaling computed by hand from the two terms' own gradients (jax.grad of L_AR and of L_Con),
    with and without gradient accumulation."""
    from diffpo_jax.training.loss import diffpo_loss, response_token_losses
    from diffpo_jax.training.step import ADJUST_CON_GRADIENT

    cfg = load_config(
        config_file,
        ["output_dir=unused", "loss.con_weight=2.0", "loss.con_positions=frontier", f"loss.con_gradient={mode}"],
    )
    loaded = load_model(str(tiny_init_dir))
    graphdef, params = nnx.split(loaded.model)
    params = nnx.to_pure_dict(params)

    def term(name, jbatch):
        n = jnp.maximum(jnp.sum(jbatch["best_mask"]), 1).astype(jnp.float32)

        def f(p):
            ce, kl = response_token_losses(nnx.merge(graphdef, p), jbatch, cfg.loss.chunk)
            return diffpo_loss(ce, kl, jbatch, cfg.loss, num_tokens=n)[1][name]

        return jax.grad(f)(params)

    # The first batch whose two terms conflict (at this init: the second), so the projection is exercised.
    for batch in one_epoch(cfg, trajectories_dir, loaded.tokenizer):
        jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
        g_ar, g_con = term("ar", jbatch), term("con", jbatch)
        g_adjusted, stats = ADJUST_CON_GRADIENT[mode](g_con, g_ar)
        if float(stats["con_ar_cos"]) < 0:
            break
    assert float(stats["con_ar_cos"]) < 0, "no batch of the bundled trajectories has conflicting terms at this init"
    expect_norm = float(optax.tree.norm(jax.tree.map(lambda a, c: a + 2.0 * c, g_ar, g_adjusted)))
    summed_norm = float(optax.tree.norm(jax.tree.map(lambda a, c: a + 2.0 * c, g_ar, g_con)))
    assert abs(expect_norm / summed_norm - 1) > 1e-3  # the figure below tells an adjusted step from a plain one
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    for grad_accum in (1, 2):
        step, state = one_device_step(cfg, loaded.cfg, graphdef, jax.tree.map(jnp.copy, params), mesh, grad_accum)
        _, metrics = step(state, global_batch(batch, mesh))
        for k in ("con_ar_cos", "ar_grad_norm", "con_grad_norm"):
            assert float(metrics[k]) == pytest.approx(float(stats[k]), abs=1e-5, rel=1e-5), k
        assert float(metrics["grad_norm"]) == pytest.approx(expect_norm, rel=1e-5)


def test_fsdp_step_keeps_activations_on_their_rows():
    """The compiled train step of tiny Gemma-2 (tied, E = 64) on (1,8,1), one row per device of
    [prompt 8, best 12, worse 12] = 32 tokens (training/loss.py packs them): no buffer spans the global
    batch's 8 rows x 32 tokens at more than E / 8 features (the width-split embedding lookup and the
    token ids are all that do), so the residual stream, attention, MLP and loss activations stay on
    their row's device; the per-device residual [1, 32, 64] is there."""
    compiled, _, rows = compile_train_step("tiny-gemma2", (1, 8, 1), prompt_len=8, response_len=12, chunk=4)
    shapes = set(re.findall(r"\b[a-z]+[0-9]*\[([0-9,]+)\]", compiled.as_text()))
    dims = [tuple(map(int, s.split(","))) for s in shapes]
    assert rows == 8 and (1, 32, 64) in dims
    global_wide = [d for d in dims if (d[:2] == (8, 32) and np.prod(d[2:]) > 8) or (d[0] == 256 and np.prod(d[1:]) > 8)]
    assert not global_wide, global_wide


@slow
def test_sigterm_and_sigkill_then_rerun_equal_an_uninterrupted_run(config_file, xla_cache_dir, reference, tmp_path):
    run_dir = tmp_path / "run"
    # SIGTERM mid-run: the step in flight finishes, a checkpoint of it is saved, exit 0.
    rc, out, seen = run_cli(config_file, run_dir, xla_cache_dir, kill_after=5, sig=signal.SIGTERM)
    assert rc == 0, out
    stopped_at = int(out.split("SIGTERM: stopped after step ")[1].split("/")[0])
    assert seen <= stopped_at < STEPS - 6
    # SIGKILL three steps past the next checkpoint (every 4 steps): the rerun resumes from that checkpoint
    # (or, should its asynchronous write not have finished by the kill, from the SIGTERM one).
    next_checkpoint = (stopped_at // 4 + 1) * 4
    rc, out, seen = run_cli(config_file, run_dir, xla_cache_dir, kill_after=next_checkpoint + 3, sig=signal.SIGKILL)
    assert rc == -signal.SIGKILL, out
    assert f"resuming {run_dir} from step {stopped_at}" in out
    rc, out, _ = run_cli(config_file, run_dir, xla_cache_dir)
    assert rc == 0, out
    resumed_from = int(out.split(f"resuming {run_dir} from step ")[1].split()[0])
    assert resumed_from in (next_checkpoint, stopped_at) and seen > next_checkpoint, out
    lines = read_metrics(run_dir)
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))  # the killed run's extra lines were replaced
    np.testing.assert_array_equal(losses(lines), losses(read_metrics(reference)))


@slow
def test_run_dir_is_a_model_for_refine_and_convert(reference, tiny_init_dir, tmp_path):
    trained = load_model(str(reference))  # what refine --model RUN_DIR does
    initial = load_model(str(tiny_init_dir))
    assert trained.tokenizer is not None and trained.tokenizer.chat_template
    moved = [
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(nnx.state(trained.model)), jax.tree.leaves(nnx.state(initial.model)))
    ]
    assert min(moved) > 0  # every parameter was trained
    assert convert.main(["to-hf", str(reference), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = np.array([trained.tokenizer("The capital of Australia is Canberra.")["input_ids"]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(trained.model(ids, np.arange(ids.shape[1])[None])[0])
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_config_errors_are_one_line(tmp_path, capsys):
    config_file = write_config(tmp_path / "tiny-test.yaml", "embedded", tmp_path / "data", **CHANGES)
    with pytest.raises(TrainConfigError, match=r"tiny-test.yaml: unknown key 'lr'"):
        load_config(config_file, ["lr=1e-3"])
    with pytest.raises(TrainConfigError, match=r"optimizer: learning_rate must be a number, got 'fast'"):
        load_config(config_file, ["optimizer.learning_rate=fast"])
    with pytest.raises(TrainConfigError, match=r"mesh must be 3 integers"):
        load_config(config_file, ["mesh=[2,2]"])
    with pytest.raises(TrainConfigError, match=r"output_dir is required"):
        load_config(config_file)
    with pytest.raises(TrainConfigError, match=r"loss.teacher=frozen needs lora.rank > 0"):
        load_config(config_file, ["output_dir=x", "loss.teacher=frozen"])
    with pytest.raises(TrainConfigError, match=r"loss.con_norm must be one of token, vocab, got 'mean'"):
        load_config(config_file, ["output_dir=x", "loss.con_norm=mean"])
    assert load_config(config_file, ["output_dir=x", "loss.teacher=frozen", "lora.rank=4"]).loss.teacher == "frozen"
    assert load_config(config_file, ["optimizer.learning_rate=1e-4", "output_dir=x"]).optimizer.learning_rate == 1e-4
    assert train_cli.main(["--config", str(config_file), "global_batch_size=12", f"output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "error: config: global_batch_size / grad_accum = 12 / 1 rows do not split over data x fsdp = 8 devices\n"
    )


@slow
def test_resume_refuses_a_changed_config_unless_allowed(config_file, tmp_path, capsys):
    run = ["--config", str(config_file), f"output_dir={tmp_path / 'run'}", "max_steps=3"]
    assert train_cli.main(run + ["stop_after=1"]) == 0
    capsys.readouterr()
    # what is trained changed: refused before anything loads, one line naming each key and both values
    assert train_cli.main(run + ["stop_after=2", "optimizer.learning_rate=1e-3", "prompt_len=32"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "resuming with a changed config (optimizer.learning_rate 0.003 -> 0.001; "
        "prompt_len 48 -> 32); pass --allow-config-change optimizer.learning_rate,prompt_len to accept"
        in err
    ), err
    # when it stops, logs and how it is laid out may change
    assert train_cli.main(run + ["stop_after=2", "log_every=1", "mesh=[2,-1,1]"]) == 0
    assert "resuming" in capsys.readouterr().out
    # an accepted change becomes the run's config
    assert train_cli.main(run + ["optimizer.learning_rate=1e-3", "--allow-config-change", "optimizer"]) == 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["optimizer"]["learning_rate"] == 1e-3
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]


def _loop_with_sigterm(monkeypatch, *, in_step=None, in_eval=None):
    """trainer._loop over fakes (no model, no devices): 5 steps, an evaluation due after each, SIGTERM sent
    while step `in_step` is in flight or during the evaluation after step `in_eval`. Returns (last step,
    stopped, the history's steps, events)."""
    monkeypatch.setattr(trainer, "global_batch", lambda batch, mesh: batch)
    cfg = load_config(None, ["data=d", "output_dir=o", "log_every=1", "save_every=100", "eval.every=1"])
    events, steps = [], []

    def train_step(state, batch):
        steps.append(len(steps) + 1)
        if steps[-1] == in_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return state, dict(loss=1.0, ar=1.0, con=0.0, grad_norm=1.0, lr=1e-3)

    class Loader:
        stats = {}

        def __next__(self):
            return {}

        def get_state(self):
            return {}

    class Checkpoints:
        def save(self, step, params, opt_state, data, force=False):
            if force:  # save_every=100: no save is due before
                events.append(("save", step))
            return force

    class Metrics:
        def write(self, record):
            events.append(("metrics", record["step"], "eval_ar" in record))

        def flush(self):
            events.append(("flush",))

    def evaluate(params):
        events.append(("eval",))
        if steps[-1] == in_eval:
            os.kill(os.getpid(), signal.SIGTERM)
        return dict(
            eval_ar=1.0,
            eval_con=0.0,
            eval_passes_per_token=1.0,
            eval_equal_best=1.0,
            eval_distinct=1.0,
            eval_seconds=0.0,
        )

    state = types.SimpleNamespace(params={}, opt_state=None, frozen={})
    history, step, stopped = trainer._loop(
        cfg, state, train_step, Loader(), None, Checkpoints(), Metrics(), evaluate, 0, 5, lambda _: None
    )
    return step, stopped, [m["step"] for m in history], events


def test_sigterm_skips_a_due_evaluation_and_saves(monkeypatch):
    """SIGTERM during a step after which an evaluation is due: the loop stops after that step without
    evaluating (the grace period is for the checkpoint), writes its metrics and saves it."""
    step, stopped, history, events = _loop_with_sigterm(monkeypatch, in_step=2)
    assert (step, stopped, history) == (2, True, [1, 2])
    assert events == [("eval",), ("metrics", 1, True), ("metrics", 2, False), ("save", 2), ("flush",)]


def test_sigterm_during_an_evaluation_stops_right_after_it(monkeypatch):
    """SIGTERM during the evaluation after step 2: the loop stops after it (metrics with the evaluation,
    a checkpoint of step 2), not after another train step."""
    step, stopped, history, events = _loop_with_sigterm(monkeypatch, in_eval=2)
    assert (step, stopped, history) == (2, True, [1, 2])
    assert events == [("eval",), ("metrics", 1, True), ("eval",), ("metrics", 2, True), ("save", 2), ("flush",)]


def test_metrics_of_steps_past_the_checkpoint_are_dropped_on_resume(tmp_path):
    lines = [json.dumps({"step": i, "loss": 1.0}) for i in range(1, 6)] + ['{"step": 6, "lo']  # killed mid-line
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    log = MetricsLog(tmp_path, start_step=3, tensorboard=False)
    log.write({"step": 4, "loss": 2.0})
    log.close()
    assert read_metrics(tmp_path) == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 1.0},
        {"step": 3, "loss": 1.0},
        {"step": 4, "loss": 2.0},
    ]


@pytest.mark.parametrize("preset", ["tiny", "smollm2-135m", "gemma-2-2b", "gemma-2-9b", "llama-3-8b"])
def test_presets_load(preset):
    cfg = load_config(ROOT / "configs" / "train" / f"{preset}.yaml", ["data=d", "output_dir=o"])
    if preset in ("tiny", "smollm2-135m"):  # the CPU presets: w = 1 on the draft's positions (README)
        assert (cfg.loss.con_weight, cfg.loss.con_norm, cfg.loss.con_positions) == (1.0, "token", "draft")
    else:  # the paper's settings: w = 1e3 read at its scale, w / V per token, on every position (README)
        assert (cfg.loss.con_weight, cfg.loss.con_norm, cfg.loss.con_positions) == (1000.0, "vocab", "all")
        assert cfg.response_len == 256 and cfg.num_epochs == 1 and cfg.optimizer.warmup_ratio == 0.03
        assert cfg.optimizer.learning_rate == 2e-6


def test_step_warms_the_consistency_weight_up_and_reads_it_per_vocabulary_entry(
    tiny_init_dir, trajectories_dir, config_file
):
    """loss.con_warmup_steps = 2, con_norm = vocab: the step's loss is L_AR + w_s L_Con with w_s = (1000 / V)
    min(1, s / 2) at update s = 0, 1, 2, 3."""
    cfg = load_config(
        config_file,
        ["output_dir=unused", "loss.con_norm=vocab", "loss.con_warmup_steps=2", "loss.con_positions=all"],
    )
    loaded = load_model(str(tiny_init_dir))
    graphdef, params = nnx.split(loaded.model)
    batch = next(iter(one_epoch(cfg, trajectories_dir, loaded.tokenizer)))
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    step, state = one_device_step(cfg, loaded.cfg, graphdef, nnx.to_pure_dict(params), mesh)
    for s, ramp in enumerate((0.0, 0.5, 1.0, 1.0)):
        state, m = step(state, global_batch(batch, mesh))
        w = 1000.0 / loaded.cfg.vocab_size * ramp
        assert float(m["con"]) > 1e-4
        assert float(m["loss"]) == pytest.approx(float(m["ar"]) + w * float(m["con"]), rel=1e-6), s
