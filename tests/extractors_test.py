"""Extractor types (encoder.type): the Llama/Qwen2 port against PyTorch transformers, the static table against
NumPy lookups, load_extractor's errors, and a :smoke training run per type on the tiny experiment."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from converters import safetensors_io
from dnd_jax import extractors, generate, trainer
from dnd_jax.assets import MINILM_L6, SMOLLM2, minilm_path, smollm2_path
from dnd_jax.errors import DndError
from dnd_jax.models.decoder_lm import DecoderConfig, DecoderLM
from dnd_jax.models.encoder import tokenize_prompts
from tests.encoder_test import PROMPTS
from tests.train_fixtures import make_experiment, tiny_overrides


def _enc(kind: str, path: str, **extra) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"type": kind, "path": path, "dtype": "float32", **extra})


@pytest.mark.needs_models
def test_decoder_lm_matches_pytorch_llama_hidden_states_on_smollm2():
    """hidden_states[n] of transformers.LlamaModel (SmolLM2-135M-Instruct, fp32): the output of the first n
    decoder layers, no final norm; right-padded real prompts of many lengths, every position compared.

    SmolLM2 has massive activations (a few tokens reach |h| ~ 2.5e4 by layer 16), where float32 itself is
    only good to ~1e-2 absolute: PyTorch's fp32 result is 1.7e-2 from its float64 one. So layer 16 is
    held to a per-token relative error (max |error| / max |h| of that token) of 1e-4 (measured: 6e-6),
    and to absolute 1e-4 where fp32 is that accurate: after 1 layer, and at every token of layer 16
    whose |h| stays under 100 (most of them).
    """
    enc, tok = extractors.load_extractor(_enc("decoder_lm", SMOLLM2))
    assert enc.cfg.num_layers == 16 and enc.cfg.hidden_size == 576 and enc.cfg.num_kv_heads == 3  # 16 = 30 * 15/28
    assert enc.cfg.rope_theta == 100000.0
    ids, mask = tokenize_prompts(tok, PROMPTS[:10], 48)
    assert mask[:, 0].all() and not mask[:, -1].all() and len(set(mask.sum(1).tolist())) > 5  # right padding
    got = np.asarray(jax.jit(lambda m, a, b: m(a, b))(enc, ids, mask))
    one = np.asarray(extractors.load_decoder_lm(smollm2_path(), num_layers=1)(ids, mask))
    ref = transformers.AutoModel.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    assert type(ref).__name__ == "LlamaModel"
    args = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                output_hidden_states=True)  # fmt: skip
    with torch.no_grad():
        want, want1 = (h.numpy() for h in ref(**args).hidden_states[16:0:-15])
        want64 = ref.double()(**args).hidden_states[16].numpy()
    assert got.shape == want.shape == (10, 48, 576)
    scale = np.abs(want64).max(-1, keepdims=True)  # per token
    rel, rel64 = (np.abs(got - w) / scale for w in (want, want64))
    normal = scale[..., 0] < 100
    print(f"SmolLM2: 1 layer max abs err {np.abs(one - want1).max():.1e}; 16 layers max abs err "
          f"{np.abs(got - want).max():.1e} (PyTorch fp32 vs float64: {np.abs(want - want64).max():.1e}) at |h| <= "
          f"{scale.max():.0f}, per-token relative {rel.max():.1e} (vs float64 {rel64.max():.1e}), abs where |h| < "
          f"100 ({normal.mean():.0%} of tokens) {np.abs(got - want)[normal].max():.1e}")  # fmt: skip
    assert np.abs(one - want1).max() < 1e-4
    assert rel.max() < 1e-4 and rel64.max() < 1e-4
    assert normal.mean() > 0.5 and np.abs(got - want)[normal].max() < 2e-4
    # chunks of 3 texts (one padded text encoded and dropped) give the same states
    np.testing.assert_allclose(np.asarray(enc(ids, mask, chunk=3)) / scale, got / scale, atol=1e-5)


def test_decoder_lm_matches_pytorch_qwen2_with_biases(tmp_path):
    """A tiny random Qwen2Model (q/k/v biases, GQA 4:2, rope_theta 1e6) saved as safetensors, 2 of 3 layers."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                   max_position_embeddings=128)  # fmt: skip
    ref = transformers.Qwen2Model(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:  # init makes them 0 / 1: make the bias path visible
                p.add_(0.2 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    enc = extractors.load_decoder_lm(tmp_path, num_layers=2)
    assert enc.cfg.qkv_bias and enc.cfg.rope_theta == 1e6 and enc.cfg.head_dim == 16
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, (5, 24)).astype(np.int32)
    mask = (np.arange(24)[None] < np.array([24, 20, 9, 1, 15])[:, None]).astype(np.int32)
    got = np.asarray(enc(ids, mask))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                   output_hidden_states=True).hidden_states[2].numpy()  # fmt: skip
    print(f"tiny Qwen2: max abs err {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() < 1e-4


def test_decoder_lm_shapes_at_qwen25_7b_sizes():
    """The paper's extractor: Qwen2.5-7B-Instruct, 15 of 28 layers, 3584-d; shapes only (nothing allocated)."""
    cfg = transformers.Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                   rope_theta=1e6, rms_norm_eps=1e-6)  # fmt: skip
    dc = DecoderConfig.from_hf(cfg.to_dict(), "Qwen2.5-7B")
    assert (dc.num_layers, dc.head_dim, dc.num_kv_heads, dc.qkv_bias, dc.rope_theta) == (15, 128, 4, True, 1e6)
    abstract = nnx.eval_shape(lambda: DecoderLM(dc, dtype=jnp.bfloat16))
    graphdef, state = nnx.split(abstract)
    d, f, kv = 3584, 18944, 4 * 128
    per_layer = d * d + d + 2 * (d * kv + kv) + d * d + 3 * d * f + 2 * d
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(state)) == 152064 * d + 15 * per_layer
    ids = jax.ShapeDtypeStruct((2, 20, 384), jnp.int32)  # batch 2, the paper's 20 prompts, L 384
    out = jax.eval_shape(lambda s, i, m: nnx.merge(graphdef, s)(i, m), state, ids, ids)
    assert out.shape == (2, 20, 384, 3584) and out.dtype == jnp.bfloat16


