"""tests/warm.py against a fresh interpreter: the same command line gives the same exit status, output, argv, cwd,
environment and tracebacks, and a warm command is a process of its own (signals reach it alone)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import warm

PROBE = """
import json, os, sys
if sys.argv[1:2] == ["raise"]:
    raise ValueError("boom")
if sys.argv[1:2] == ["interrupt"]:
    raise KeyboardInterrupt
if sys.argv[1:2] == ["quick"]:
    sys.exit(5)
if sys.argv[1:2] == ["sleep"]:
    import time
    print("ready", flush=True)
    time.sleep(60)
if sys.argv[1:2] == ["exit"]:
    sys.exit(sys.argv[2])
import atexit
atexit.register(lambda: print("atexit ran", file=sys.stderr))
line = sys.stdin.readline().strip()
print(json.dumps({"argv": sys.argv[1:], "argv0": os.path.basename(sys.argv[0]), "cwd": os.getcwd(),
                  "env": os.environ.get("PROBE_VALUE"), "xla": os.environ.get("XLA_FLAGS"), "stdin": line,
                  "name": __name__, "path0": sys.path[0]}))
sys.exit(int(os.environ.get("PROBE_STATUS", "0")))
"""


@pytest.fixture
def probe(tmp_path) -> tuple[list[str], dict]:
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "warm_probe.py").write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(warm.REPO), str(tmp_path / "mods")]))
    return [sys.executable, "-m", "warm_probe"], env


def _both(cmd, **kw):
    cold = subprocess.run(cmd, capture_output=True, text=True, **kw)
    hot = warm.run(cmd, capture_output=True, text=True, **kw)
    return cold, hot


def test_a_warm_command_behaves_as_a_fresh_interpreter(probe, tmp_path):
    cmd, env = probe
    env = dict(env, PROBE_VALUE="x y", PROBE_STATUS="3", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cold, hot = _both([*cmd, "a", "--b=c d"], env=env, cwd=tmp_path, input="from stdin\n")
    assert (hot.returncode, hot.stdout, hot.stderr) == (cold.returncode, cold.stdout, cold.stderr)
    assert cold.returncode == 3 and '"env": "x y"' in cold.stdout and '"stdin": "from stdin"' in cold.stdout
    assert "atexit ran" in hot.stderr and f'"cwd": "{tmp_path}"' in hot.stdout and '"name": "__main__"' in hot.stdout
    # A runtime variable (XLA_FLAGS) changes without a new server; a start-up one gets its own.
    servers = len(warm._servers)
    again = warm.run([*cmd, "a"], env=dict(env, XLA_FLAGS="x"), cwd=tmp_path, capture_output=True, text=True)
    assert '"xla": "x"' in again.stdout and len(warm._servers) == servers
    # An uncaught exception, sys.exit with a string, an uncaught KeyboardInterrupt (Python then ends by SIGINT).
    for args, status in ((["raise"], 1), (["exit", "message"], 1), (["interrupt"], -signal.SIGINT)):
        cold, hot = _both([*cmd, *args], env=env, cwd=tmp_path)
        assert hot.returncode == cold.returncode == status and hot.stdout == cold.stdout
        assert hot.stderr == cold.stderr  # the same traceback, from the command's own frames


def test_signals_reach_the_warm_command_alone(probe, tmp_path):
    cmd, env = probe
    for sig in (signal.SIGKILL, signal.SIGTERM):
        p = warm.popen([*cmd, "sleep"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready" and p.poll() is None and p.pid != os.getpid()
        p.send_signal(sig)
        assert p.wait(timeout=30) == -sig
        p.stdout.close()
    assert warm._servers[warm._import_env(env)].proc.poll() is None  # the server lives on
    with pytest.raises(subprocess.TimeoutExpired):
        p = warm.popen([*cmd, "sleep"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL)
        p.wait(timeout=0.2)
    p.kill()
    assert p.wait(timeout=30) == -signal.SIGKILL


def test_other_command_lines_go_to_subprocess(tmp_path):
    r = warm.run([sys.executable, "-c", "import sys; print(len(sys.modules) > 0)"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "True\n"
    assert not warm._warmable([sys.executable, str(Path(warm.__file__))])


def test_exit_statuses_of_commands_that_end_at_once_are_never_lost(probe, tmp_path):
    """Commands that end before the test looks (the pid and the status can arrive together), from two threads at
    once; a signal to one that has ended is ignored, as subprocess does."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    cmd, env = probe

    def ended(pid: int) -> bool:  # gone, or a zombie its parent (the server) has not reaped yet
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (FileNotFoundError, ProcessLookupError):
            return True

    def one(_):
        p = warm.popen([*cmd, "quick"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not ended(p.pid) and time.monotonic() < deadline:  # a sleep alone lost this race under load
            time.sleep(0.01)
        time.sleep(0.05)
        p.kill()  # it has ended: nothing happens
        return p.poll() if p.poll() is not None else p.wait(timeout=30)

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(one, range(6))) == [5] * 6
