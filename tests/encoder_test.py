"""Flax BERT encoder against PyTorch transformers.BertModel and SentenceTransformer on all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dnd_jax import extractors
from dnd_jax.assets import minilm_path, smollm2_path
from dnd_jax.data.prompts import sample_prompt_batch
from dnd_jax.errors import DndError
from dnd_jax.models import encoder as enc_lib

PROMPTS = [
    "Which of these would let the most heat travel through?\nA: a new pair of jeans\nB: a steel spoon in a cafeteria\nC: a cotton candy at a store\nD: a calvin klein cotton hat",
    "do iran and afghanistan speak the same language?",
    "is windows movie maker part of windows essentials?",
    "A student wants to find the relationship between the diameter of several plastic disks and the circumference. Which is the best way to record the data?\nA: in a paragraph\nB: in a bar graph\nC: in a pie chart\nD: in a table",
    "How do you get soap scum off a glass shower door?\nA: Use vinegar.\nB: Use orange juice.",
    "Sarah was a much better surgeon than Maria so _ always got the harder cases.\nA: Sarah\nB: Maria",
    "The sun is responsible for\nA: puppies learning new tricks\nB: children growing up and getting old\nC: flowers wilting in a vase\nD: plants sprouting, blooming and wilting",
    "Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before this?\nA: make a new plan\nB: Go home and see Riley\nC: Find somewhere to go",
    "is confectionary sugar the same as powdered sugar",
    "Which property of a mineral can be determined just by looking at it?\nA: luster\nB: mass\nC: weight\nD: hardness",
    "To clean a cast iron skillet,\nA: scrub it with salt and oil.\nB: soak it in soapy water overnight.",
    "does ethanol take more energy make that produces",
    "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?\nA: Planetary density will decrease.\nB: Planetary years will become longer.\nC: Planetary days will become shorter.\nD: Planetary gravity will become stronger.",
    "Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised eating intestine.\nA: Ian\nB: Dennis",
    "Cameron decided to have a barbecue and gathered her friends together. How would Others feel as a result?\nA: like attending\nB: like staying home\nC: a good friend to have",
    "what is the difference between a ml and a cc",
    "When a dog wags its tail it is usually\nA: hungry\nB: happy\nC: sleeping\nD: cold",
    "Why do we see lightning before we hear thunder?\nA: light travels faster than sound\nB: sound travels faster than light",
    "?",
    "x",
]  # fmt: skip
LONG = [" ".join(PROMPTS) * 2, " ".join(reversed(PROMPTS)) * 3]  # > 384 tokens: truncated


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    return path, extractors.load_bert(path), extractors.load_tokenizer(path)


@pytest.mark.needs_models
def test_matches_pytorch_bert_last_hidden_state(minilm):
    path, enc, tok = minilm
    prompts = PROMPTS + LONG
    ids, mask = enc_lib.tokenize_prompts(tok, prompts, 384)
    assert ids.shape == (22, 384) and mask[-1].all() and mask[-2].all()  # the long ones are truncated
    assert len(set(mask.sum(1).tolist())) > 10  # many different lengths
    assert enc_lib.auto_chunk(enc.cfg, 384) == 1  # on CPU the default encodes one prompt at a time (lax.map)
    assert enc_lib.auto_chunk(enc.cfg, 384, jnp.bfloat16) == 1  # bf16: 8x the texts, still 1 at 384 tokens
    assert (enc_lib.auto_chunk(enc.cfg, 32), enc_lib.auto_chunk(enc.cfg, 32, jnp.bfloat16)) == (21, 170)
    with pytest.MonkeyPatch.context() as mp:  # on GPU/TPU: chunks of 1 GiB of float32 scores (the memory's sake)
        mp.setattr(jax, "default_backend", lambda: "gpu")
        per_text = enc.cfg.num_heads * 384 * 384 * 4
        assert enc_lib.auto_chunk(enc.cfg, 384) == (1 << 30) // per_text == 151  # 12 heads: 7 MB per text
    got = np.asarray(jax.jit(lambda m, a, b: m(a, b))(enc, ids, mask))
    at_once = np.asarray(jax.jit(lambda m, a, b: m(a, b, chunk=0))(enc, ids, mask))
    np.testing.assert_allclose(got, at_once, atol=1e-4)  # float32 order; [PAD] rows are ill-conditioned
    ref = transformers.BertModel.from_pretrained(path).eval()
    args = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    with torch.no_grad():
        want = ref(**args).last_hidden_state.numpy()
        want64 = ref.double()(**args).last_hidden_state.numpy()
    assert got.shape == (22, 384, 384)
    err = np.abs(got - want)
    assert err[mask == 1].max() < 1e-4  # every real token position
    # Hidden states at [PAD] positions are ill-conditioned: PyTorch's own fp32 result is ~1.3e-4 away
    # from its float64 result there, so those positions are held to float64 PyTorch: at least as close
    # as PyTorch's fp32 (ours: 1.1e-4 chunked, 0.9e-4 all at once).
    assert np.abs(got - want64).max() <= np.abs(want - want64).max()
    assert np.abs(at_once - want64).max() <= np.abs(want - want64).max()
    assert err.max() < 3e-4


@pytest.mark.needs_models
def test_key_trimming_matches_pytorch(minilm):
    """Keys past the longest text are padding in every text: leaving them out keeps PyTorch's output."""
    path, enc, tok = minilm
    ids, mask = enc_lib.tokenize_prompts(tok, PROMPTS, 128)
    kl = enc_lib.keys_needed(mask)
    longest = int(mask.sum(1).max())
    assert kl == -(-longest // 8) * 8 and kl < 128 and longest < kl + 8  # trims most keys
    got = np.asarray(jax.jit(lambda m, a, b: m(a, b, key_length=kl))(enc, ids, mask))
    ref = transformers.BertModel.from_pretrained(path).eval()
    args = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    with torch.no_grad():
        want = ref(**args).last_hidden_state.numpy()
        want64 = ref.double()(**args).last_hidden_state.numpy()
    assert np.abs(got - want)[mask == 1].max() < 1e-4
    assert np.abs(got - want64).max() <= max(np.abs(want - want64).max(), 1e-5)  # [PAD] rows too
    short = np.asarray(jax.jit(lambda m, a, b: m(a, b, key_length=16))(enc, ids, mask))  # too short: real keys dropped
    assert np.abs(short - want)[mask == 1].max() > 1e-2


def test_keys_needed():
    m = np.zeros((2, 3, 40), np.int32)
    m[0, 0, :5] = 1
    assert enc_lib.keys_needed(m) == 8 and enc_lib.keys_needed(m, multiple=1) == 5
    m[1, 2, 20] = 1  # any text's last real token counts, wherever it sits
    assert enc_lib.keys_needed(m) == 24 and enc_lib.keys_needed(m[:1], m[1:]) == 24
    m[0, 1, 39] = 1
    assert enc_lib.keys_needed(m) == 40 and enc_lib.keys_needed(np.zeros((1, 12))) == 8  # at most L; never 0


@pytest.mark.needs_models
def test_pooled_embedding_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    path, enc, tok = minilm
    st = SentenceTransformer(str(path), device="cpu")
    want = st.encode(PROMPTS + LONG, convert_to_numpy=True)
    ids, mask = enc_lib.tokenize_prompts(tok, PROMPTS + LONG, st.max_seq_length)
    got = np.asarray(enc_lib.mean_pool(enc(ids, mask), mask))
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.needs_models
def test_batched_conditions_dropout_and_padding_mask(minilm):
    _, enc, tok = minilm
    ids, mask = enc_lib.tokenize_prompts(tok, PROMPTS[:8], 64)
    ids_bnl, mask_bnl = ids.reshape(2, 4, 64), mask.reshape(2, 4, 64)
    flat = enc(ids, mask)
    cond = enc(ids_bnl, mask_bnl)
    assert cond.shape == (2, 4, 64, 384)
    np.testing.assert_allclose(np.asarray(cond).reshape(8, 64, 384), np.asarray(flat), atol=1e-5)
    for chunk in (0, 3):  # all at once; chunks of 3 with one padded text encoded and dropped
        np.testing.assert_allclose(np.asarray(enc(ids, mask, chunk=chunk)), np.asarray(flat), atol=5e-5)
    k = jax.random.key(0)
    d1, d2 = enc(ids, mask, key=k), enc(ids, mask, key=k)
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))  # seeded
    assert np.abs(np.asarray(d1) - np.asarray(flat)).max() > 1e-2  # dropout is on
    masked = np.asarray(enc(ids, mask, mask_padding=True))
    assert np.all(masked[mask == 0] == 0) and np.abs(np.asarray(flat)[mask == 0]).max() > 0
    bf16 = extractors.load_bert(minilm_path(), dtype=jnp.bfloat16)  # the original's bf16 autocast
    out = bf16(ids, mask)
    err = np.abs(np.asarray(out) - np.asarray(flat)).max()
    assert out.dtype == jnp.float32 and 1e-4 < err < 0.3, err  # bf16 matmuls, float32 everywhere else


