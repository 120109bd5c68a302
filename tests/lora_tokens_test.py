"""Parameter tokens against an independent loop-by-loop NumPy transcription of the original."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import converters
from converters.synthetic import qwen2_config, spec_from_config, synthetic_state_dict
from dnd_jax import lora_tokens
from dnd_jax.errors import DndError

from lora_fixtures import make_adapter

ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]


def reference_tokenize(state: dict, chunk: int) -> np.ndarray:
    """The original's algorithm, written out plainly: sort keys, torch.chunk, NaN token, border."""
    mods = {}
    for k, v in state.items():
        path = k[len("base_model.model.") :].rsplit(".lora_", 1)[0]
        mods.setdefault(path, {})[k.rsplit(".lora_", 1)[1][0]] = np.asarray(v, np.float32)

    def key(path):
        parts = path.split(".")
        return (int(parts[2]), ORDER.index(parts[-1]))

    tokens = []
    for path in sorted(mods, key=key):
        a, b = mods[path]["A"], mods[path]["B"]
        r = a.shape[0]
        for mat in (a, b.T):
            for j in range(mat.shape[1] // chunk):
                w = mat[:, j * chunk : (j + 1) * chunk]
                mu, sigma = w.mean(), w.std(ddof=1)
                tok = np.full((r + 2, chunk + 2), np.nan, np.float32)
                tok[:r, :chunk] = (w - mu) / sigma
                mc, sc = mu * 8.0, np.log(0.9 * sigma + 0.1) + 1.6
                for i in range(chunk + 2):
                    tok[r:, i] = mc if i % 2 == 0 else sc
                tok[:, chunk] = mc
                tok[:, chunk + 1] = sc
                tokens.append(tok)
    return np.stack(tokens)


@pytest.mark.parametrize("size,r,chunk,want", [
    ("0.5B", 8, 128, (4296, 10, 130)), ("1.5B", 16, 256, (4508, 18, 258)), ("7B", 16, 512, (4928, 18, 514)),
])  # fmt: skip
def test_qwen_token_shapes_from_configs(size, r, chunk, want):
    spec = spec_from_config(qwen2_config(size), r=r, alpha=2 * r)
    layout = lora_tokens.make_layout(spec, chunk)
    assert layout.shape == want
    ranges = layout.module_token_ranges()
    per_module = [e - s for s, e in list(ranges.values())[:7]]
    if size == "0.5B":  # the original's hard-coded counts, q k v o up gate down
        assert per_module == [14, 8, 8, 14, 45, 45, 45]
        assert list(ranges)[4].endswith("up_proj") and list(ranges)[5].endswith("gate_proj")


def test_tokenize_matches_reference_and_round_trips():
    import transformers

    cfg = transformers.Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, vocab_size=64)  # fmt: skip
    state = synthetic_state_dict(cfg, r=4, dtype="float32", seed=3, std=0.05)
    params, spec = converters.peft_to_jax.state_dict_to_pytree(state, {"r": 4, "lora_alpha": 8}, "test")
    layout = lora_tokens.make_layout(spec, 64)
    tokens = lora_tokens.tokenize(params, layout)
    want = reference_tokenize(state, 64)
    assert tokens.shape == want.shape == (2 * (4 + 4 + 4 + 1 + 4 + 1 + 4 + 4 + 4 + 8 + 4 + 8 + 8 + 4), 6, 66)
    assert not np.isnan(tokens).any()
    np.testing.assert_allclose(tokens, want, rtol=1e-5, atol=1e-5)
    back = lora_tokens.detokenize(tokens, layout)
    for k, v in converters.flatten(params).items():
        np.testing.assert_allclose(converters.flatten(back)[k], v, rtol=1e-5, atol=1e-7)
    # JAX gives the same tokens and weights inside jit, on a stacked batch axis.
    stacked = jax.tree.map(lambda x: np.stack([x, 2 * x]), params)
    tok_j = jax.jit(lambda p: lora_tokens.tokenize(p, layout, xp=jnp))(stacked)
    np.testing.assert_allclose(np.asarray(tok_j[0]), tokens, rtol=1e-5, atol=1e-5)
    back_j = jax.jit(lambda t: lora_tokens.detokenize(t, layout, xp=jnp))(tok_j)
    for k, v in converters.flatten(stacked).items():
        np.testing.assert_allclose(np.asarray(converters.flatten(back_j)[k]), v, rtol=1e-5, atol=1e-7)


def test_indivisible_dimension_is_an_error_unless_padding(tmp_path):
    _, src = make_adapter("qwen_plain", tmp_path / "a")  # hidden 64, intermediate 96, kv 32
    params, spec = converters.load_peft_adapter(src)
    with pytest.raises(
        DndError, match=r"layers.0.self_attn.k_proj.: out_features 32 is not divisible by the token chunk size 64"
    ):
        lora_tokens.make_layout(spec, 64)
    layout = lora_tokens.make_layout(spec, 64, pad=True)
    back = lora_tokens.detokenize(lora_tokens.tokenize(params, layout), layout)
    for k, v in converters.flatten(params).items():
        np.testing.assert_allclose(converters.flatten(back)[k], v, rtol=1e-5, atol=1e-7)


