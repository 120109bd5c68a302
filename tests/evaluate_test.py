"""evaluate on the real SmolLM2-135M-Instruct: log-likelihood oracle, a trained LoRA beats the base, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import converters
from configs.collect import commonsense_smollm2
from converters.jax_to_peft import save_peft_adapter
from dnd_jax import evaluate
from dnd_jax.collect import collect
from dnd_jax.errors import DndError
from dnd_jax.lm import load_base
from dnd_jax.protocols import gen, ll
from tests import warm
from tests.lora_fixtures import make_adapter

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Answer by a single [ans] (ans is A or B)."
WORDS = ["river", "stone", "cloud", "apple", "chair", "green", "music", "table", "light", "sugar", "bread", "horse"]


def write_fixed_answer_dataset(root: Path, n: int = 36) -> Path:
    """Two-option questions about a made-up preference whose answer is always option B: the base model
    cannot know the rule, a LoRA learns it in a few steps."""
    rng = np.random.default_rng(1)
    recs = []
    for _ in range(n):
        a, b = rng.choice(WORDS, 2, replace=False)
        recs.append({"prompt": f"Which word does Zorblax prefer?\nA: {a}\nB: {b}", "response": "[B]",
                     "system": SYSTEM, "choices": [str(a), str(b)], "answer": 1})  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    cols = {"prompt": "prompt", "response": "response", "system": "system"}
    info = {}
    for split, part in (("train", recs[:24]), ("test", recs[24:])):
        (root / f"fixed_{split}.json").write_text(json.dumps(part))
        info[f"fixed_{split}"] = {"file_name": f"fixed_{split}.json", "columns": cols}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


@pytest.mark.needs_models
def test_loglikelihoods_match_hf_loss_oracle():
    """Shared-context, cached, padded scoring equals an unpadded forward whose HF cross-entropy gives -log P.

    Contexts of different lengths share batches (left padding), each has several continuations of
    different lengths (one of a single token), and the batch size splits the contexts unevenly."""
    lm, tok, _ = load_base("smollm2-135m-instruct")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    sky, add = "Question: What color is the sky on a clear day?\nAnswer:", "Question: 2 + 2 =\nAnswer:"
    fruit = "Question: Name a fruit.\nAnswer:"
    pairs = [(sky, " blue"), (sky, " a deep shade of green"), (add, " four"), (fruit, " a ripe yellow banana"),
             (add, " 4"), (sky, " red"), (fruit, " apple")]  # fmt: skip
    for bs in (1, 2, 3):
        got = ll.loglikelihoods(lm, tok, pairs, batch_size=bs, device="cpu")
        for (ctx, cont), g in zip(pairs, got, strict=True):
            c = tok(ctx, add_special_tokens=False)["input_ids"]
            x = tok(cont, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([c + x])
            labels = torch.tensor([[-100] * len(c) + x])
            with torch.no_grad():
                loss = lm(input_ids=ids, labels=labels).loss.item()  # mean NLL over the continuation
            assert abs(g - (-loss * len(x))) < 1e-3, (bs, ctx, cont, g, -loss * len(x))


@pytest.mark.needs_models
def test_batched_generation_matches_one_prompt_at_a_time():
    """Shared-prefix cache + padding + early stop give the parser the same text as an unbatched,
    unpadded HF generate of each prompt alone (greedy)."""
    from dnd_jax.lm import chat_prompt_text

    lm, tok, _ = load_base("smollm2-135m-instruct")
    questions = ["What is the capital of France?\nA: Paris\nB: Rome", "Pick a colour.\nA: red\nB: blue\nC: green",
                 "Which animal barks and likes to chase a ball in the park every morning?\nA: cat\nB: dog",
                 "2 + 2 =\nA: 4\nB: 5"]  # fmt: skip
    seqs = [tok(chat_prompt_text(tok, SYSTEM, q), add_special_tokens=False)["input_ids"] for q in questions]
    assert gen._common_prefix(seqs) > 10  # the chat template and system prompt are shared
    got = gen.generate_batch(lm, tok, seqs, 12, "cpu")
    for q, g in zip(seqs, got, strict=True):
        with torch.no_grad():
            out = lm.generate(
                input_ids=torch.tensor([q]), max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id
            )
        alone = tok.decode(out[0, len(q) :], skip_special_tokens=True)
        assert g[: gen.PARSED_CHARS] == alone[: gen.PARSED_CHARS], (g, alone)


def test_question_stem_keeps_dialogue_lines():
    prompt = ("A: Shall we meet later?\nB: Yes, in <MASK>.\nWhich fits the mask?\nA: ten minutes\nB: ten years\n"
              "Please answer with the letter.")  # fmt: skip
    assert ll.question_stem(prompt, ["ten minutes", "ten years"]) == (
        "A: Shall we meet later?\nB: Yes, in <MASK>.\nWhich fits the mask?"
    )
    assert ll.question_stem("Sky colour?\nA: blue\nB: red") == "Sky colour?"


def test_parse_answer_as_the_original():
    assert gen.parse_answer("[C] because", False) == "C"
    assert gen.parse_answer("B: some text", False) == "B"
    assert gen.parse_answer("[2]", False) == "B"
    assert gen.parse_answer("I think it is", False) is None
    assert gen.parse_answer("The answer is true", True) == "True"
    assert gen.parse_answer("[False]", True) == "False"
    assert gen.parse_answer("maybe", True) is None


def _zero_b(tree: dict) -> dict:
    return {
        k: _zero_b(v) if isinstance(v, dict) else (np.zeros_like(v) if k == "lora_b" else v) for k, v in tree.items()
    }


@pytest.mark.needs_models
def test_trained_lora_beats_base_via_cli(tmp_path):
    data = write_fixed_answer_dataset(tmp_path / "data")
    c = commonsense_smollm2.get_config("fixed,smoke")
    c.data_dir = str(data)
    c.phase1.steps, c.phase1.lr, c.phase1.batch_size = 12, 2e-3, 4
    c.phase2.steps = 1
    lora = collect(c, tmp_path / "collect") / "step-000013"
    # The same LoRA with B = 0: exactly the base model, so its scores must equal the base row's.
    params, spec = converters.load_peft_adapter(lora)
    save_peft_adapter(_zero_b(params), spec, tmp_path / "zero_b")
    out = tmp_path / "eval"
    r = warm.run([sys.executable, "-m", "dnd_jax.evaluate", "--base=smollm2-135m-instruct", f"--data={data}",
                        "--dataset=fixed", f"--training={lora}", "--generated", str(lora), str(tmp_path / "zero_b"),
                        "--protocols=ll,gen,nll", f"--out={out}"],
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    base, trained, gen_trained, gen_zero = res["rows"]
    assert trained["gen"]["acc"] > base["gen"]["acc"]
    assert trained["gen"]["acc"] >= 0.9
    assert trained["nll"]["nll"] < 0.5 * base["nll"]["nll"]
    assert gen_zero["nll"]["nll"] == pytest.approx(base["nll"]["nll"], abs=1e-4)
    assert gen_zero["gen"]["acc"] == base["gen"]["acc"]
    spread = abs(gen_trained["gen"]["acc"] - gen_zero["gen"]["acc"]) / 2
    assert spread > 0.2 and res["summary"]["generated"]["gen/acc"]["std"] == pytest.approx(spread)
    assert (out / "results.png").stat().st_size > 1000
    assert "| base |" in (out / "results.md").read_text() and "| base |" in r.stdout


@pytest.mark.needs_models
def test_adapter_for_another_base_model(tmp_path):
    data = write_fixed_answer_dataset(tmp_path / "data")
    _, other = make_adapter("qwen_plain", tmp_path / "tiny")  # a tiny Qwen2 adapter, hidden 64
    with pytest.raises(DndError, match="tiny"):
        evaluate.evaluate("smollm2-135m-instruct", data, "fixed", [("training", "x", Path(other))], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DndError, match="not a PEFT adapter"):
        evaluate.evaluate("smollm2-135m-instruct", data, "fixed", [("training", "x", tmp_path)], tmp_path / "out")


@pytest.mark.needs_models
def test_response_nll_matches_hf_loss_oracle():
    """Batched nll (shared-prefix cache, right padding, head on response positions only) equals HF's own
    cross-entropy of each item alone, token-weighted; prompts of different lengths, one truncated."""
    from dnd_jax.lm import encode_sft_example
    from dnd_jax.protocols.nll import response_nll

    lm, tok, _ = load_base("smollm2-135m-instruct")
    sys_a = "Answer by a single [ans]."
    recs = [{"prompt": "Is the sky blue?\nA: yes\nB: no", "response": "[A]", "system": sys_a},
            {"prompt": "Which is a fruit?\nA: stone\nB: apple\nC: chair", "response": "[B] because apples grow",
             "system": sys_a},
            {"prompt": "Two plus two?", "response": "[4]", "system": ""},
            {"prompt": "word " * 120 + "Pick one.\nA: x\nB: y", "response": "[B]", "system": sys_a}]  # fmt: skip
    total = count = 0
    for r in recs:
        ids, labels = encode_sft_example(tok, r, 96)
        with torch.no_grad():
            loss = lm(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        n = sum(y != -100 for y in labels)
        total, count = total + loss * n, count + n
    for bs in (1, 2, 3):
        got = response_nll(lm, tok, recs, bs, "cpu", cutoff_len=96)
        assert got["tokens"] == count
        assert got["nll"] == pytest.approx(total / count, abs=2e-4)


@pytest.mark.needs_models  # SmolLM2's tokenizer and chat template
def test_response_nll_applies_the_models_logit_soft_capping():
    """A model whose forward soft-caps its logits (Gemma's final_logit_softcapping; a small random one here): the
    nll protocol's head at the response positions equals the model's own cross-entropy, item by item."""
    import transformers

    from dnd_jax.lm import encode_sft_example
    from dnd_jax.protocols.nll import response_nll

    tok = load_base("smollm2-135m-instruct")[1]
    cfg = transformers.AutoConfig.for_model("gemma3_text", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=8, final_logit_softcapping=2.0)  # fmt: skip
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    recs = [{"prompt": "Is the sky blue?\nA: yes\nB: no", "response": "[A]", "system": "Answer by a letter."},
            {"prompt": "Two plus two?", "response": "[4] four", "system": ""}]  # fmt: skip
    got = response_nll(lm, tok, recs, 2, "cpu", cutoff_len=96)["per_item"]
    for r, nll in zip(recs, got, strict=True):
        ids, labels = encode_sft_example(tok, r, 96)
        with torch.no_grad():
            want = lm(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        assert nll == pytest.approx(want, rel=1e-5)


@pytest.mark.needs_models  # the tiny Llama carries SmolLM2's tokenizer
def test_an_adapter_swapped_in_place_scores_as_a_fresh_load(tmp_path):
    """Adapters of one layout are copied into the attached one (no re-injection); each score equals the score of
    the same adapter loaded by PEFT into a fresh model, and an adapter of another layout is loaded through PEFT."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from tests.lora_fixtures import write_tiny_llama

    base = write_tiny_llama(tmp_path / "lm")
    paths = {}
    for name, rank, seed in (("a", 2, 0), ("b", 2, 1), ("c", 4, 2), ("d", 4, 3)):
        torch.manual_seed(seed)
        lm = transformers.LlamaForCausalLM.from_pretrained(base)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "down_proj"],
                         init_lora_weights=False)  # fmt: skip
        get_peft_model(lm, cfg).save_pretrained(tmp_path / name)
        paths[name] = tmp_path / name
    recs = [{"prompt": f"Which word comes first: {a} or {b}?", "response": f"[{a}]", "system": SYSTEM}
            for a, b in zip(WORDS[:4], WORDS[4:8], strict=True)]  # fmt: skip
    scorer = evaluate.Scorer(str(base), device="cpu", batch_size=2)
    got = {n: scorer.score(paths[n], recs, ("nll",))["nll"]["nll"] for n in "abcd"}
    got["base"] = scorer.score(None, recs, ("nll",))["nll"]["nll"]
    assert scorer.swaps == 2  # b into a's layers, d into c's
    for n in "abcd":
        fresh = evaluate.Scorer(str(base), device="cpu", batch_size=2).score(paths[n], recs, ("nll",))["nll"]["nll"]
        assert got[n] == pytest.approx(fresh, abs=1e-6), n
    assert len({round(v, 4) for v in got.values()}) == 5  # every adapter (and the base) scores differently


