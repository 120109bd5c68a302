"""The Flax causal LM with a per-row LoRA (dnd_jax/models/causal_lm.py) against PyTorch: transformers for the
base model, PEFT (one adapter per row) for the adapted logits, torch autograd for the gradient of the loss.

Oracle tolerances are relative to the reference's scale (max |logit| over the compared positions; max |grad| of
each row's adapter, and 10x looser of each leaf): SmolLM2's massive activations (|h| ~ 2.5e4,
tests/extractors_test.py) leave fp32 logits good to only 1e-4 (these texts) .. 2e-3 (arbitrary token ids)
absolute, PyTorch's included (its fp32 logits are that far from its float64 ones).
"""

from __future__ import annotations

import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from converters.peft_to_jax import state_dict_to_pytree
from dnd_jax.assets import SMOLLM2, smollm2_path
from dnd_jax.errors import DndError
from dnd_jax.lm import encode_sft_example, load_base
from dnd_jax.models.causal_lm import PROJECTIONS, label_positions, load_causal_lm, response_nll, spec_scales

pytestmark = pytest.mark.needs_models

RECORDS = [  # two chat-formatted SFT examples of 20 and 13 tokens (row 1 right-padded)
    ({"prompt": "What is 2 + 3?", "response": "The answer is 5.", "system": ""}, 20),
    ({"prompt": "Name a color.", "response": "Blue.", "system": "Be brief."}, 13),
]
ADAPTERS = ("row0", "row1")


def _functional(model):
    """(jitted logits fn, jitted grad of the NLL in the LoRA): the parameters travel as an argument."""
    graphdef, state = nnx.split(model)

    def logits(st, ids, mask, lora, scale):
        return nnx.merge(graphdef, st)(ids, mask, lora, scale)

    def nll(lora, st, ids, mask, labels, scale, positions=None):
        if positions is not None:  # the head at the label positions only (SFT batches)
            return response_nll(nnx.merge(graphdef, st), ids, mask, labels, lora, scale, positions=positions)
        return response_nll(lambda *a: logits(st, *a), ids, mask, labels, lora, scale)

    fwd, grad = jax.jit(logits), jax.jit(jax.value_and_grad(nll))
    return lambda *a: fwd(state, *a), lambda lora, *a, **k: grad(lora, state, *a, **k)


def _random_adapter(peft_model, name: str, seed: int) -> None:
    """Random A and non-zero random B (PEFT's init zeroes B, which would make the LoRA invisible)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_A") and name in module.lora_A:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                a.copy_(torch.randn(a.shape, generator=gen) / a.shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """PyTorch's OpenMP threads wait by spinning: on 2 busy cores its forwards here take 10 s instead of 0.2 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(_one_torch_thread):
    lm, tok, _ = load_base(SMOLLM2)
    rows = [encode_sft_example(tok, rec, cut) for rec, cut in RECORDS]
    length = max(len(ids) for ids, _ in rows)
    ids = np.full((2, length), tok.pad_token_id, np.int64)
    labels, mask = np.full((2, length), -100, np.int64), np.zeros((2, length), np.int64)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)], labels[i, : len(row_ids)], mask[i, : len(row_ids)] = row_ids, row_labels, 1
    with torch.no_grad():
        base = lm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(PROJECTIONS))
    peft_model = get_peft_model(lm, config, adapter_name=ADAPTERS[0])
    peft_model.add_adapter(ADAPTERS[1], config)
    trees = []
    for seed, name in enumerate(ADAPTERS):
        _random_adapter(peft_model, name, seed)
        state = {k: v.numpy() for k, v in get_peft_model_state_dict(peft_model, adapter_name=name).items()}
        tree, spec = state_dict_to_pytree(state, peft_model.peft_config[name].to_dict(), name)
        trees.append(tree)
    assert len(spec.modules) == 7 * 30 and spec.prefix == "model" and spec.modules[0].scale == 2.0
    model, _, _ = load_causal_lm(SMOLLM2)
    lora = jax.tree.map(lambda *rows: jnp.asarray(np.stack(rows)), *trees)  # row i carries adapter i
    return dict(peft=peft_model.eval(), ids=ids, mask=mask, labels=labels, base=base, model=model,
                lora=lora, scale=spec_scales(spec), fns=_functional(model))  # fmt: skip


