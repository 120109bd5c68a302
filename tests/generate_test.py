"""generate: a trained tiny workdir -> PEFT adapters that load with zero missing keys and act on the model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from peft.utils import get_peft_model_state_dict

from converters.pytree import flatten
from converters.safetensors_io import load as load_safetensors
from dnd_jax import generate, lora_tokens, trainer
from dnd_jax.data import pairs
from dnd_jax.data.prepare import open_token_set
from dnd_jax.errors import DndError
from dnd_jax.extractors import load_tokenizer
from tests import warm
from tests.lora_fixtures import base_model
from tests.train_fixtures import NAMES, make_experiment, tiny_config

pytestmark = pytest.mark.needs_models  # every test here loads SmolLM2 or all-MiniLM-L6-v2
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    exp = make_experiment(tmp_path_factory.mktemp("gen"))
    trainer.train_and_evaluate(tiny_config(exp, **{"train.steps": 2}), exp / "wd")
    return exp


def test_generate_cli_writes_peft_adapters_that_change_the_model(trained, tmp_path):
    prompts = trained / "prompts" / f"{NAMES[2]}_test.json"
    out = tmp_path / "gen"
    r = warm.run([sys.executable, "-m", "dnd_jax.generate", f"--workdir={trained / 'wd'}", f"--prompts={prompts}",
                        "--num-adapters=2", f"--out={out}", "--repeats=2"],
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "s per adapter" in r.stdout
    info = json.loads((out / "generation.json").read_text())
    assert info["step"] == 2 and info["num_adapters"] == 2

    base = base_model("qwen2")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
    weights = []
    for k in range(2):
        d = out / f"adapter-{k}"
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == (8, 16, "tiny-qwen2")
        saved, _ = load_safetensors(d / "adapter_model.safetensors")
        model = PeftModel.from_pretrained(base_model("qwen2"), str(d))
        loaded = get_peft_model_state_dict(model)
        assert set(loaded) == set(saved)  # zero missing, zero unexpected keys
        for key, v in saved.items():
            np.testing.assert_array_equal(loaded[key].numpy(), v)
        with torch.no_grad():
            delta = (model(ids).logits - ref).abs().max().item()
        assert delta > 1e-4  # the adapter is not a no-op
        weights.append(saved)
    # different prompt batches give different adapters
    key = next(iter(weights[0]))
    assert not np.array_equal(weights[0][key], weights[1][key])


def test_generated_weights_match_numpy_decoding(trained, tmp_path):
    """The compiled prompts -> LoRA call equals an eager forward + NumPy detokenization."""
    wd, exp = trained / "wd", trained
    r = generate.generate(wd, exp / "prompts" / f"{NAMES[2]}_test.json", tmp_path / "g", num_adapters=1, repeats=1)
    config, graphdef, params, _ = generate.load_run(wd)
    data_layout = open_token_set(exp / "tokens" / NAMES[0]).layout
    from dnd_jax.assets import resolve_model
    from dnd_jax.extractors import load_bert

    enc_dir = resolve_model(config.encoder.path)
    pool = pairs.tokenize_pool(load_tokenizer(enc_dir), "p", [
        rec["prompt"] for rec in json.loads((exp / "prompts" / f"{NAMES[2]}_test.json").read_text())], 16)  # fmt: skip
    ids, mask = pairs.prompt_batch(pool, 4, np.random.default_rng([config.seed, 7]))
    cond = load_bert(enc_dir)(ids[None], mask[None])
    tokens = np.asarray(nnx.merge(graphdef, params)(cond), np.float64)
    expect = lora_tokens.detokenize(tokens[0], data_layout)
    saved, _ = load_safetensors(r["adapters"][0] / "adapter_model.safetensors")
    a = saved["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    flat = flatten(expect)
    assert len(flat) == 2 * 7 * 3
    np.testing.assert_allclose(a, flat["layers/1/mlp/down_proj/lora_a"].T, atol=2e-5)
    b = saved["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    np.testing.assert_allclose(b, flat["layers/0/self_attn/k_proj/lora_b"].T, atol=2e-5)
    assert jax.device_count() == 8


@pytest.mark.parametrize("content,message", [
    (b"", "no prompts"),
    (b"\xff\xfe bad bytes\n", "not UTF-8"),
    (b"one prompt\ntwo prompts\n", "fewer than num_texts"),
])  # fmt: skip
def test_bad_prompts_file(trained, tmp_path, content, message):
    f = tmp_path / "prompts.txt"
    f.write_bytes(content)
    with pytest.raises(DndError, match=message):
        generate.generate(trained / "wd", f, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_workdir_without_checkpoint(trained, tmp_path):
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "config.json").write_text((trained / "wd" / "config.json").read_text())
    with pytest.raises(DndError, match="no generator checkpoint"):
        generate.generate(tmp_path / "wd", trained / "prompts" / "gamma_test.json", tmp_path / "out")
    with pytest.raises(DndError, match="not a training workdir"):
        generate.generate(tmp_path, trained / "prompts" / "gamma_test.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_from_offset_takes_the_offsets_a_tokens_exactly(trained, tmp_path):
    """experiment.predict "b_only": the generated A tokens are the given mean's, bit for bit; B^T are not."""
    from dnd_jax.trainer import b_token_mask

    layout = open_token_set(trained / "tokens" / NAMES[0]).layout
    mean = np.random.default_rng(3).normal(size=layout.shape).astype(np.float32)
    np.save(tmp_path / "mean.npy", mean)
    gen = generate.AdapterGenerator(trained / "wd", a_from=tmp_path / "mean.npy")
    texts = gen.texts(json.loads((trained / "prompts" / f"{NAMES[2]}_test.json").read_text()))
    tokens_fn = generate.make_generate_fn(gen.config, gen.graphdef, gen.enc_graphdef, layout, False, gen.residual)
    tokens = np.asarray(tokens_fn(*gen._args(texts, 2, None)))
    b = b_token_mask(layout).astype(bool)
    np.testing.assert_array_equal(tokens[:, ~b], np.broadcast_to(mean[~b], tokens[:, ~b].shape))
    assert not np.allclose(tokens[:, b], mean[b])
    plain = generate.AdapterGenerator(trained / "wd")  # trained on absolute tokens: no offset at all
    plain_fn = generate.make_generate_fn(plain.config, plain.graphdef, plain.enc_graphdef, layout, False, False)
    assert not np.allclose(np.asarray(plain_fn(*plain._args(texts, 2, None)))[:, ~b], mean[~b])


