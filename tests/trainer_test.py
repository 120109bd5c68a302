"""The sharded training loop on a tiny experiment (real MiniLM encoder, synthetic PEFT checkpoints)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dnd_jax import trainer
from dnd_jax.checkpointing import Checkpointer
from dnd_jax.errors import DndError
from dnd_jax.models import conv_paths
from tests import warm
from tests.train_fixtures import cli_env, cli_overrides, make_experiment, params_close, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return make_experiment(tmp_path_factory.mktemp("exp"))


@pytest.mark.needs_models
def test_sharded_step_matches_single_device_and_compiles_once(exp, tmp_path):
    assert jax.device_count() == 8
    # Adam's first steps are ~lr * sign(g): float32 reduction-order noise in a near-zero gradient flips
    # the sign. eps = 1 makes the update smooth in g, so parameters can be compared tightly.
    over = {"train.steps": 3, "train.eps": 1.0}
    sharded = trainer.train_and_evaluate(tiny_config(exp, **{"mesh.shape": (4, 2), **over}), tmp_path / "mesh")
    single = trainer.train_and_evaluate(
        tiny_config(exp, **{"mesh.shape": (1, 1), **over}), tmp_path / "one", devices=jax.devices()[:1]
    )
    assert sharded["traces"] == 1 and single["traces"] == 1  # 3 steps, one compilation
    # fsdp really shards the parameters: the largest kernel is split over the fsdp axis
    conv_l = sharded["state"]["params"]["layers"][1]["conv_l"]  # [3, 3, 8, 87]: 87 is odd, tokens_in is split
    assert tuple(conv_l.sharding.spec) == (None, None, "fsdp", None)
    assert conv_l.addressable_shards[0].data.shape == (3, 3, 4, 87)
    # Same math on 8 devices as on 1: only the reduction order differs (float32).
    np.testing.assert_allclose(sharded["last_metrics"]["loss"], single["last_metrics"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(sharded["last_metrics"]["grad_norm"], single["last_metrics"]["grad_norm"], rtol=1e-4)
    moved = params_close(sharded["state"]["params"], trainer_init(exp))
    assert moved > 1e-4  # the parameters did change
    assert params_close(sharded["state"]["params"], single["state"]["params"]) < 1e-7
    assert abs(sharded["heldout_wmse_end"] - single["heldout_wmse_end"]) < 1e-5


@pytest.mark.needs_models
def test_fft_convs_sharded_match_single_device(exp, tmp_path):
    """k = 9, conv_impl='fft': one device takes the FFT path (layer 0's ConvW1, layer 1's ConvW2); the
    4 x 2 mesh runs the same convs per batch shard in shard_map (conv_paths.conv); both train alike.
    Reverting to XLA-partitioned FFT convs fails this (scripts/fft_sharding_repro.py)."""

    assert conv_paths.fft_plan((8, 4, 16, 384), (9, 9, 384, 34), conv_paths._CONV_W) is not None
    over = {"train.steps": 2, "train.eps": 1.0, "model.kernel_size": 9, "model.conv_impl": "fft"}
    conv_paths.PATHS.clear()
    sharded = trainer.train_and_evaluate(tiny_config(exp, **{"mesh.shape": (4, 2), **over}), tmp_path / "mesh")
    assert conv_paths.PATHS["fft_sharded"] > 0 and conv_paths.PATHS["fft"] == 0
    conv_paths.PATHS.clear()
    single = trainer.train_and_evaluate(
        tiny_config(exp, **{"mesh.shape": (1, 1), **over}), tmp_path / "one", devices=jax.devices()[:1]
    )
    assert conv_paths.PATHS["fft"] > 0 and conv_paths.PATHS["fft_sharded"] == 0
    np.testing.assert_allclose(sharded["heldout_wmse_start"], single["heldout_wmse_start"], rtol=1e-5)
    np.testing.assert_allclose(sharded["last_metrics"]["loss"], single["last_metrics"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(sharded["last_metrics"]["grad_norm"], single["last_metrics"]["grad_norm"], rtol=1e-4)
    assert params_close(sharded["state"]["params"], single["state"]["params"]) < 1e-6


@pytest.mark.needs_models
def test_gemm_convs_sharded_match_single_device(exp, tmp_path):
    """bf16 layers with conv_impl='gemm' (one bf16 GEMM per conv, custom VJP) train alike on a 4 x 2 mesh
    (XLA partitions them) and on one device."""

    over = {"train.steps": 2, "train.eps": 1.0, "model.conv_impl": "gemm", "model.compute_dtype": "bfloat16"}
    conv_paths.PATHS.clear()
    sharded = trainer.train_and_evaluate(tiny_config(exp, **{"mesh.shape": (4, 2), **over}), tmp_path / "mesh")
    assert conv_paths.PATHS["gemm"] > 0
    single = trainer.train_and_evaluate(
        tiny_config(exp, **{"mesh.shape": (1, 1), **over}), tmp_path / "one", devices=jax.devices()[:1]
    )
    np.testing.assert_allclose(sharded["last_metrics"]["loss"], single["last_metrics"]["loss"], rtol=1e-4)
    np.testing.assert_allclose(sharded["last_metrics"]["grad_norm"], single["last_metrics"]["grad_norm"], rtol=1e-3)
    assert params_close(sharded["state"]["params"], single["state"]["params"]) < 1e-4


@pytest.mark.needs_models
def test_encoder_cache_trains_like_encoding_every_step(exp, tmp_path):
    """encoder.cache: each prompt is encoded once (on the host side of the step) and reused; without
    dropout the conditions are the same, so the run is the same as encoding inside every step."""
    over = {"train.steps": 4, "train.eps": 1.0, "encoder.train_dropout": False, "mesh.shape": (4, 2)}
    cached = trainer.train_and_evaluate(tiny_config(exp, **{**over, "encoder.cache": True}), tmp_path / "cached")
    plain = trainer.train_and_evaluate(tiny_config(exp, **over), tmp_path / "plain")
    # 12 prompts per dataset (3 datasets), 4 per sample, 8 samples x 4 steps + held-out batches: every
    # prompt drawn, each encoded once however often it was drawn
    assert cached["encoder_cache"] == {"alpha": 12, "beta": 12, "gamma": 12} and plain["encoder_cache"] is None
    np.testing.assert_allclose(cached["heldout_wmse_start"], plain["heldout_wmse_start"], rtol=1e-5)
    np.testing.assert_allclose(cached["last_metrics"]["loss"], plain["last_metrics"]["loss"], rtol=1e-5)
    assert params_close(cached["state"]["params"], plain["state"]["params"]) < 1e-6


def test_hidden_cache_encodes_each_prompt_once_and_fills_its_calls_with_undrawn_ones():
    """encoder.cache's store against a plain NumPy encoder: every row of every call is a distinct prompt until the pool
    is whole, each drawn prompt's output is its own row's, and a drawn prompt already encoded costs no call."""
    from dnd_jax.data.pairs import HiddenCache, PromptPool

    rng = np.random.default_rng(0)
    pool = PromptPool("p", rng.integers(0, 100, (70, 5)).astype(np.int32), np.ones((70, 5), np.int32))
    calls = []

    def encode(ids, mask):  # [C, L] -> [C, L, 2], row by row
        calls.append(ids.copy())
        return np.stack([ids * 2.0, ids + mask], -1).astype(np.float32)

    cache = HiddenCache(encode, 2, chunk=32)
    pool.cache = cache
    want = np.stack([pool.input_ids * 2.0, pool.input_ids + 1.0], -1)
    sel = np.array([5, 60, 5, 17])
    np.testing.assert_array_equal(pool.hidden(sel), want[sel])
    assert len(calls) == 1 and int(cache.store["p"][1].sum()) == 32  # 3 drawn + 29 not drawn yet
    encoded = np.flatnonzero(cache.store["p"][1])
    np.testing.assert_array_equal(pool.hidden(encoded), want[encoded])
    assert len(calls) == 1
    np.testing.assert_array_equal(pool.hidden(np.arange(70)), want)  # the other 38: two calls, the last padded
    assert len(calls) == 3 and cache.store["p"][1].all()
    rows = np.concatenate([np.unique(c, axis=0) for c in calls])
    assert len(rows) == 70 and len(np.unique(rows, axis=0)) == 70  # no prompt encoded twice


@pytest.mark.needs_models
def test_the_seed_is_a_runtime_input_same_keys_and_one_program_for_every_seed(exp, tmp_path, caplog):
    """config.seed enters the init and the train step at run time: the same keys and initial parameters as the
    constant seed (jax.random.key of a Python int), and a run with another seed reuses the compiled programs."""
    import logging

    from dnd_jax.objectives.recon import seed_array, step_key

    for s in (0, 999, 2**31 - 1):
        got = jax.jit(lambda x: jax.random.key_data(step_key(x, 7)))(seed_array(s))
        np.testing.assert_array_equal(got, jax.random.key_data(jax.random.fold_in(jax.random.key(s), 7)))
    init = trainer.make_init_state(tiny_config(exp, seed=5))
    runtime, constant = jax.device_get(jax.jit(init)(seed_array(5))), jax.device_get(jax.jit(init)())
    assert jax.tree.all(jax.tree.map(np.array_equal, runtime, constant))
    assert not jax.tree.all(jax.tree.map(np.array_equal, runtime, jax.device_get(jax.jit(init)(seed_array(6)))))
    # Every program of the seed-6 run comes from the persistent cache the seed-5 run filled.
    over = {"train.steps": 1, "mesh.shape": (1, 1)}
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        trainer.train_and_evaluate(tiny_config(exp, seed=5, **over), tmp_path / "s5", devices=jax.devices()[:1])
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="jax._src.compiler"):
            trainer.train_and_evaluate(tiny_config(exp, seed=6, **over), tmp_path / "s6", devices=jax.devices()[:1])
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
    hits = " ".join(r.getMessage() for r in caplog.records if "cache hit" in r.getMessage())
    assert "'jit_counted'" in hits and "'jit_init_state'" in hits, hits[-2000:]


def trainer_init(exp):
    from flax import nnx

    from dnd_jax.models.hyperconv import HyperConvDecoder

    cfg = tiny_config(exp)
    model = HyperConvDecoder(trainer.generator_config(cfg), nnx.Rngs(params=cfg.seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_loss_is_the_weighted_mse_numpy_oracle():
    rng = np.random.default_rng(0)
    pred, tgt = rng.standard_normal((2, 5, 3, 4)), rng.standard_normal((2, 5, 3, 4))
    tgt[0, 1, 2, 3] = np.nan
    w = rng.random(5)
    valid = ~np.isnan(tgt)
    expect = np.sum((w[None, :, None, None] * (pred - np.nan_to_num(tgt)) ** 2)[valid]) / valid.sum()
    got = trainer.weighted_mse(pred.astype(np.float32), tgt.astype(np.float32), w.astype(np.float32))
    np.testing.assert_allclose(float(got), expect, rtol=1e-5)


def _train_cmd(exp: Path, workdir: Path, steps: int) -> list[str]:
    over = cli_overrides(exp, **{"train.steps": steps, "train.checkpoint_every": 2})
    return [sys.executable, "-m", "dnd_jax.train", "--config", str(REPO / "configs/arc_c.py:smoke"),
            f"--workdir={workdir}", *over]  # fmt: skip


def test_paper_config_without_a_collection_names_the_collect_command(tmp_path):
    r = warm.run([sys.executable, "-m", "dnd_jax.train", "--config", str(REPO / "configs/arc_c.py"),
                        "--workdir", str(tmp_path / "w")], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data/common_sense_reasoning/ARC-e: no checkpoints of dataset 'ARC-e'")
    assert "python -m dnd_jax.collect --config configs/collect/commonsense_smollm2.py --datasets ARC-e,OBQA," in last
    assert "Traceback" not in r.stderr and not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.needs_models
def test_one_writer_per_workdir_and_a_stale_lock_does_not_block(exp, tmp_path):
    from dnd_jax.fileio import workdir_lock

    work = tmp_path / "w"
    with workdir_lock(work, "train"):  # a live holder (this process, another open file)
        with pytest.raises(DndError, match=rf"w: in use by another train process, pid {os.getpid()} "):
            trainer.train_and_evaluate(tiny_config(exp, **{"train.steps": 1}), work)
    assert not (work / "config.json").exists()  # refused before writing anything
    (work / ".lock").write_text("train process, pid 999999")  # left by a killed run: no flock on it
    r = trainer.train_and_evaluate(tiny_config(exp, **{"train.steps": 1}), work)
    assert r["start_step"] == 0 and (work / "checkpoints" / "1").is_dir()


@pytest.mark.needs_models
def test_sigterm_saves_at_the_next_step_and_exits_0(exp, tmp_path):
    """What TPU VMs and SLURM send before preemption: save, exit 0 with a line saying how to resume."""
    env = cli_env()
    work, steps = tmp_path / "w", 16  # the signal comes after step 3 or 4 (one step: ~0.3 s); the resume runs the rest
    cmd = [*_train_cmd(exp, work, steps), "--config.train.checkpoint_every=1000", "--config.train.log_every=1"]
    p = warm.popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if (work / "metrics.jsonl").is_file() and len((work / "metrics.jsonl").read_text().splitlines()) > 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    line = err.strip().splitlines()[-1]
    stopped = int(line.split("after step ")[1].split(";")[0])
    assert line == (f"stopped by SIGTERM after step {stopped}; its checkpoint is in {work}/checkpoints; "
                    "re-run the same command to resume")  # fmt: skip
    assert 3 <= stopped < steps and Checkpointer(work / "checkpoints").all_steps() == [stopped]
    again = warm.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and f"resumed from step {stopped}" in again.stderr, again.stderr[-2000:]
    assert Checkpointer(work / "checkpoints").latest_step() == steps


def test_config_typo_is_one_line(exp, tmp_path):
    r = warm.run([*_train_cmd(exp, tmp_path / "w", 2), "--config.train.batchsize=4"],
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "batchsize" in r.stderr


@pytest.mark.parametrize("field,value,message", [
    ("data.collection_dir", "nowhere", "no checkpoints of dataset"),
    ("model.features", ((4, 16, 384), (8, 8, 34), (90, 10, 34)), "differs from config model.features[-1]"),
    ("data.train_datasets", ("alpha", "gamma"), "is also a training dataset"),
    ("train.batch_size", 6, "not divisible"),
    pytest.param("encoder.cache", True, "needs encoder.train_dropout=False", marks=pytest.mark.needs_models),
])  # fmt: skip
def test_bad_setup_fails_before_compiling(exp, tmp_path, monkeypatch, field, value, message):
    compiled = []
    monkeypatch.setattr(trainer.jax, "jit", lambda *a, **k: compiled.append(1))
    with pytest.raises(DndError, match=message.replace("[", r"\[").replace("]", r"\]")):
        trainer.train_and_evaluate(tiny_config(exp, **{field: value}), tmp_path / "w")
    assert not compiled
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_empty_collection_folder(exp, tmp_path):
    for name in ("alpha", "beta", "gamma"):  # folders present (missing ones are another error), alpha empty
        (tmp_path / "collect" / name).mkdir(parents=True)
    with pytest.raises(DndError, match="collect/alpha"):
        trainer.train_and_evaluate(
            tiny_config(exp, **{"data.collection_dir": str(tmp_path / "collect")}), tmp_path / "w"
        )


def test_paper_generator_state_fits_16gb_devices_when_sharded():
    """1.1 B parameters + AdamW moments (13.4 GB in float32) spread over an 8-way fsdp mesh."""
    import math

    from flax import nnx

    from configs import arc_c
    from dnd_jax import sharding
    from dnd_jax.models.hyperconv import HyperConvDecoder

    cfg = arc_c.get_config()
    mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8}
    abstract = nnx.eval_shape(lambda: HyperConvDecoder(trainer.generator_config(cfg), nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    specs = nnx.to_pure_dict(sharding.param_specs(params, mesh, [tuple(r) for r in cfg.mesh.rules]))
    shapes = nnx.to_pure_dict(jax.tree.map(lambda v: v.shape, params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    total = per_device = 0
    for shape, spec in zip(jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)),
                           jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                           strict=True):  # fmt: skip
        n = math.prod(shape)
        split = 8 if "fsdp" in tuple(spec) else 1
        assert split == 8 or n < 2_000_000, (shape, spec)  # every large tensor is sharded
        total, per_device = total + n, per_device + n / split
    assert total == 1_113_203_220
    state_bytes = 3 * 4 * per_device  # params + Adam mu + nu, float32
    assert state_bytes < 2.0e9  # vs 13.4 GB unsharded: room for activations on a 16 GB device


def test_resume_may_change_how_often_it_saves_but_not_what_it_computes():
    from dnd_jax.config_cli import check_same_config

    saved = {"train": {"steps": 60, "learning_rate": 1e-3, "checkpoint_every": 100, "keep_checkpoints": 2}}
    check_same_config(saved, {"train": {**saved["train"], "checkpoint_every": 10, "keep_checkpoints": 5}}, "w")
    with pytest.raises(DndError, match=r"w: .*train.learning_rate: 0.001 -> 0.0003"):
        check_same_config(saved, {"train": {**saved["train"], "checkpoint_every": 10, "learning_rate": 3e-4}}, "w")
