"""The exact-match protocol (dnd_jax/protocols/em.py) against an oracle outside it: plain transformers generate, one
item at a time, no shared prefix, no stopping criterion; and its normalisation."""

from __future__ import annotations

import pytest
import torch

from dnd_jax.lm import chat_prompt_text, load_base
from dnd_jax.protocols.em import matches, normalize, score_em


def test_normalisation_folds_case_space_and_edge_punctuation_only():
    assert normalize('  "Paris."\n') == "paris" and normalize("New   York!") == "new york"
    assert normalize("3.5") == "3.5" and normalize("don't") == "don't"
    rec = {"response": "blue", "answers": ["blue", "Navy Blue"]}
    assert matches("Navy blue.\nmore text", rec) and matches(" BLUE", rec) and not matches("light blue", rec)
    assert matches("[C]", {"response": "[C]"})  # multiple-choice records: the response is the one answer


@pytest.mark.needs_models
def test_em_matches_one_by_one_greedy_generation():
    model, tok, _ = load_base("smollm2-135m-instruct")
    records = [
        {"prompt": "What is the capital of France? Answer with one word.", "response": "Paris", "system": ""},
        {"prompt": "Say the word yes.", "response": "yes", "answers": ["yes", "Yes!"], "system": ""},
        {"prompt": "What is 2 + 2? Answer with a number.", "response": "4", "system": ""},
        {"prompt": "Name a primary colour.", "response": "zebra", "system": ""},
        {"prompt": "Repeat exactly: the cat sat", "response": "the cat sat", "system": ""},
    ]
    hits = 0
    for r in records:
        ids = tok(chat_prompt_text(tok, "", r["prompt"]), return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
        hits += matches(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True), r)
    got = score_em(model, tok, records, batch_size=4, device="cpu")
    assert got == {"em": hits / len(records), "n": len(records)}
    assert 0 < hits < len(records)  # the oracle itself tells right from wrong here
