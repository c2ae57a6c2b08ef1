"""Multi-process start-up with JAX's own distributed runtime (`jax.distributed`); nothing home-made.

Every CLI calls `initialize()` first, before touching a device. What it does, in order:
  - explicit: a coordinator address (flag or `DIFFPO_COORDINATOR`) with the process count and id
    (`DIFFPO_NUM_PROCESSES`, `DIFFPO_PROCESS_ID`): any machines, e.g. `launch/local_multiprocess.sh`;
  - auto: `DIFFPO_DISTRIBUTED=auto` lets JAX detect the cluster itself (Cloud TPU VM slices, SLURM,
    Open MPI): what `launch/tpu_pod.sh` and `launch/gpu_slurm.sbatch` set;
  - otherwise one process, and nothing to start.

Devices per process (`DIFFPO_LOCAL_DEVICE_IDS`): our launchers start one process per host, which must
take all of its host's GPUs; but under SLURM JAX assumes one process per GPU and, unless told otherwise,
restricts each process to GPU number SLURM_LOCALID (GPU 0 of 8 with one task per node). So with one
SLURM task per node (SLURM_NTASKS_PER_NODE=1, or as many tasks as nodes) `initialize` passes all the
node's GPUs (`local_device_ids`: as many as CUDA_VISIBLE_DEVICES lists, else SLURM_GPUS_ON_NODE; JAX
numbers them from 0 after CUDA_VISIBLE_DEVICES). Several tasks per node keep JAX's one GPU per task.
`DIFFPO_LOCAL_DEVICE_IDS=task` keeps JAX's default anyway, `=0,1,2,3` names the devices; JAX's own
JAX_LOCAL_DEVICE_IDS, when set, is left to JAX. Off SLURM, or with no GPU count known, JAX's default stands.

A process that dies must not leave the others hanging: the coordination service notices missing
heartbeats after `heartbeat_timeout_s` and terminates the survivors with an error naming the dead
task ("another task died"); start-up itself gives up after `init_timeout_s`.
On CPU, cross-process collectives use gloo (what the multi-process tests run on).

Several processes writing one output (a decode's OUTPUT, a training run dir) need a folder they all see:
a bucket URL or a shared filesystem. `check_shared_folder` makes sure at start-up, in seconds, rather
than process 0 failing after all the work (or each host resuming from different files).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import jax
import numpy as np

ENV_COORDINATOR = "DIFFPO_COORDINATOR"
ENV_NUM_PROCESSES = "DIFFPO_NUM_PROCESSES"
ENV_PROCESS_ID = "DIFFPO_PROCESS_ID"
ENV_MODE = "DIFFPO_DISTRIBUTED"
ENV_HEARTBEAT = "DIFFPO_HEARTBEAT_TIMEOUT_S"
ENV_LOCAL_DEVICES = "DIFFPO_LOCAL_DEVICE_IDS"
# what JAX's SLURM detection needs (jax/_src/clusters/slurm_cluster.py): it then sets one device per task
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class DistributedError(RuntimeError):
    """Inconsistent multi-process settings; str() is the message for the user."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r}: not an integer") from None