def test_mixed_ranks_and_wrong_token_shape_are_errors(tmp_path):
    _, src = make_adapter("qwen_rank_pattern", tmp_path / "a")
    _, spec = converters.load_peft_adapter(src)
    with pytest.raises(DndError, match="one rank"):
        lora_tokens.make_layout(spec, 32)
    _, src = make_adapter("qwen_plain", tmp_path / "b")
    _, spec = converters.load_peft_adapter(src)
    layout = lora_tokens.make_layout(spec, 32)
    with pytest.raises(DndError, match="layout needs"):
        lora_tokens.detokenize(np.zeros((3, 10, 34), np.float32), layout)


def test_constant_chunk_decodes_exactly():
    """A zero B (PEFT's default init) has sigma 0: it must decode to exact zeros, not NaN."""
    w = np.zeros((1, 4, 8), np.float32)
    tok = lora_tokens._encode_chunks(w, np)
    mu, sigma = lora_tokens.decode_scales(tok)
    assert not np.isnan(tok).any() and abs(float(mu[0])) == 0 and abs(float(sigma[0])) < 1e-7


def reference_decode_scales(tok: np.ndarray) -> tuple[float, float]:
    """The original's `with_scales_wrapper.detokenize` for one token, step by step (spec §2.6)."""
    rows, cols = tok.shape
    from_rows = np.stack([[tok[rows - 2 + i, 2 * j : 2 * j + 2] for j in range(cols // 2)] for i in range(2)])
    from_rows = from_rows.mean(axis=1)  # (2 rows, 2): the bottom rows' 65 column pairs averaged
    from_cols = np.stack([tok[2 * j : 2 * j + 2, cols - 2 :] for j in range(rows // 2)]).mean(axis=0)  # (2, 2)
    code = (from_rows + from_cols) / 2
    mus = [code[i, 0] / 8.0 for i in range(2)]
    sigmas = [(np.exp(code[i, 1] - 1.6) - 0.1) / 0.9 for i in range(2)]
    return float(np.mean(mus)), float(np.mean(sigmas))


def test_scales_decode_per_row_then_average_on_tokens_whose_border_rows_differ():
    """Generated tokens carry different codes in their two border rows; each row is decoded (exp) and
    then averaged. Averaging the codes first gives another sigma, so this fails for that order."""
    rng = np.random.default_rng(3)
    tok = rng.normal(size=(6, 10, 130)).astype(np.float32)
    tok[:, 8, :] = np.tile([0.05, -0.2], 65)  # row 0 of the border: (mu', sigma')
    tok[:, 9, :] = np.tile([-0.03, 1.4], 65)  # row 1: very different sigma'
    tok[:, :, 128:] = np.tile([[0.05, -0.2], [-0.03, 1.4]], (5, 1))
    mu, sigma = lora_tokens.decode_scales(tok)
    for i in range(len(tok)):
        ref_mu, ref_sigma = reference_decode_scales(tok[i].astype(np.float64))
        np.testing.assert_allclose([mu[i], sigma[i]], [ref_mu, ref_sigma], rtol=1e-5, atol=1e-7)
    averaged_code_first = (np.exp((-0.2 + 1.4) / 2 - 1.6) - 0.1) / 0.9
    assert abs(float(sigma[0]) - averaged_code_first) > 0.05
    mu_j, sigma_j = lora_tokens.decode_scales(jnp.asarray(tok), xp=jnp)
    np.testing.assert_allclose(np.asarray(sigma_j), sigma, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mu_j), mu, rtol=1e-5, atol=1e-8)


def test_sigma_floor_clamps_negative_decoded_scales_only():
    """A generated token whose sigma codes decode below zero flips its chunk's sign; generate.sigma_floor = 0
    must give what the same tokens give with their sigma codes rewritten to decode to exactly 0 (ln 0.1 +
    1.6), and leave tokens with positive sigma alone."""
    from converters.pytree import flatten
    from converters.synthetic import qwen2_config, spec_from_config

    layout = lora_tokens.make_layout(spec_from_config(qwen2_config("0.5B"), r=8, alpha=16), 128)
    t, rows, cols = layout.shape
    tokens = np.random.default_rng(0).normal(size=layout.shape).astype(np.float32)
    code = np.where(np.arange(t) % 2 == 0, -3.0, 0.5).astype(np.float32)[:, None]  # sigma -0.1 / +0.26
    tokens[:, rows - 2 :, 1 : cols - cols % 2 : 2] = code[:, :, None]  # bottom rows: (mu', sigma') column pairs
    tokens[:, : rows - rows % 2, cols - 1] = code  # right columns: (mu', sigma') per row
    _, sigma = lora_tokens.decode_scales(tokens)
    neg = sigma < 0
    assert neg.sum() == (t + 1) // 2 and (sigma[~neg] > 0.25).all()
    zero = tokens.copy()
    zero[neg, rows - 2 :, 1 : cols - cols % 2 : 2] = np.log(0.1) + 1.6
    zero[neg, : rows - rows % 2, cols - 1] = np.log(0.1) + 1.6
    assert np.abs(lora_tokens.decode_scales(zero)[1][neg]).max() < 1e-6
    floored = flatten(lora_tokens.detokenize(tokens, layout, sigma_floor=0.0))
    want = flatten(lora_tokens.detokenize(zero, layout))
    plain = flatten(lora_tokens.detokenize(tokens, layout))
    for k in want:
        np.testing.assert_allclose(floored[k], want[k], atol=1e-5)
    assert any(not np.allclose(plain[k], want[k], atol=1e-3) for k in want)  # the floor changed something
