"""Multi-host training rehearsed on one machine: 2 JAX processes x 4 CPU devices (gloo collectives)
form one 8-device mesh (data 4 x fsdp 2, each process holding half of it) and must train like one
process with 8 devices; its checkpoints restore in a 1-process run; a killed process stops the other."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dnd_jax import trainer
from tests import warm
from tests.train_fixtures import cli_overrides, make_experiment, params_close, tiny_config, user_env

pytestmark = pytest.mark.needs_models  # every test here loads SmolLM2 or all-MiniLM-L6-v2
REPO = Path(__file__).resolve().parents[1]
# Adam's first steps are ~lr * sign(g); eps = 1 keeps the update smooth in g (see trainer_test).
OVER = {"train.checkpoint_every": 2, "mesh.shape": (4, 2), "train.eps": 1.0}


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return make_experiment(tmp_path_factory.mktemp("exp"))


def _launch_cmd(exp: Path, workdir: Path, steps: int, *launch_flags: str) -> list[str]:
    over = cli_overrides(exp, **{**OVER, "train.steps": steps})
    return [sys.executable, "-m", "dnd_jax.launch", "--processes", "2", "--cpu_devices", "4", *launch_flags, "--",
            sys.executable, "-m", "dnd_jax.train", "--config", str(REPO / "configs/arc_c.py:smoke"),
            f"--workdir={workdir}", *over]  # fmt: skip


def _env() -> dict:
    return user_env()  # the launcher sets 4 devices per process


def _restore_params(workdir: Path, step: int):
    from dnd_jax.generate import load_run

    return load_run(workdir, step)[2]  # what generate reads, on one device


def _losses(workdir: Path) -> dict[int, float]:
    import json

    rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_two_processes_train_like_one_and_checkpoints_move_between_them(exp, tmp_path):
    steps = 4
    two = tmp_path / "two"
    r = warm.run(_launch_cmd(exp, two, steps), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(2 process(es), this is process 1)" in r.stderr and "launch: all 2 processes finished" in r.stderr
    assert "[p0] held-out weighted MSE" in r.stderr and "[p1] held-out" not in r.stderr  # process 0 reports
    one = trainer.train_and_evaluate(tiny_config(exp, **{**OVER, "train.steps": steps}), tmp_path / "one")
    assert jax.process_count() == 1 and jax.device_count() == 8

    # Same program, same shardings; only the cross-process all-reduces run through gloo instead of
    # in-process, which may sum in another order: float32 rounding (1e-7 relative) is all that may differ.
    l2, l1 = _losses(two), _losses(tmp_path / "one")
    assert sorted(l2) == sorted(l1) == [1, 2, 3, 4]
    np.testing.assert_allclose([l2[s] for s in l1], [l1[s] for s in l1], rtol=1e-6)
    p2 = _restore_params(two, steps)
    assert params_close(p2, one["state"]["params"]) < 1e-6
    assert params_close(p2, _restore_params(tmp_path / "one", 0 + 2)) > 1e-5  # the last steps did move them

    # Process 0 alone wrote the metrics (one line per step, no duplicates) and one TensorBoard event file,
    # readable by TensorBoard itself, with the same losses.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((two / "tensorboard").iterdir())
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    np.testing.assert_allclose([e.value for e in acc.Scalars("loss")], [l2[s] for s in sorted(l2)], rtol=1e-6)

    # The 2-process checkpoint at step 2 restores in a 1-process run, which continues identically.
    moved = tmp_path / "moved"
    shutil.copytree(two, moved)
    shutil.rmtree(moved / "checkpoints" / str(steps))
    cont = trainer.train_and_evaluate(tiny_config(exp, **{**OVER, "train.steps": steps}), moved)
    assert cont["start_step"] == 2
    assert params_close(cont["state"]["params"], one["state"]["params"]) < 1e-6


def test_a_killed_process_stops_the_other(exp, tmp_path):
    """SIGKILL process 1 mid-run: process 0 must stop by itself (JAX's heartbeat, here 5 s), not hang."""
    work = tmp_path / "w"
    cmd = _launch_cmd(exp, work, 100_000, "--grace", "60", "--heartbeat_timeout", "5")
    p = warm.popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True).start()
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if (work / "metrics.jsonl").is_file() and len((work / "metrics.jsonl").read_text().splitlines()) > 3:
            break  # both processes are inside the training loop
        time.sleep(0.1)
    assert p.poll() is None, "".join(lines)[-3000:]
    pid1 = int(next(ln for ln in lines if ln.startswith("launch: process 1 pid")).split()[4])
    os.kill(pid1, signal.SIGKILL)
    t0 = time.time()
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the surviving process did not stop within 60 s:\n" + "".join(lines)[-3000:])
    took = time.time() - t0
    time.sleep(0.3)
    out = "".join(lines)
    assert p.returncode != 0
    assert "launch: failed: process 1 ended with signal SIGKILL" in out, out[-3000:]
    assert "launch: killing process 0" not in out  # it stopped on its own, within the grace period
    assert took < 30, f"took {took:.1f} s"
