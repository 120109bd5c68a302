"""Checkpoint collection on the real SmolLM2-135M-Instruct, token store and criterion weights."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import converters
from configs.collect import commonsense_smollm2
from dnd_jax import lora_tokens
from dnd_jax.data import prepare
from dnd_jax.data.prompts import load_split
from dnd_jax.errors import DndError
from dnd_jax.lm import load_base
from tests import warm

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Answer by a single [ans] (ans is A or B)."


def write_dataset(root: Path, name: str = "toy", n: int = 24) -> Path:
    """A small LLaMA-Factory dataset: arithmetic questions with two options."""
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        a, b = int(rng.integers(1, 20)), int(rng.integers(1, 20))
        right, wrong = a + b, a + b + int(rng.integers(1, 5))
        opts = [right, wrong] if i % 2 == 0 else [wrong, right]
        recs.append({"prompt": f"What is {a} + {b}?\nA: {opts[0]}\nB: {opts[1]}",
                     "response": "[A]" if i % 2 == 0 else "[B]", "system": SYSTEM,
                     "choices": [str(o) for o in opts], "answer": i % 2})  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    cols = {"prompt": "prompt", "response": "response", "system": "system"}
    info = {}
    for split, part in (("train", recs[: n * 2 // 3]), ("test", recs[n * 2 // 3 :])):
        (root / f"{name}_{split}.json").write_text(json.dumps(part))
        info[f"{name}_{split}"] = {"file_name": f"{name}_{split}.json", "columns": cols}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def _collect_cmd(data: Path, out: Path) -> list[str]:
    cfg = REPO / "configs/collect/commonsense_smollm2.py:toy,smoke"
    return [sys.executable, "-m", "dnd_jax.collect", "--config", str(cfg), f"--config.data_dir={data}",
            "--config.phase2.steps=4", f"--out={out}"]  # fmt: skip


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("collect")
    data = write_dataset(tmp / "data")
    r = warm.run(_collect_cmd(data, tmp / "full"), capture_output=True, text=True, env=_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    return data, tmp / "full" / "toy"


@pytest.mark.needs_models
def test_collect_writes_every_phase2_step(collection):
    _, ds = collection
    manifest = json.loads((ds / "manifest.json").read_text())
    assert manifest["complete"] and manifest["steps"] == [3, 4, 5, 6]
    assert [s for s, _ in converters.list_checkpoints(ds)] == [3, 4, 5, 6]
    cfg = json.loads((ds / "step-000003" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and len(cfg["target_modules"]) == 7
    # Consecutive checkpoints differ: training really moved the weights.
    a, b = converters.load_peft_adapter(ds / "step-000003")[0], converters.load_peft_adapter(ds / "step-000004")[0]
    fa, fb = converters.flatten(a), converters.flatten(b)
    assert any(not np.array_equal(fa[k], fb[k]) for k in fa)


@pytest.mark.needs_models
def test_preempted_collection_resumes_to_the_same_checkpoints(collection, tmp_path):
    """SIGTERM (preemption): save at the next step, exit 0 saying so; SIGKILL is tests/kill_trials_test.py's."""
    data, full = collection
    out = tmp_path / "killed"
    proc = warm.popen(_collect_cmd(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=REPO)  # fmt: skip
    deadline = time.time() + 300
    while not (out / "toy" / "step-000004").exists():
        assert proc.poll() is None and time.time() < deadline, "collect ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert re.fullmatch(rf"stopped by SIGTERM after step [4-5] of toy; its state is in {out / 'toy'}; re-run the "
                        "same command to resume", err.strip().splitlines()[-1])  # fmt: skip
    r = warm.run(_collect_cmd(data, out), capture_output=True, text=True, env=_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    got = converters.list_checkpoints(out / "toy")
    assert [s for s, _ in got] == [3, 4, 5, 6]
    assert not [p for p in (out / "toy").iterdir() if ".tmp-" in p.name]
    for step, path in got:
        a = converters.flatten(converters.load_peft_adapter(path)[0])
        b = converters.flatten(converters.load_peft_adapter(full / path.name)[0])
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=f"step {step} {k}")