@pytest.mark.needs_models
def test_static_matches_embedding_rows_looked_up_in_numpy():
    """static: MiniLM's word-piece embedding rows, no [CLS]/[SEP], [UNK] -> ones, padding -> zeros."""
    enc, tok = extractors.load_extractor(_enc("static", MINILM_L6))
    prompts = [*PROMPTS[:6], "unknown \u2603\u26c4 symbols"]
    ids, mask = tokenize_prompts(tok, prompts, 40)
    hf_tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    assert ids[0, 0] != hf_tok.cls_token_id and hf_tok.sep_token_id not in ids[mask == 1]
    assert (ids[-1][mask[-1] == 1] == hf_tok.unk_token_id).any()
    table = safetensors_io.load(minilm_path() / "model.safetensors")[0]["embeddings.word_embeddings.weight"]
    want = np.where((ids == hf_tok.unk_token_id)[..., None], 1.0, table[ids]) * mask[..., None]
    ref = transformers.BertModel.from_pretrained(minilm_path()).embeddings.word_embeddings.weight.detach().numpy()
    np.testing.assert_array_equal(table, ref)
    got = np.asarray(jax.jit(lambda m, a, b: m(a, b))(enc, ids, mask))
    assert got.shape == (7, 40, 384)
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.needs_models
def test_text_tokenizer_gives_transformers_ids_without_importing_it(tmp_path):
    """The extractors' tokenizer (tokenizer.json through `tokenizers` alone) against transformers' own on MiniLM:
    padded and truncated with and without [CLS]/[SEP], unpadded lists, a single text; and a process that loads it
    and tokenizes imports neither transformers nor torch."""
    ours = extractors.load_tokenizer(minilm_path())
    theirs = transformers.AutoTokenizer.from_pretrained(minilm_path())
    assert isinstance(ours, extractors.TextTokenizer)
    texts = [*PROMPTS, "", "   ", "Caf\u00e9 na\u00efve \u00c5ngstr\u00f6m", "\u4e2d\u6587 mixed with text",
             "unknown \u2603\u26c4 symbols", "word " * 200, "tabs\tand\nnewlines  and  spaces"]  # fmt: skip
    for special in (True, False):
        for length in (8, 40, 128):
            kw = dict(padding="max_length", truncation=True, max_length=length, return_tensors="np",
                      add_special_tokens=special)  # fmt: skip
            got, want = ours(texts, **kw), theirs(texts, **kw)
            for k in ("input_ids", "attention_mask"):
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} special={special} length={length}")
        got, want = ours(texts, add_special_tokens=special), theirs(texts, add_special_tokens=special)
        assert got["input_ids"] == want["input_ids"] and got["attention_mask"] == want["attention_mask"]
    assert ours("One text.")["input_ids"] == theirs("One text.")["input_ids"]
    assert (ours.pad_token_id, ours.unk_token_id) == (theirs.pad_token_id, theirs.unk_token_id)
    code = (
        "import sys; from dnd_jax import extractors; from dnd_jax.assets import minilm_path; "
        "t = extractors.load_tokenizer(minilm_path()); "
        "t(['a b'], padding='max_length', truncation=True, max_length=8, return_tensors='np'); "
        "print(sorted({'transformers', 'torch'} & set(sys.modules)))"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]


