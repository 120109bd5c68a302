"""PEFT <-> JAX converters, checked against PEFT itself (round trip, loading) and PyTorch (oracle)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import converters
from converters import jax_to_peft, peft_to_jax

from lora_fixtures import VARIANTS, adapter_config, adapter_state, base_model, make_adapter, save_base_config

REPO = Path(__file__).resolve().parents[1]


def _roundtrip(src: Path, tmp: Path) -> Path:
    params, spec = converters.load_peft_adapter(src)
    converters.save_pytree(tmp / "lora.safetensors", params, spec)
    params2, spec2, steps = converters.load_pytree(tmp / "lora.safetensors")
    assert steps is None and spec2 == spec
    return converters.save_peft_adapter(params2, spec2, tmp / "back")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_roundtrip_bit_identical_and_loads_in_peft(variant, tmp_path):
    _, src = make_adapter(variant, tmp_path / "src")
    out = _roundtrip(src, tmp_path)
    orig, back = adapter_state(src), load_file(out / "adapter_model.safetensors")
    assert sorted(orig) == sorted(back)
    for k in orig:
        assert orig[k].dtype == back[k].dtype, k
        assert torch.equal(
            orig[k].view(torch.uint8) if orig[k].dtype != torch.float32 else orig[k],
            back[k].view(torch.uint8) if back[k].dtype != torch.float32 else back[k],
        ), k
        assert orig[k].view(torch.int8).flatten().equal(back[k].view(torch.int8).flatten()), k
    assert adapter_config(src) == adapter_config(out)

    # PEFT loads it with every key present and no extra key, and computes the same logits.
    v = VARIANTS[variant]
    dtype = v.get("dtype", torch.float32)
    loaded = PeftModel.from_pretrained(base_model(v["arch"]).to(dtype), out).eval()
    sd = get_peft_model_state_dict(loaded)
    assert sorted(sd) == sorted(orig)
    for k in orig:
        assert torch.equal(sd[k], orig[k]), k
    reference = PeftModel.from_pretrained(base_model(v["arch"]).to(dtype), src).eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
        assert not torch.equal(loaded(ids).logits, base_model(v["arch"]).to(dtype)(ids).logits)


@pytest.mark.parametrize("variant", ["qwen_plain", "qwen_rslora", "qwen_rank_pattern", "qwen_subset", "gpt2_conv1d"])
def test_jax_delta_matches_peft_layer_output(variant, tmp_path):
    """Oracle: x @ lora_a @ lora_b * scale in JAX == PEFT layer output - base layer output in PyTorch."""
    peft_model, src = make_adapter(variant, tmp_path / "src")
    params, spec = converters.load_peft_adapter(src)
    assert len(spec.modules) > 0
    for m in spec.modules:
        layer = peft_model.base_model.model.get_submodule(m.path)
        x = torch.randn(3, 5, m.in_features)
        with torch.no_grad():
            want = (layer(x) - layer.base_layer(x)).numpy()
        node = converters.get_module(params, spec, m.path)
        got = np.asarray(converters.lora_delta(x.numpy(), node["lora_a"], node["lora_b"], m.scale))
        assert np.abs(got - want).max() < 1e-5, (m.path, np.abs(got - want).max())
        assert np.abs(want).max() > 1e-3  # a real, non-trivial delta


def test_spec_resolves_patterns_like_peft(tmp_path):
    peft_model, src = make_adapter("qwen_rank_pattern", tmp_path / "src")
    _, spec = converters.load_peft_adapter(src)
    for m in spec.modules:
        layer = peft_model.base_model.model.get_submodule(m.path)
        assert m.rank == layer.r["default"]
        assert m.scale == pytest.approx(layer.scaling["default"])
    assert spec.prefix == "model"
    assert spec.tree_path(spec.modules[0]) == ("layers", "0", "mlp", "down_proj")
    _, spec_rs = converters.load_peft_adapter(make_adapter("qwen_rslora", tmp_path / "rs")[1])
    assert spec_rs.modules[0].scale == pytest.approx(16 / np.sqrt(8))


def test_pytree_layout_is_flax_kernel(tmp_path):
    _, src = make_adapter("qwen_plain", tmp_path / "src")
    params, _spec = converters.load_peft_adapter(src)
    sd = adapter_state(src)
    q = params["layers"]["1"]["self_attn"]["k_proj"]
    a = sd["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"].numpy()
    b = sd["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].numpy()
    assert q["lora_a"].shape == (64, 8) and q["lora_b"].shape == (8, 32)
    np.testing.assert_array_equal(q["lora_a"], a.T)
    np.testing.assert_array_equal(q["lora_b"], b.T)


def _make_collection(tmp: Path, steps, variant="qwen_plain") -> Path:
    folder = tmp / "collection"
    for i, s in enumerate(steps):
        make_adapter(variant, folder / f"step-{s}", seed=i)
    (folder / "manifest.json").write_text("{}")
    return folder


def test_batch_stacks_in_numeric_step_order(tmp_path):
    folder = _make_collection(tmp_path, [10, 2, 100])
    params, _spec, steps, names = converters.load_peft_batch(folder)
    assert steps == [2, 10, 100] and names == ["step-2", "step-10", "step-100"]
    for i, s in enumerate(steps):
        single, _ = converters.load_peft_adapter(folder / f"step-{s}")
        row = converters.select_row(params, i)
        for k, v in converters.flatten(single).items():
            np.testing.assert_array_equal(converters.flatten(row)[k], v)
    # CLI: batch to file, then one step back to PEFT, bit-identical.
    out = tmp_path / "batch.safetensors"
    assert peft_to_jax.main(["--batch", str(folder), str(out)]) == 0
    _, _, steps2 = converters.load_pytree(out)
    assert steps2 == [2, 10, 100]
    assert jax_to_peft.main([str(out), str(tmp_path / "s10"), "--step", "10"]) == 0
    a, b = adapter_state(folder / "step-10"), adapter_state(tmp_path / "s10")
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(a) == sorted(b)
    assert jax_to_peft.main([str(out), str(tmp_path / "all"), "--all"]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["step-000002", "step-000010", "step-000100"]


def test_batch_reads_original_flat_layout(tmp_path):
    _, src = make_adapter("qwen_subset", tmp_path / "a")
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(src / "adapter_config.json", flat)
    for s in (3, 20):
        shutil.copy(src / "adapter_model.safetensors", flat / f"{s}.safetensors")
    _, spec, steps, _ = converters.load_peft_batch(flat)
    assert steps == [3, 20] and len(spec.modules) == 4


def test_base_config_check_passes_on_matching_base(tmp_path):
    for variant in ("qwen_plain", "gpt2_conv1d"):
        _, src = make_adapter(variant, tmp_path / variant)
        cfg = save_base_config(VARIANTS[variant]["arch"], tmp_path / f"base-{variant}")
        converters.load_peft_adapter(src, base_config=cfg)


# ---- bad input: one clear line naming the file and key, exit 2, no partial output -------------


def _run_cli(main, argv, capsys):
    from dnd_jax.errors import run_cli

    capsys.readouterr()  # drop what building the fixtures printed
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    return e.value.code, err


def _assert_clean_failure(main, argv, capsys, out: Path, *needles):
    code, err = _run_cli(main, argv, capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]
    return err


def test_missing_config(tmp_path, capsys):
    _, src = make_adapter("qwen_plain", tmp_path / "src")
    (src / "adapter_config.json").unlink()
    _assert_clean_failure(
        peft_to_jax.main,
        [str(src), str(tmp_path / "o.safetensors")],
        capsys,
        tmp_path / "o.safetensors",
        "adapter_config.json",
    )


def test_missing_adapter_dir(tmp_path, capsys):
    _assert_clean_failure(
        peft_to_jax.main,
        [str(tmp_path / "nope"), str(tmp_path / "o.safetensors")],
        capsys,
        tmp_path / "o.safetensors",
        "nope",
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header"])
def test_corrupt_safetensors(tmp_path, capsys, damage):
    _, src = make_adapter("qwen_plain", tmp_path / "src")
    f = src / "adapter_model.safetensors"
    raw = f.read_bytes()
    if damage == "garbage":
        f.write_bytes(b"\x00\x01garbage" * 3)
    elif damage == "truncated":
        f.write_bytes(raw[: len(raw) - 100])
    else:
        f.write_bytes(raw[:8] + b"[" + raw[9:])
    err = _assert_clean_failure(
        peft_to_jax.main,
        [str(src), str(tmp_path / "o.safetensors")],
        capsys,
        tmp_path / "o.safetensors",
        "adapter_model.safetensors",
    )
    if damage == "truncated":
        assert "truncated" in err and "key 'base_model.model." in err


def test_key_with_no_matching_layer(tmp_path, capsys):
    _, src = make_adapter("qwen_subset", tmp_path / "src")
    sd = load_file(src / "adapter_model.safetensors")
    sd = {k.replace("layers.2.self_attn.q_proj", "layers.2.self_attn.zz_proj"): v for k, v in sd.items()}
    save_file(sd, src / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = save_base_config("qwen2", tmp_path / "base")
    _assert_clean_failure(
        peft_to_jax.main,
        [str(src), str(tmp_path / "o.safetensors"), "--base-config", str(cfg)],
        capsys,
        tmp_path / "o.safetensors",
        "zz_proj",
        "no linear layer",
        "adapter_model.safetensors",
    )


def test_shape_that_does_not_fit_base(tmp_path, capsys):
    _, src = make_adapter("qwen_plain", tmp_path / "src")
    cfg = save_base_config("qwen2", tmp_path / "base")
    d = json.loads(cfg.read_text())
    d["intermediate_size"] = 80
    cfg.write_text(json.dumps(d))
    _assert_clean_failure(
        peft_to_jax.main,
        [str(src), str(tmp_path / "o.safetensors"), "--base-config", str(cfg)],
        capsys,
        tmp_path / "o.safetensors",
        "does not fit",
        "layers.0.mlp.down_proj",
        "[96->64]",
    )


def test_mixed_ranks_in_batch(tmp_path, capsys):
    folder = _make_collection(tmp_path, [1, 2])
    shutil.rmtree(folder / "step-2")
    _, _odd = make_adapter("qwen_rank_pattern", folder / "step-2")
    err = _assert_clean_failure(
        peft_to_jax.main,
        ["--batch", str(folder), str(tmp_path / "o.safetensors")],
        capsys,
        tmp_path / "o.safetensors",
        "step-2",
        "mixed ranks",
    )
    assert "adapter_model.safetensors" in err


def test_empty_batch_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _assert_clean_failure(
        peft_to_jax.main,
        ["--batch", str(tmp_path / "empty"), str(tmp_path / "o.safetensors")],
        capsys,
        tmp_path / "o.safetensors",
        "no checkpoints",
    )


@pytest.mark.parametrize(
    "variant,needle",
    [
        ("dora", "DoRA"),
        ("modules_to_save", "modules_to_save"),
        ("embedding", "embeddings"),
        ("lora_bias", "lora_bias"),
    ],
)
def test_unsupported_variants_refused(tmp_path, capsys, variant, needle):
    from peft import LoraConfig, get_peft_model

    kw = {
        "dora": dict(use_dora=True, target_modules=["q_proj"]),
        "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "embedding": dict(target_modules=["q_proj", "embed_tokens"]),
        "lora_bias": dict(target_modules=["q_proj"], lora_bias=True),
    }[variant]
    m = get_peft_model(base_model("qwen2"), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
    m.save_pretrained(tmp_path / "src")
    _assert_clean_failure(
        peft_to_jax.main,
        [str(tmp_path / "src"), str(tmp_path / "o.safetensors")],
        capsys,
        tmp_path / "o.safetensors",
        needle,
    )


def test_jax_to_peft_refuses_shape_mismatch_and_keeps_existing_output(tmp_path, capsys):
    _, src = make_adapter("qwen_plain", tmp_path / "src")
    params, spec = converters.load_peft_adapter(src)
    params["layers"]["0"]["self_attn"]["q_proj"]["lora_a"] = np.zeros((64, 4), np.float32)
    converters.save_pytree(tmp_path / "bad.safetensors", params, spec)
    _assert_clean_failure(
        jax_to_peft.main,
        [str(tmp_path / "bad.safetensors"), str(tmp_path / "out")],
        capsys,
        tmp_path / "out",
        "q_proj",
        "do not match",
    )
    # An existing output is never clobbered without --overwrite.
    (tmp_path / "exists").mkdir()
    code, err = _run_cli(jax_to_peft.main, [str(tmp_path / "bad.safetensors"), str(tmp_path / "exists")], capsys)
    assert code == 2 and "already exists" in err


def test_cli_end_to_end_subprocess(tmp_path):
    _, src = make_adapter("qwen_bf16", tmp_path / "src")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-m", "converters.peft_to_jax", str(src), str(tmp_path / "x.safetensors")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert "bfloat16" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "converters.jax_to_peft", str(tmp_path / "x.safetensors"), str(tmp_path / "back")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    a, b = adapter_state(src), adapter_state(tmp_path / "back")
    assert all(torch.equal(a[k], b[k]) for k in a)
    r = subprocess.run(
        [sys.executable, "-m", "converters.peft_to_jax", str(tmp_path / "missing"), str(tmp_path / "y.safetensors")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