def _slurm_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def _slurm_tasks_per_node() -> int | None:
    """Tasks on each node of this SLURM step; None when the environment does not say."""
    per_node = _slurm_int("SLURM_NTASKS_PER_NODE")
    if per_node is not None:
        return per_node
    tasks, nodes = _slurm_int("SLURM_NTASKS"), _slurm_int("SLURM_STEP_NUM_NODES") or _slurm_int("SLURM_NNODES")
    return -(-tasks // nodes) if tasks and nodes else None


def _node_gpus() -> int | None:
    """The GPUs this process may use: those CUDA_VISIBLE_DEVICES lists, else SLURM_GPUS_ON_NODE."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    return _slurm_int("SLURM_GPUS_ON_NODE")


def local_device_ids() -> list[int] | None:
    """`local_device_ids` for jax.distributed.initialize (module doc): a list, or None for JAX's default."""
    value = os.environ.get(ENV_LOCAL_DEVICES, "").strip()
    if value == "task" or os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    if value:
        try:
            return [int(d) for d in value.split(",")]
        except ValueError:
            raise DistributedError(f"{ENV_LOCAL_DEVICES}={value!r}: expected 'task' or ids like 0,1,2,3") from None
    if not all(name in os.environ for name in _SLURM) or _slurm_tasks_per_node() != 1:
        return None
    gpus = _node_gpus()
    if not gpus:
        return None  # no GPUs (a CPU job), or none known
    return list(range(gpus))


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int | None = None,
    init_timeout_s: int = 300,
) -> bool:
    """Start jax.distributed when this is a multi-process run (see the module doc); True if it did.

    Arguments left as None are read from the environment (heartbeat: `DIFFPO_HEARTBEAT_TIMEOUT_S`,
    default 60 s). Safe to call twice."""
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    mode = os.environ.get(ENV_MODE, "")
    if coordinator is None and mode != "auto":
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise DistributedError(
                f"{num_processes} processes / process id {process_id} given without a coordinator address "
                f"(set --coordinator or {ENV_COORDINATOR}, or {ENV_MODE}=auto on a TPU slice / SLURM)"
            )
        return False
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise DistributedError(
                f"coordinator {coordinator} needs the process count and this process's id "
                f"({ENV_NUM_PROCESSES}, {ENV_PROCESS_ID} or the matching flags)"
            )
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"process id {process_id} is outside 0..{num_processes - 1}")
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = _env_int(ENV_HEARTBEAT) or 60
    devices = local_device_ids()
    # Cross-process collectives on CPU devices (a no-op for accelerators).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=devices,
        initialization_timeout=init_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    return True


def add_arguments(parser) -> None:
    """The multi-process flags every CLI shares (each defaults to its environment variable)."""
    group = parser.add_argument_group("multi-process (see launch/)")
    group.add_argument("--coordinator", help=f"host:port of process 0 (env {ENV_COORDINATOR})")
    group.add_argument("--num-processes", type=int, help=f"processes in the run (env {ENV_NUM_PROCESSES})")
    group.add_argument("--process-id", type=int, help=f"this process, 0-based (env {ENV_PROCESS_ID})")


def initialize_from_args(args) -> bool:
    return initialize(args.coordinator, args.num_processes, args.process_id)


def is_main_process() -> bool:
    """Process 0 writes metrics, logs and exports; every process takes part in collectives."""
    return jax.process_index() == 0


def _process_allgather(x: np.ndarray) -> np.ndarray:
    """[every process's x], stacked in process order (a collective: also a barrier)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def check_shared_folder(
    token,
    what: str,
    *,
    process: int | None = None,
    processes: int | None = None,
    gather: Callable[[np.ndarray], np.ndarray] | None = None,
) -> None:
    """With several processes, fail at once unless every process sees the folder of `token` (an
    epath.Path) as process 0 does: process 0 writes a random nonce to `token`, every process reads it
    back and compares with process 0's nonce (sent by an all-gather, not the folder), the verdicts are
    all-gathered and process 0 removes `token`. Every process then raises the same one-line
    DistributedError naming `what` (e.g. "--output PATH") and the first process that did not see it.
    Nothing with one process. `process`, `processes`, `gather` (an all-gather of int32 arrays): JAX's
    by default; tests simulate processes with their own."""
    process = jax.process_index() if process is None else process
    processes = jax.process_count() if processes is None else processes
    if processes == 1:
        return
    gather = gather or _process_allgather
    nonce = np.frombuffer(os.urandom(16), np.int32)
    if process == 0:
        with contextlib.suppress(OSError):  # then process 0 does not see its file: reported below, everywhere
            token.parent.mkdir(parents=True, exist_ok=True)
            token.write_text(nonce.tobytes().hex())
    want = np.asarray(gather(nonce), np.int32)[0].tobytes().hex()  # after process 0 wrote
    try:
        seen = token.read_text() == want
    except OSError:
        seen = False
    seen_by = np.asarray(gather(np.asarray([seen], np.int32))).reshape(-1)
    if process == 0:
        with contextlib.suppress(OSError):
            token.unlink()
    blind = [p for p in range(processes) if not seen_by[p]]
    if blind and blind[0] == 0:
        raise DistributedError(f"{what}: process 0 cannot write {token} and read it back")
    if blind:
        raise DistributedError(
            f"{what}: process {blind[0]} does not see the file process 0 wrote there "
            f"({token.name}); several processes need a shared folder (a bucket URL or a shared "
            "filesystem)"
        )