@pytest.mark.needs_models
def test_load_extractor_errors_are_one_line():
    with pytest.raises(DndError, match=r"encoder\.type: 'glove' is not one of sentence_bert, decoder_lm, static"):
        extractors.load_extractor(_enc("glove", MINILM_L6))
    with pytest.raises(DndError, match=r"model_type 'bert' is not a decoder-only LM"):
        extractors.load_extractor(_enc("decoder_lm", MINILM_L6))
    with pytest.raises(DndError, match="model_type 'llama' is not BERT"):
        extractors.load_extractor(_enc("static", SMOLLM2))
    with pytest.raises(DndError, match=r"encoder.num_layers: 31 is not in 1..30"):
        extractors.load_extractor(_enc("decoder_lm", SMOLLM2, num_layers=31))


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return make_experiment(tmp_path_factory.mktemp("exp"))


def _smoke_config(kind: str, exp, **extra):
    from configs.ablations import extractors as ablation

    c = ablation.get_config(f"{kind},smoke")
    for k, v in {**tiny_overrides(exp), "model.features": ((4, 16, c.model.features[0][2]), (8, 8, 34), (87, 10, 34)),
                 "train.steps": 2, "mesh.shape": (4, 2), **extra}.items():  # fmt: skip
        head, last = k.rsplit(".", 1)
        c[head][last] = v
    return c


@pytest.mark.parametrize("kind,width", [("sentence_bert", 384), ("decoder_lm", 576), ("static", 384)])
@pytest.mark.needs_models
def test_smoke_training_per_extractor_type(exp, tmp_path, kind, width):
    """configs/ablations/extractors.py:<type>,smoke on the tiny experiment: the extractor runs inside the
    sharded jitted step (one compilation), the loss is finite; a wrong first-layer width is one clear error."""
    c = _smoke_config(kind, exp)
    assert c.encoder.type == kind and c.model.features[0][2] == width
    out = trainer.train_and_evaluate(c, tmp_path / kind)
    assert out["traces"] == 1 and np.isfinite(out["last_metrics"]["loss"])
    if kind != "sentence_bert":  # generation loads the run's extractor too (sentence_bert: tests/generate_test.py)
        gen = generate.generate(tmp_path / kind, exp / "prompts" / "gamma_test.json", tmp_path / "gen", num_adapters=1,
                                repeats=0)  # fmt: skip
        assert (gen["adapters"][0] / "adapter_model.safetensors").is_file()
    bad = _smoke_config(kind, exp, **{"model.features": ((4, 16, 100), (8, 8, 34), (87, 10, 34))})
    with pytest.raises(DndError, match=f"encoder hidden size {width} != model.features\\[0\\]\\[2\\] 100"):
        trainer.train_and_evaluate(bad, tmp_path / f"{kind}-bad")


def test_loaders_build_no_random_init_and_a_weight_left_out_is_an_error(tmp_path):
    """Loaders fill an abstract module (no random init, no JAX op); a variable no weight reached is one error."""
    m = extractors.abstract_module(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    assert isinstance(m.kernel.get_value(), jax.ShapeDtypeStruct)
    m.kernel.set_value(jnp.ones((2, 3)))
    with pytest.raises(DndError, match=r"no checkpoint weight for .*bias"):
        extractors.check_filled(m, tmp_path)
    m.bias.set_value(jnp.zeros(3))
    extractors.check_filled(m, tmp_path)