def test_base_logits_match_transformers(setup):
    s = setup
    got = np.asarray(s["fns"][0](s["ids"], s["mask"], None, None))
    real = s["mask"].astype(bool)
    err, ref = np.abs(got - s["base"])[real].max(), np.abs(s["base"][real]).max()
    print(f"base logits: max abs err {err:.1e}, max |logit| {ref:.1f}, relative {err / ref:.1e}")
    assert got.dtype == np.float32 and got.shape == (*s["ids"].shape, 49152)
    assert err / ref < 1e-4


def test_per_row_lora_logits_match_peft(setup):
    """Row i under adapter i in one batch = PEFT's logits of row i with adapter i active (non-pad positions)."""
    s = setup
    got = np.asarray(s["fns"][0](s["ids"], s["mask"], s["lora"], s["scale"]))
    for i, name in enumerate(ADAPTERS):
        s["peft"].set_adapter(name)
        with torch.no_grad():
            want = s["peft"](input_ids=torch.tensor(s["ids"]), attention_mask=torch.tensor(s["mask"])).logits.numpy()
        real = s["mask"][i].astype(bool)
        want_i, got_i, base_i = want[i][real], got[i][real], s["base"][i][real]
        err, ref = np.abs(got_i - want_i).max(), np.abs(want_i).max()
        print(f"adapter {name}: max abs err {err:.1e}, max |logit| {ref:.1f}, relative {err / ref:.1e}; "
              f"LoRA moved the logits by up to {np.abs(want_i - base_i).max():.2f}")  # fmt: skip
        assert err / ref < 1e-4
        assert np.abs(want_i - base_i).max() > 100 * err  # the adapter is visible far above the error