def test_cli_and_in_process_generation_are_one_path(trained, tmp_path):
    """The CLI and the experiment (AdapterGenerator on records, its default seed) give the same adapters."""
    prompts = trained / "prompts" / f"{NAMES[2]}_test.json"
    r = generate.generate(trained / "wd", prompts, tmp_path / "cli", num_adapters=2, repeats=1)
    gen = generate.AdapterGenerator(trained / "wd")
    lora, _, scales = gen(gen.texts(json.loads(prompts.read_text())), 2, repeats=1)
    paths = gen.save(lora, tmp_path / "exp", {"step": gen.step})
    for a, b in zip(r["adapters"], paths, strict=True):
        x, _ = load_safetensors(a / "adapter_model.safetensors")
        y, _ = load_safetensors(b / "adapter_model.safetensors")
        assert set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x)
    info = json.loads((tmp_path / "cli" / "generation.json").read_text())
    assert info["load_s"] > 0 and info["compile_s"] > 0 and info["condition"] == "prompts"
    # the count is of the tokens' decoded sigmas, read apart from the call that made the adapters
    tokens_fn = generate.make_generate_fn(gen.config, gen.graphdef, gen.enc_graphdef, gen.layout, False, gen.residual)
    tokens = np.asarray(tokens_fn(*gen._args(gen.texts(json.loads(prompts.read_text())), 2, None)))
    _, sigma = lora_tokens.decode_scales(tokens)
    assert scales == {"negative": int((sigma < 0).sum()), "chunks": sigma.size} and sigma.size == 2 * tokens.shape[1]
