"""Multi-process (multi-host) setup: one JAX process per host, all processes forming one global mesh.

Every process runs the same command. How the processes find each other:
- explicit flags `--coordinator HOST:PORT --num_processes N --process_id I` (what
  `python -m dnd_jax.launch` passes, and what any cluster without auto-detection needs);
- nothing, where JAX reads the cluster's environment itself: Cloud TPU pod slices, SLURM
  (`srun`, SLURM_NTASKS > 1), Open MPI (`mpirun`), or JAX_COORDINATOR_ADDRESS /
  JAX_NUM_PROCESSES / JAX_PROCESS_ID set by hand.
On the CPU backend the cross-process collectives use gloo (the launcher's local rehearsal).

A process that dies takes the others down within `heartbeat_timeout` seconds (JAX's coordination
service stops the survivors), or sooner when a collective notices the broken connection.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from dnd_jax.errors import DndError, multi_process_active

_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")  # fmt: skip


def define_flags() -> None:
    """The absl flags of the process setup (train uses absl; see `add_arguments` for argparse)."""
    from absl import flags

    flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 (multi-process runs without auto-detection)")
    flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator)")
    flags.DEFINE_integer("process_id", None, "this process's index, 0 .. num_processes - 1 (with --coordinator)")
    flags.DEFINE_integer("heartbeat_timeout", 100, "seconds before the processes give up on a silent peer")


def add_arguments(ap) -> None:
    """The same options for an argparse parser."""
    ap.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-process runs)")
    ap.add_argument("--num_processes", type=int, default=None, help="number of processes (with --coordinator)")
    ap.add_argument("--process_id", type=int, default=None, help="this process's index (with --coordinator)")
    ap.add_argument("--heartbeat_timeout", type=int, default=100, help="seconds before giving up on a silent peer")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               heartbeat_timeout: int = 100) -> bool:  # fmt: skip
    """Joins the processes into one JAX runtime when this is a multi-process run; returns whether it is.

    Must run before anything touches a JAX device.
    """
    explicit = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(explicit) and not all(explicit):
        raise DndError("--coordinator, --num_processes and --process_id go together (give all three or none)")
    if coordinator is not None:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DndError(f"--process_id {process_id} is not in 0 .. --num_processes - 1 = {num_processes - 1}")
        if ":" not in coordinator:
            raise DndError(f"--coordinator {coordinator!r}: expected HOST:PORT")
        if num_processes == 1:
            return False
    elif not any(os.environ.get(v) for v in _CLUSTER_ENV) or os.environ.get("SLURM_NTASKS") == "1":
        return False
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only; GPUs/TPUs use their own
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout,
                                   initialization_timeout=max(heartbeat_timeout, 60))  # fmt: skip
    except Exception as e:  # noqa: BLE001 - JAX raises RuntimeError/XlaRuntimeError/ValueError variants
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = coordinator or "from the environment"
        raise DndError(f"multi-process setup failed (coordinator {where}): {msg}") from None
    return True


active = multi_process_active  # whether this process has joined a multi-process JAX runtime


@contextlib.contextmanager
def one_line_runtime_errors():
    """In a multi-process run, a failed collective (most often: another process died) becomes one line."""
    import jax

    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not active():
            raise
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise DndError(f"process {jax.process_index()}: a cross-process step failed ({first[:200]}); "
                       "another process has probably died, see its output") from None  # fmt: skip


class StopOnSigterm:
    """SIGTERM (what TPU VMs and SLURM send before preemption) asks a loop to save and stop at its next
    step boundary: `requested(step)`. In a multi-process JAX run, JAX's preemption sync point makes every
    process stop at the same step (its coordination service hears the signal); in one process, a flag
    set by the handler (installed from the main thread only; `restore()` puts the old one back)."""

    def __init__(self, multi_process: bool = False):
        self.flag, self.old, self.multi = False, None, multi_process
        if not multi_process and threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.flag = True

    def requested(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag

    def restore(self) -> None:
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
            self.old = None
