"""SFT mode (dnd_jax/objectives/sft.py): the generator trained through a frozen LM on the tasks' own loss.

The tiny family of tests/sft_tasks.py (a random tiny Qwen2 with a byte tokenizer, the real MiniLM extractor):
learnability (the generator uses the prompts where the prompt-blind mt_lora cannot), sharding, resume after a
kill, and the CLI's one-line errors.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnd_jax import trainer
from dnd_jax.errors import DndError
from tests import warm
from tests.sft_tasks import all_tasks, write_family
from tests.train_fixtures import params_close, tiny_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.needs_models


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("family")
    return tmp, write_family(tmp)


def config(family, **extra):
    tmp, over = family
    return tiny_config(tmp, **{**over, **extra})


def heldout_nll(lm_dir: Path, prompts_dir: Path, scale) -> Callable[[str, dict], float]:
    """(task, lora) -> mean response NLL of `task`'s test items under `lora` (one adapter, no row axis), in the tiny
    LM (loaded once; one compiled program for every task and adapter)."""
    from dnd_jax.data.prompts import load_split
    from dnd_jax.models.causal_lm import load_causal_lm, response_nll
    from dnd_jax.objectives.sft import encode_examples, pad_examples

    lm, tok, _ = load_causal_lm(lm_dir)
    nll = jax.jit(lambda ids, mask, labels, rows: response_nll(lm, ids, mask, labels, rows, scale))

    @functools.cache
    def examples(task: str):  # each task's test items read and encoded once
        return pad_examples(encode_examples(tok, load_split(prompts_dir, f"{task}_test"), 64, task), 64,
                            tok.pad_token_id)  # fmt: skip

    def score(task: str, lora: dict) -> float:
        ex = examples(task)
        rows = jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (len(ex.ids), *np.shape(x))), lora)
        return float(nll(ex.ids, ex.mask, ex.labels, rows))

    return score


@pytest.mark.optimized  # 400 training steps: compiled for speed (tests/conftest.py)
def test_sft_generator_uses_the_prompts_where_mt_lora_cannot(family, tmp_path):
    """Trained on 8 tasks, on the 4 held-out ones (a hint with a phrasing never seen with it) the generated adapter
    beats the multi-task LoRA trained with the same loss, steps and batches; another task's prompts hurt it."""
    from dnd_jax.data.prompts import load_split
    from dnd_jax.generate import AdapterGenerator
    from dnd_jax.models.causal_lm import spec_scales

    tmp, _ = family
    # each prompt encoded once (exact: no encoder dropout here): 77 -> 69 s alone on 2 EPYC cores, the same numbers
    common = {"train.steps": 200, "train.learning_rate": 3e-3, "encoder.cache": True}
    gen_run = trainer.train_and_evaluate(config(family, **common, **{"train.objective": "sft"}), tmp_path / "sft")
    mt_run = trainer.train_and_evaluate(config(family, **common, **{"train.objective": "mt_lora"}), tmp_path / "mt")
    assert (tmp_path / "mt" / "adapter" / "adapter_config.json").is_file()
    # At step 0 both are the control adapter: the same held-out NLL, no distance from the control.
    np.testing.assert_allclose(gen_run["eval_start"]["heldout/nll"], mt_run["eval_start"]["heldout/nll"], rtol=1e-5)
    assert gen_run["eval_start"]["heldout/l2"] < 1e-10 and mt_run["eval_start"]["heldout/l2"] == 0.0
    # Both fit their training tasks (from ~12 nats at the control); mt_lora down to its floor, about
    # ln(4) / 5 tokens = 0.28 (it cannot tell the colours apart: the LM never sees the hint).
    fit_gen, fit_mt = gen_run["eval_end"]["trainfit/nll"], mt_run["eval_end"]["trainfit/nll"]
    assert fit_gen < 3.0 and 0.1 < fit_mt < 0.5, (fit_gen, fit_mt)
    gen = AdapterGenerator(tmp_path / "sft")
    scale = spec_scales(gen.layout.spec)
    mt_lora = jax.device_get(mt_run["state"]["params"])
    _, held = all_tasks()
    nll = heldout_nll(tmp / "lm", tmp / "prompts", scale)
    own, swapped, blind = [], [], []
    for i, task in enumerate(held):
        other = held[(i + 1) % len(held)]  # another hint: another colour
        for name, out in ((task, own), (other, swapped)):
            lora, _, _ = gen(gen.texts(load_split(tmp / "prompts", f"{name}_test", False)), 1)
            out.append(nll(task, jax.tree.map(lambda x: x[0], lora)))
        blind.append(nll(task, mt_lora))
    own, swapped, blind = map(np.mean, (own, swapped, blind))
    print(f"held-out response NLL: generator {own:.3f}, mt_lora {blind:.3f}, generator with swapped prompts "
          f"{swapped:.3f}")  # fmt: skip
    assert own < blind - 0.2
    assert swapped > own + 0.5