@pytest.mark.needs_models
def test_tokens_of_real_checkpoints_round_trip_into_peft(collection, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    _, ds = collection
    params, spec = converters.load_peft_adapter(ds / "step-000005")
    layout = lora_tokens.make_layout(spec, 64)
    assert layout.shape == (4770, 10, 66)  # SmolLM2: 30 layers x 159 tokens, derived from the spec
    back = lora_tokens.detokenize(lora_tokens.tokenize(params, layout), layout)
    out = converters.save_peft_adapter(back, spec, tmp_path / "detok")
    base, tok, _ = load_base("smollm2-135m-instruct")
    model = PeftModel.from_pretrained(base, ds / "step-000005", adapter_name="orig")
    model.load_adapter(out, adapter_name="detok")
    sd = get_peft_model_state_dict(model, adapter_name="detok")
    assert sorted(sd) == sorted(get_peft_model_state_dict(model, adapter_name="orig"))
    ids = tok("Question: What is 2 + 3?\nAnswer:", return_tensors="pt").input_ids
    with torch.no_grad():
        model.set_adapter("orig")
        want = model(ids).logits
        model.set_adapter("detok")
        got = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert (got - want).abs().max() < 1e-4
    assert (want - plain).abs().max() > 1e-3  # the adapter really changes the model


@pytest.mark.needs_models
def test_prepare_matches_numpy_reference(collection, tmp_path):
    _, ds = collection
    out = prepare.prepare_dataset(ds, tmp_path / "tok" / "toy", chunk=64, real_length=3)
    ts = prepare.open_token_set(out)
    assert ts.steps == [3, 4, 5] and ts.tokens.shape == (3, 4770, 10, 66)
    ref = []
    for step in (3, 4, 5):
        params, spec = converters.load_peft_adapter(ds / f"step-{step:06d}")
        ref.append(lora_tokens.tokenize(params, lora_tokens.make_layout(spec, 64)))
    ref = np.stack(ref)
    np.testing.assert_array_equal(np.asarray(ts.tokens), ref)
    std = ref.astype(np.float64).std(axis=0)  # population std over checkpoints
    want = std.mean(axis=(1, 2)) / std.mean()
    np.testing.assert_allclose(ts.weight, want, rtol=1e-4, atol=1e-6)
    assert ts.weight[:9].mean() < ts.weight[9:18].mean()  # q: A tokens move less than B^T tokens
    mtime = (out / "tokens.npy").stat().st_mtime_ns
    prepare.prepare_dataset(ds, out, chunk=64, real_length=3)  # up to date: untouched
    assert (out / "tokens.npy").stat().st_mtime_ns == mtime


def test_bad_prompt_datasets_are_clear_errors(tmp_path):
    data = write_dataset(tmp_path / "d")
    with pytest.raises(DndError, match="dataset 'nope_train' is not registered"):
        load_split(data, "nope_train")
    recs = json.loads((data / "toy_train.json").read_text())
    (data / "toy_train.json").write_text(json.dumps([{"prompt": "q"}, *recs]))
    with pytest.raises(DndError, match=r"toy_train.json: record 0 has no column 'response'"):
        load_split(data, "toy_train")
    (data / "toy_train.json").write_text(json.dumps([*recs, {"prompt": "  ", "response": "[A]"}]))
    with pytest.raises(DndError, match=r"toy_train.json: record 16 has an empty prompt"):
        load_split(data, "toy_train")
    r = warm.run([sys.executable, "-m", "dnd_jax.collect", "--config",
                        str(REPO / "configs/collect/commonsense_smollm2.py:nope,smoke"), f"--config.data_dir={data}",
                        f"--out={tmp_path / 'o'}"], capture_output=True, text=True, env=_env(), cwd=REPO)  # fmt: skip
    assert r.returncode == 2 and "not registered" in r.stderr and "Traceback" not in r.stderr
    r = warm.run([sys.executable, "-m", "dnd_jax.collect", "--config",
                        str(REPO / "configs/collect/commonsense_smollm2.py:toy,smoke"), "--config.phase3.lr=1",
                        f"--out={tmp_path / 'o'}"], capture_output=True, text=True, env=_env(), cwd=REPO)  # fmt: skip
    assert r.returncode == 2 and "phase3" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_smoke_config_is_small():
    c = commonsense_smollm2.get_config("ARC-c,smoke")
    assert c.phase1.steps + c.phase2.steps <= 6 and c.lora.r == 8


@pytest.mark.needs_models
def test_lora_init_is_shared_across_datasets_and_cache_states(tmp_path):
    """A LoRA's start depends on (seed, base model, LoRA config) only: a collection that first has to build
    the model cache (an empty DND_JAX_CACHE: the GGUF is dequantized through a randomly initialised
    LlamaForCausalLM) and one on another dataset with a warm cache start from identical A matrices, equal
    to a PEFT model seeded alike in this test. With learning rate 0 the checkpoints hold the init itself.
    A collection with another seed is refused when tokenized together with them."""
    from peft import LoraConfig, get_peft_model

    data = write_dataset(tmp_path / "d", "toy")
    write_dataset(tmp_path / "d2", "other")
    lr0 = ["--config.phase1.lr=0", "--config.phase2.lr=0", "--config.phase1.steps=1", "--config.phase2.steps=1"]

    def run(name, d, out, env, *extra):
        cfg = REPO / f"configs/collect/commonsense_smollm2.py:{name},smoke"
        cmd = [sys.executable, "-m", "dnd_jax.collect", "--config", str(cfg), f"--config.data_dir={d}", *lr0, *extra]
        r = warm.run([*cmd, f"--out={out}"], capture_output=True, text=True, env=env, cwd=REPO)
        assert r.returncode == 0, r.stderr[-2000:]
        return converters.flatten(converters.load_peft_adapter(out / name / "step-000002")[0])

    cold = run("toy", data, tmp_path / "c", dict(_env(), DND_JAX_CACHE=str(tmp_path / "empty_cache")))
    cached = run("other", tmp_path / "d2", tmp_path / "c", _env())
    a_keys = [k for k in cold if k.endswith("lora_a")]
    assert len(a_keys) == 7 * 30
    for k in a_keys:
        np.testing.assert_array_equal(cold[k], cached[k], err_msg=k)
    base, _, _ = load_base("smollm2-135m-instruct")
    torch.manual_seed(0)
    c = commonsense_smollm2.get_config("toy,smoke")
    lc = LoraConfig(
        r=c.lora.r, lora_alpha=c.lora.alpha, target_modules=list(c.lora.target_modules), task_type="CAUSAL_LM"
    )
    peft = get_peft_model(base, lc)
    ref = peft.base_model.model.model.layers[5].self_attn.q_proj.lora_A["default"].weight.detach().numpy()
    np.testing.assert_array_equal(cached["layers/5/self_attn/q_proj/lora_a"], ref.T)
    m1, m2 = (json.loads((tmp_path / "c" / n / "manifest.json").read_text()) for n in ("toy", "other"))
    assert m1["init_hash"] == m2["init_hash"]
    write_dataset(tmp_path / "d3", "reseeded")
    run("reseeded", tmp_path / "d3", tmp_path / "c", _env(), "--config.seed=1")
    with pytest.raises(
        DndError,
        match=r"'(reseeded|toy|other)' \(LoRA init [0-9a-f]+\) and '(reseeded|toy|other)' \(init",
    ):
        prepare.prepare_collection(tmp_path / "c", tmp_path / "tok", chunk=64)
    prepare.prepare_collection(tmp_path / "c", tmp_path / "tok", chunk=64, allow_mixed_init=True)


def test_a_second_collect_on_the_same_dataset_is_refused(tmp_path):
    from dnd_jax.fileio import workdir_lock

    data = write_dataset(tmp_path / "data")
    with workdir_lock(tmp_path / "out" / "toy", "collect"):  # a live collect holds toy/
        r = warm.run(_collect_cmd(data, tmp_path / "out"), capture_output=True, text=True, env=_env(), cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'out' / 'toy'}: in use by another collect "
                                                 f"process, pid {os.getpid()} (wait for it to finish, or use another "
                                                 "output directory)")  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out" / "toy").iterdir()) == [".lock"]  # nothing else written