@pytest.mark.needs_models
def test_long_texts_are_encoded_in_512_segments(minilm):
    _, enc, tok = minilm
    ids, mask = enc_lib.tokenize_prompts(tok, LONG, 1024)
    out = enc(ids, mask)
    seg = enc(ids[:, 512:], mask[:, 512:])
    np.testing.assert_allclose(np.asarray(out[:, 512:]), np.asarray(seg), atol=1e-5)


@pytest.mark.needs_models
def test_not_bert_or_missing_tokenizer_is_clear_error(tmp_path):
    with pytest.raises(DndError, match="model_type 'llama' is not BERT"):
        extractors.load_bert(smollm2_path())
    broken = tmp_path / "minilm"
    shutil.copytree(minilm_path(), broken)
    (broken / "tokenizer.json").unlink()
    (broken / "vocab.txt").unlink()
    with pytest.raises(DndError, match="no tokenizer file"):
        extractors.load_tokenizer(broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["hidden_size"] = 256
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DndError, match=r"has shape \[30522, 384\], expected \[30522, 256\]"):
        extractors.load_bert(broken)


def test_prompt_sampling_is_seeded_and_without_replacement():
    a = sample_prompt_batch(300, 128, np.random.default_rng(5))
    b = sample_prompt_batch(300, 128, np.random.default_rng(5))
    assert len(set(a.tolist())) == 128 and np.array_equal(a, b)
    with pytest.raises(DndError, match="fewer than num_texts=128"):
        sample_prompt_batch(100, 128, np.random.default_rng(0), where="ARC-c_test")