def test_sft_step_sharded_matches_single_device(family, tmp_path):
    over = {"train.steps": 3, "train.eps": 1.0, "train.objective": "sft"}
    sharded = trainer.train_and_evaluate(config(family, **over, **{"mesh.shape": (4, 2)}), tmp_path / "mesh")
    single = trainer.train_and_evaluate(config(family, **over, **{"mesh.shape": (1, 1)}), tmp_path / "one",
                                        devices=jax.devices()[:1])  # fmt: skip
    assert sharded["traces"] == 1 and single["traces"] == 1
    np.testing.assert_allclose(sharded["last_metrics"]["loss"], single["last_metrics"]["loss"], rtol=1e-5)
    assert params_close(sharded["state"]["params"], single["state"]["params"]) < 1e-6
    assert abs(sharded["eval_end"]["heldout/nll"] - single["eval_end"]["heldout/nll"]) < 1e-5
    # the generator starts at the control: its first output is the mean training tokens, exactly
    assert sharded["eval_start"]["heldout/generated_mean_square"] == 0.0


@pytest.mark.parametrize("objective", ["sft", "mt_lora"])
def test_microbatches_give_the_whole_batch_loss_and_gradient(family, tmp_path, objective):
    """sft.microbatches=4 runs the step's rows in 4 groups (lax.scan), gradients summed: the second step's loss, its
    terms and the gradient norm equal the one-pass step's (noise off, so both draw nothing random; after one AdamW
    step the parameters differ by rounding only, and the L2 term is no longer 0)."""
    over = {"train.steps": 2, "train.objective": objective, "train.noise_condition": 0.0, "mesh.shape": (1, 1)}
    one, four = (trainer.train_and_evaluate(config(family, **over, **{"sft.microbatches": g}), tmp_path / str(g),
                                            devices=jax.devices()[:1]) for g in (1, 4))  # fmt: skip
    for name in ("loss", "nll", "l2", "grad_norm"):
        np.testing.assert_allclose(four["last_metrics"][name], one["last_metrics"][name], rtol=1e-3, err_msg=name)
    assert one["last_metrics"]["grad_norm"] > 0 and one["last_metrics"]["l2"] > 0
    with pytest.raises(DndError, match=r"sft.microbatches=3: needs .* train.batch_size \(8\)"):
        trainer.train_and_evaluate(config(family, **over, **{"sft.microbatches": 3}), tmp_path / "3",
                                   devices=jax.devices()[:1])  # fmt: skip
    assert not (tmp_path / "3").exists()  # nothing written


def test_sft_plus_recon_adds_the_weighted_reconstruction_loss(family, tmp_path):
    over = {"train.steps": 1, "train.objective": "sft+recon", "sft.recon_weight": 0.5, "sft.l2": 0.01,
            "mesh.shape": (1, 1)}  # fmt: skip
    r = trainer.train_and_evaluate(config(family, **over), tmp_path / "w", devices=jax.devices()[:1])
    m = r["last_metrics"]
    assert float(m["recon"]) > 0 and float(m["nll"]) > 0
    np.testing.assert_allclose(float(m["loss"]), float(m["nll"]) + 0.01 * float(m["l2"]) + 0.5 * float(m["recon"]),
                               rtol=1e-6)  # fmt: skip


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("train.objective", "sfx", "train.objective: 'sfx' (expected one of recon, sft, sft+recon, mt_lora)"),
        ("train.batch_size", 16, "a step draws that many distinct training tasks and there are 8"),
        ("sft.examples", 30, "fewer than sft.examples=30"),
    ],
)
def test_bad_sft_settings_are_one_line(family, tmp_path, field, value, message):
    with pytest.raises(DndError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        trainer.train_and_evaluate(config(family, **{"train.objective": "sft", field: value}), tmp_path / "w")
    assert not (tmp_path / "w").exists()  # nothing half-written


def _cli(family, work: Path, **extra) -> list[str]:
    _, over = family
    over = {**over, "train.objective": "sft", "train.steps": 6, "train.checkpoint_every": 2, **extra}
    flags = [f"--config.{k}={v}" for k, v in over.items()]
    return [sys.executable, "-m", "dnd_jax.train", "--config", str(REPO / "configs/arc_c.py:smoke"),
            f"--workdir={work}", *flags]  # fmt: skip


def test_cli_sft_resumes_after_a_kill_bit_identically(family, tmp_path):
    """An SFT run from the CLI (configs/arc_c.py:smoke pointed at the tiny family), killed (SIGKILL) after its step-2
    checkpoint, resumes to the same state as an uninterrupted run; a bad objective is one line and exit 2."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}  # the other tests' warm server
    bad = warm.run(_cli(family, tmp_path / "bad", **{"train.objective": "nope"}), env=env, cwd=REPO,
                         capture_output=True, text=True)  # fmt: skip
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert "train.objective: 'nope'" in errors[0]
    full = trainer.train_and_evaluate(config(family, **{"train.objective": "sft", "train.steps": 6,
                                                         "train.checkpoint_every": 2}), tmp_path / "full")  # fmt: skip
    assert full["traces"] == 1
    work = tmp_path / "killed"
    proc = warm.popen(_cli(family, work), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    while proc.poll() is None and not (work / "checkpoints" / "2").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.perf_counter()
    again = warm.run(_cli(family, work), env=env, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step" in again.stderr and "held-out response NLL" in again.stdout
    print(f"resumed SFT run from the CLI: {time.perf_counter() - t0:.1f} s")
    from tests.kill_trials_test import _restore_all

    a, b = _restore_all(work / "checkpoints"), _restore_all(tmp_path / "full" / "checkpoints")
    assert 6 in a and 6 in b
    for x, y in zip(jax.tree.leaves(a[6]), jax.tree.leaves(b[6]), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))  # parameters, Adam moments, step: bit-identical
