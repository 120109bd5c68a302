"""Local multi-process launcher: N JAX processes on this machine forming one global mesh.

  python -m dnd_jax.launch --processes 2 --cpu_devices 4 -- \
      python -m dnd_jax.train --config configs/arc_c.py:smoke --workdir runs/train/arc_c_2proc

Starts the command N times with `--coordinator 127.0.0.1:<free port> --num_processes N
--process_id I` appended, exactly what each host of a pod or cluster runs (there JAX usually reads
the same from the environment, see dnd_jax/distributed.py). Use it to rehearse a multi-host run
before booking one: with `--cpu_devices K` each process gets K fake CPU devices (JAX_PLATFORMS=cpu,
gloo collectives), so 2 x 4 devices here is one 8-device mesh spanning two processes. With
`--gpus_per_process K` process I sees GPUs I*K .. I*K+K-1 (CUDA_VISIBLE_DEVICES).

Output lines are prefixed with [pI]. When a process fails, the others get `--grace` seconds to
stop on their own (JAX's coordination service stops them after their `--heartbeat_timeout`),
then are killed; the launcher exits with the first failure's status (2 when the status is a signal).
Ctrl-C / SIGTERM are passed on to every process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from dnd_jax.errors import DndError, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode("utf-8", "replace"))
        out.flush()


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def child_env(i: int, cpu_devices: int | None, gpus_per_process: int | None, base: dict | None = None) -> dict:
    """The environment of process i."""
    env = dict(os.environ if base is None else base)
    if cpu_devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={cpu_devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    if gpus_per_process:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * gpus_per_process + g) for g in range(gpus_per_process))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(command: list[str], processes: int, cpu_devices: int | None = None, gpus_per_process: int | None = None,
           port: int | None = None, grace: float = 30.0, heartbeat_timeout: int | None = None,
           out=None) -> int:  # fmt: skip
    """Runs `command` as `processes` coordinated processes; returns the launcher's exit status."""
    out = out or sys.stderr
    if processes < 1:
        raise DndError(f"--processes {processes}: need at least 1")
    if not command:
        raise DndError("no command to launch (put it after --, e.g. -- python -m dnd_jax.train ...)")
    port = port or free_port()
    procs, pumps = [], []
    for i in range(processes):
        args = [*command, "--coordinator", f"127.0.0.1:{port}", "--num_processes", str(processes),
                "--process_id", str(i)]  # fmt: skip
        if heartbeat_timeout is not None:
            args += ["--heartbeat_timeout", str(heartbeat_timeout)]
        try:
            p = subprocess.Popen(args, env=child_env(i, cpu_devices, gpus_per_process), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        except OSError as e:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            raise DndError(f"cannot start {command[0]!r}: {e.strerror}") from None
        procs.append(p)
        pumps.append(threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out), daemon=True))
        pumps[-1].start()
        print(f"launch: process {i} pid {p.pid} (coordinator 127.0.0.1:{port})", file=out, flush=True)

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ended: dict[int, float] = {}  # process index -> when it was seen to end
        first = None  # index of the first process that failed
        killed: set[int] = set()
        while len(ended) < len(procs):
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.monotonic()
                    if first is None and p.returncode != 0:
                        first = i
                        print(f"launch: process {i} failed ({_status(p.returncode)}); waiting up to {grace:g} s "
                              "for the others to stop", file=out, flush=True)  # fmt: skip
            if first is not None and time.monotonic() - ended[first] > grace:
                for i, p in enumerate(procs):
                    if i not in ended and i not in killed:
                        print(f"launch: killing process {i} (still running {grace:g} s after process {first} "
                              "failed)", file=out, flush=True)  # fmt: skip
                        os.killpg(p.pid, signal.SIGKILL)
                        killed.add(i)
            time.sleep(0.1)
        for t in pumps:  # all output printed before the summary
            t.join(timeout=5)
        if first is None:
            print(f"launch: all {processes} processes finished", file=out, flush=True)
            return 0
        others = ", ".join(f"process {i} {_status(p.returncode)} after {ended[i] - ended[first]:.1f} s"
                           for i, p in enumerate(procs) if i != first)  # fmt: skip
        code = procs[first].returncode
        print(f"launch: failed: process {first} ended with {_status(code)}; then {others or 'none'}",
              file=out, flush=True)  # fmt: skip
        return code if code > 0 else 2
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    else:
        command = []
    ap = argparse.ArgumentParser(prog="python -m dnd_jax.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--processes", type=int, required=True, help="number of processes")
    ap.add_argument("--cpu_devices", type=int, default=None, help="fake CPU devices per process (JAX_PLATFORMS=cpu)")
    ap.add_argument("--gpus_per_process", type=int, default=None, help="GPUs per process (CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    ap.add_argument("--grace", type=float, default=30.0, help="seconds the others get to stop after one fails")
    ap.add_argument("--heartbeat_timeout", type=int, default=None, help="passed on to each process")
    args = ap.parse_args(argv)
    return launch(command, args.processes, args.cpu_devices, args.gpus_per_process, args.port, args.grace,
                  args.heartbeat_timeout)  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