def test_nll_gradient_in_lora_matches_torch_autograd(setup):
    """d(batch mean response NLL)/d(A, B) of each row's adapter = torch autograd through PEFT's mixed-adapter
    batch (row i under adapter i) and F.cross_entropy over the shifted labels (-100 ignored).

    The oracle's cross-entropy runs in float64 on the float32 logits: in float32 (HF's own `labels=` loss) the
    d/dlogit of a confident token, p - 1, is rounded at ulp(1) ~ 1e-7, which puts PyTorch itself 1.7e-4 (per
    leaf) from its float64 gradient; ours is 4.5e-5 from it, and equals it to 1e-13 when both run in float64.
    """
    s = setup
    t0 = time.perf_counter()
    nll, grads = s["fns"][1](s["lora"], s["ids"], s["mask"], s["labels"], s["scale"])
    print(f"JAX value_and_grad (compile + run): {time.perf_counter() - t0:.1f} s")
    positions = label_positions(s["labels"])
    counts = (s["labels"][:, 1:] != -100).sum(1)
    assert positions.shape[1] < s["ids"].shape[1] and ((positions >= 0).sum(1) == counts).all() and counts.min() > 0
    nll_p, grads_p = s["fns"][1](s["lora"], s["ids"], s["mask"], s["labels"], s["scale"], positions=positions)
    peft_model = s["peft"]
    params = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    logits = peft_model(input_ids=torch.tensor(s["ids"]), attention_mask=torch.tensor(s["mask"]),
                        adapter_names=list(ADAPTERS)).logits[:, :-1].double()  # fmt: skip
    loss = F.cross_entropy(logits.flatten(0, 1), torch.tensor(s["labels"])[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    assert len(params) == 2 * 7 * 30 * 2
    for how, value, tree in (("all positions", nll, grads), ("label positions", nll_p, grads_p)):
        err, ref, leaf = np.zeros(2), np.zeros(2), 0.0
        for name, p in params.items():  # base_model.model.model.layers.3.self_attn.q_proj.lora_A.row0.weight
            path, ab, adapter = name.removeprefix("base_model.model.model.").rsplit(".", 3)[:3]
            node, row = tree, ADAPTERS.index(adapter)
            for part in path.split("."):
                node = node[part]
            got, want = np.asarray(node["lora_" + ab[-1].lower()][row]).T, p.grad.numpy()
            err[row], ref[row] = max(err[row], np.abs(got - want).max()), max(ref[row], np.abs(want).max())
            leaf = max(leaf, np.abs(got - want).max() / np.abs(want).max())
        print(f"head at {how}: NLL {float(value):.6f} (torch {loss.item():.6f}); {len(params)} LoRA leaves: "
              f"max |grad err| / max |grad| per adapter {err / ref}, per leaf {leaf:.1e}")  # fmt: skip
        assert abs(float(value) - loss.item()) < 1e-5 * loss.item()  # the logits differ by up to 2e-4
        assert (err / ref).max() < 1e-4 and leaf < 1e-3


def test_label_positions_are_each_rows_label_slots_padded_to_a_power_of_two():
    labels = np.full((3, 40), -100)
    labels[0, 5:8], labels[1, 30:40] = 1, 2  # 3 and 10 label tokens; row 2 has none
    pos = label_positions(labels)
    assert pos.shape == (3, 16) and pos.dtype == np.int32  # 10 -> 16 (powers of two from 8)
    assert pos[0, :3].tolist() == [4, 5, 6] and (pos[0, 3:] == -1).all()  # position t predicts label t + 1
    assert pos[1, :10].tolist() == list(range(29, 39)) and (pos[2] == -1).all()
    assert label_positions(labels[:1]).shape == (1, 8) and label_positions(labels[None]).shape == (1, 3, 16)


def test_bad_lora_leaves_raise(setup):
    s, ids, mask = setup, setup["ids"], setup["mask"]
    one = jax.tree.map(lambda x: x[0], s["lora"])  # forgot the row axis
    with pytest.raises(DndError, match="leading axis"):
        s["model"](ids, mask, one, s["scale"])
    with pytest.raises(DndError, match="not layers/"):
        s["model"](ids, mask, {"layers": {"30": s["lora"]["layers"]["0"]}}, s["scale"])
    with pytest.raises(DndError, match="scale"):
        s["model"](ids, mask, s["lora"], None)


def test_untied_head_and_qwen2_biases_on_a_subset_of_projections(tmp_path):
    """A tiny random Qwen2ForCausalLM (own lm_head, q/k/v biases) with a LoRA on three projections only."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    ref = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    ref.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # load_causal_lm loads one; any tokenizer will do
        shutil.copy(smollm2_path() / name, tmp_path / name)
    peft_model = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    _random_adapter(peft_model, "default", 0)
    tree, spec = state_dict_to_pytree({k: v.numpy() for k, v in get_peft_model_state_dict(peft_model).items()},
                                      peft_model.peft_config["default"].to_dict(), "tiny")  # fmt: skip
    ids = np.array([[5, 17, 40, 2, 99, 3], [8, 9, 10, 0, 0, 0]])
    mask = (np.arange(6) < np.array([[6], [3]])).astype(np.int64)
    with torch.no_grad():
        want = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    model, _, _ = load_causal_lm(tmp_path)
    lora = jax.tree.map(lambda x: jnp.asarray(np.stack([x, x])), tree)
    got = np.asarray(model(ids, mask, lora, spec_scales(spec)))
    assert model.lm_head is not None
    np.testing.assert_allclose(got[mask.astype(bool)], want[mask.astype(bool)], atol=1e-5)


def test_bfloat16_compute_keeps_float32_logits_loss_and_gradients(setup):
    """bfloat16 compute (float32 parameters, norms and softmax): the same predictions, loss and gradient direction."""
    s = setup
    model, _, _ = load_causal_lm(SMOLLM2, jnp.bfloat16)
    fwd, grad = _functional(model)
    logits = fwd(s["ids"], s["mask"], s["lora"], s["scale"])
    nll, grads = grad(s["lora"], s["ids"], s["mask"], s["labels"], s["scale"])
    nll32, grads32 = s["fns"][1](s["lora"], s["ids"], s["mask"], s["labels"], s["scale"])
    logits32 = s["fns"][0](s["ids"], s["mask"], s["lora"], s["scale"])
    real = s["mask"].astype(bool)
    g, g32 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (grads, grads32))
    cosine = g @ g32 / np.linalg.norm(g) / np.linalg.norm(g32)
    print(f"bfloat16: NLL {float(nll):.4f} vs float32 {float(nll32):.4f}, gradient cosine {cosine:.4f}")
    assert logits.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in jax.tree.leaves(grads))
    assert (np.argmax(logits, -1) == np.argmax(logits32, -1))[real].mean() > 0.9
    assert abs(float(nll) - float(nll32)) < 0.02 * float(nll32) and cosine > 0.98