def test_bigbench_sdist_is_found_through_pips_own_index_settings(tmp_path, monkeypatch):
    """A mirror set up for pip (here PIP_INDEX_URL, a local PEP 503 index) is where the sdist is looked up."""
    from dnd_jax.data import bigbench

    page = tmp_path / "simple" / "bigbench"
    page.mkdir(parents=True)
    (page / "index.html").write_text(f'<html><body><a href="../../files/{bigbench.SDIST}#sha256=00">'
                                     f"{bigbench.SDIST}</a></body></html>")  # fmt: skip
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "simple").as_uri())
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    settings = bigbench.pip_settings()
    assert bigbench.index_urls(settings)[0] == (tmp_path / "simple").as_uri()
    assert bigbench.sdist_url(settings) == (tmp_path / "files" / bigbench.SDIST).as_uri()
    (page / "index.html").write_text("<html></html>")
    with pytest.raises(DndError, match=r"cannot find bigbench-1\.0\.0\.tar\.gz on pip.s configured indexes"):
        bigbench.sdist_url(settings)


def test_bigbench_from_a_local_copy_checkout_or_tarball_the_same_tasks(tmp_path, monkeypatch):
    """$DND_JAX_BIGBENCH (the registry no longer serves the sdist): a checkout and a tar.gz of it give the same
    parsed tasks and the same data directory; a wrong path or a missing task is one line."""
    import tarfile

    from dnd_jax.data import bigbench
    from tests.bigbench_fixture import write_bigbench

    tree = write_bigbench(tmp_path / "BIG-bench")
    tgz = tmp_path / "copy.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:  # laid out as the sdist: one top folder, then bigbench/benchmark_tasks
        tar.add(tree / "bigbench", arcname="bigbench-1.0.0/bigbench")
    tasks = ["navigate", "tense"]
    got = {}
    for name, path in (("tree", tree), ("tree_tasks", tree / "bigbench" / "benchmark_tasks"), ("tgz", tgz)):
        monkeypatch.setenv(bigbench.SOURCE_ENV, str(path))
        assert bigbench.source() == path
        got[name] = bigbench.read_tasks(bigbench.source(), tasks)
        out = bigbench.build(tmp_path / f"data_{name}", tasks, test_size=20, seed=3)
        assert json.loads((out / "tense_test.json").read_text())[0]["format"] == "generative"
    assert got["tree"] == got["tree_tasks"] == got["tgz"]
    for i, top in enumerate(("bigbench", "./BIG-bench/bigbench")):  # `git archive` (no top folder), `tar c ./dir`
        with tarfile.open(tmp_path / f"layout{i}.tar.gz", "w:gz") as tar:
            tar.add(tree / "bigbench", arcname=top)
        assert bigbench.read_tasks(tmp_path / f"layout{i}.tar.gz", tasks) == got["tree"]
    assert got["tree"]["navigate"]["examples"][0]["target_scores"] in ({"True": 1, "False": 0},
                                                                        {"True": 0, "False": 1})  # fmt: skip
    for split in ("train", "test"):
        assert (tmp_path / "data_tree" / f"navigate_{split}.json").read_text() == (
            tmp_path / "data_tgz" / f"navigate_{split}.json").read_text()  # fmt: skip
    monkeypatch.setenv(bigbench.SOURCE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DndError, match=r"^DND_JAX_BIGBENCH=.*nowhere: no such file or directory"):
        bigbench.source()
    for path in (tree, tgz):
        with pytest.raises(DndError, match=r"no BIG-bench task social_iqa$"):
            bigbench.read_tasks(path, ["navigate", "social_iqa"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DndError, match=r"no bigbench/benchmark_tasks/ folder"):
        bigbench.read_tasks(tmp_path / "empty", ["navigate"])
    (tree / "bigbench" / "benchmark_tasks" / "tense" / "task.json").write_text('{"examples": [')  # cut short
    raw = tgz.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(raw[:2000])
    bad = [tree, tmp_path / "cut.tar.gz"]
    for pos in range(100, len(raw) - 100, 250):  # damaged compressed data: zlib, CRC and tar header errors
        bad.append(tmp_path / f"bad{pos}.tar.gz")
        bad[-1].write_bytes(raw[:pos] + b"\xff" * 32 + raw[pos + 32 :])
    for path in bad:
        with pytest.raises(DndError, match=r"unreadable BIG-bench copy .*; replace or delete it$"):
            bigbench.read_tasks(path, [*tasks, "object_counting"])


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_response_loss_is_the_models_own_labels_loss_and_gradient(model_type):
    """The collection's loss (the LM head over the predicted span only) against the model's own `labels=` loss, on a
    right-padded batch whose rows' responses start and end at different positions (a small random model of each
    architecture the collections use; Gemma's config soft-caps its logits)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from dnd_jax.collect import _collate, response_loss

    small = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}  # fmt: skip
    extra = {"final_logit_softcapping": 3.0} if model_type == "gemma3_text" else {}
    cfg = transformers.AutoConfig.for_model(model_type, **small, **extra)
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(cfg)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(lm, lora)
    rng = np.random.default_rng(0)
    batch = []
    for prompt, response in ((9, 3), (4, 6), (14, 2)):  # (prompt, response) lengths: ragged, right-padded
        ids = rng.integers(1, 97, prompt + response).tolist()
        batch.append((ids, [-100] * prompt + ids[prompt:]))
    ids, mask, labels = _collate(batch, 0, "cpu")
    grads = []
    for loss_fn in (lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss,
                    lambda: response_loss(model, ids, mask, labels)):  # fmt: skip
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (want, want_g), (got, got_g) = grads
    assert got == pytest.approx(want, rel=1e-6)
    for a, b in zip(want_g, got_g, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # Nothing to predict: the model's own loss (NaN), which the collection reports as a non-finite loss.
    assert np.isnan(float(response_loss(model, ids, mask, torch.full_like(labels, -100))))