@pytest.mark.needs_models  # the tiny Llama carries SmolLM2's tokenizer
def test_evaluate_benchmark_runs_on_a_tiny_model(tmp_path):
    """benchmarks/evaluate_bench.py end to end on a tiny random Llama (its figures need SmolLM2; its code must not
    rot between runs): every section prints, and the scores of the two ways agree."""
    from tests.lora_fixtures import write_tiny_llama

    base = write_tiny_llama(tmp_path / "lm")
    data = write_fixed_answer_dataset(tmp_path / "data", n=28)
    r = warm.run([sys.executable, "benchmarks/evaluate_bench.py", "--base", str(base), "--data", str(data),
                        "--dataset", "fixed", "--limit", "4", "--adapters", "2", "--batch-size", "2"], cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    lines = {ln.split(":")[0]: ln for ln in r.stdout.splitlines()}
    assert {"CPU", "ll ", "gen", "swap"} <= set(lines), r.stdout
    assert float(lines["swap"].rsplit(" ", 1)[1]) == 0.0  # the same weights either way: the same scores


@pytest.mark.needs_models  # the tiny Llama carries SmolLM2's tokenizer
def test_a_stopped_evaluation_resumes_scoring_only_what_it_had_not_finished(tmp_path, monkeypatch):
    """The evaluation journal (dnd_jax/journal.py): stopped mid-way, the re-run scores only the rows it had not
    finished and writes the uninterrupted run's results; a line torn by a kill is redone; an adapter whose files
    changed is scored afresh; other settings score every row afresh."""
    from peft import LoraConfig, get_peft_model

    from tests.lora_fixtures import write_tiny_llama

    base = write_tiny_llama(tmp_path / "lm")
    data = write_fixed_answer_dataset(tmp_path / "data", n=28)

    def save_adapter(name, seed):
        torch.manual_seed(seed)
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(load_base(str(base))[0], lora).save_pretrained(tmp_path / name)
        return ("generated", name, tmp_path / name)

    adapters = [save_adapter(f"a{i}", i) for i in range(3)]
    calls, stop_at = [], [0]
    real_score = evaluate.Scorer.score

    def score(self, path, records, protocols):
        calls.append(path.name if path else "base")
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt  # a stop while scoring this row
        return real_score(self, path, records, protocols)

    monkeypatch.setattr(evaluate.Scorer, "score", score)

    def run(out, stop=0, **kw):
        calls.clear()
        stop_at[0] = stop
        return evaluate.evaluate(str(base), data, "fixed", adapters, out, limit=3, protocols=("nll",), batch_size=2,
                                 overwrite=True, **kw)  # fmt: skip

    want = run(tmp_path / "full")
    assert calls == ["base", "a0", "a1", "a2"] and not list(tmp_path.glob(".full.journal*"))
    out, journal = tmp_path / "eval", tmp_path / ".eval.journal.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(out, stop=3)
    assert not out.exists() and len(journal.read_text().splitlines()) == 3  # settings, base, a0
    assert run(out) == want and calls == ["a1", "a2"] and not journal.exists()
    # A torn last line (a kill mid-write) is dropped; the rows before it are kept.
    with pytest.raises(KeyboardInterrupt):
        run(out, stop=3)
    with open(journal, "a") as f:
        f.write('{"key": "01')
    assert run(out) == want and calls == ["a1", "a2"]
    # Other weights under the same path are scored again, the rest is reused.
    with pytest.raises(KeyboardInterrupt):
        run(out, stop=4)
    save_adapter("a1", 7)
    changed = run(out)
    assert calls == ["a1", "a2"] and changed["rows"][2] != want["rows"][2]
    assert changed["rows"][:2] == want["rows"][:2] and changed["rows"][3] == want["rows"][3]
    # Other settings: every row again.
    with pytest.raises(KeyboardInterrupt):
        run(out, stop=3)
    run(out, cutoff_len=64)
    assert calls == ["base", "a0", "a1", "a2"]


def test_a_full_disk_while_journaling_is_one_line_and_keeps_the_rows_before(tmp_path):
    """A row that cannot be appended (a file-size limit standing in for a full disk: EFBIG) is a one-line error; the
    journal still holds the rows written before it."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "from dnd_jax.journal import Journal; from dnd_jax.errors import DndError; "
            f"j = Journal({str(tmp_path / 'j.jsonl')!r}, {{'items': 'x'}}); j.put('base', {{'nll': 1.0}}); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "try:\n    j.put('a0', {'per_item': [0.5] * 2000})\n"
            "except DndError as e:\n    print(e); sys.exit(2)")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 2 and r.stdout.count("\n") == 1 and "j.jsonl: not written" in r.stdout, r.stdout + r.stderr
    from dnd_jax.journal import Journal

    assert Journal(tmp_path / "j.jsonl", {"items": "x"}).get("base") == {"nll": 1.0}
