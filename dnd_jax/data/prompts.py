"""Prompt datasets in the LLaMA-Factory format the original DnD uses.

A data directory holds `dataset_info.json` (registry: name -> {"file_name", "columns"}) and JSON
lists of records. `columns` maps our field names (prompt, response, system) to the record keys.
Records may also carry `choices` (answer texts) and `answer` (gold index) for log-likelihood
scoring. Splits are registry names `<dataset>_train` / `<dataset>_test`.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from dnd_jax.errors import DndError

REQUIRED = ("prompt", "response")
# Condition forms (data.condition; the original's FullCond, CondA, CondQ_A and CondMix datasets, spec §7.9).
CONDITIONS = ("prompts", "answers", "prompts_answers", "mix")
# mix: the probability that a text carries its answer (the original: prompt + answer where random() > 0.8).
MIX_ANSWER_P = 0.2


def read_registry(data_dir: str | Path) -> dict:
    """Reads `dataset_info.json` of a data directory."""
    path = Path(data_dir) / "dataset_info.json"
    if not path.is_file():
        raise DndError(f"{path}: no dataset registry (dataset_info.json) in data directory {data_dir}")
    try:
        reg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DndError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(reg, dict):
        raise DndError(f"{path}: expected a JSON object of datasets")
    return reg


def load_split(data_dir: str | Path, name: str, need_response: bool = True) -> list[dict]:
    """Loads one registered split as records {"prompt", "response", "system", ...extra fields}.

    Args:
      data_dir: directory with dataset_info.json.
      name: registry name, e.g. "ARC-c_train".
      need_response: require the response column (training); prompts-only sets pass False.

    Returns:
      The records, in file order, with the column names mapped to ours.
    """
    reg = read_registry(data_dir)
    if name not in reg:
        raise DndError(
            f"{Path(data_dir) / 'dataset_info.json'}: dataset {name!r} is not registered "
            f"(known: {', '.join(sorted(reg))})"
        )
    entry = reg[name]
    path = Path(data_dir) / entry.get("file_name", "")
    if not path.is_file():
        raise DndError(f"{path}: file of dataset {name!r} not found")
    columns = {"prompt": "prompt", "response": "response", "system": "system", **(entry.get("columns") or {})}
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DndError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(records, list) or not records:
        raise DndError(f"{path}: expected a non-empty JSON list of records")
    out = []
    required = REQUIRED if need_response else ("prompt",)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DndError(f"{path}: record {i} is not an object")
        for col in required:
            if columns[col] not in rec:
                raise DndError(f"{path}: record {i} has no column {columns[col]!r} ({col})")
        item = {k: v for k, v in rec.items() if k not in columns.values()}
        item.update({ours: rec.get(theirs, "") for ours, theirs in columns.items()})
        if not isinstance(item["prompt"], str) or not item["prompt"].strip():
            raise DndError(f"{path}: record {i} has an empty prompt")
        out.append(item)
    return out


def normalize_prompt(text: str) -> str:
    """The form two prompts are compared in (the leak check, de-duplication): Unicode NFKC, case-folded, every
    run of whitespace one space, trimmed. Punctuation is kept: in some tasks it is the content."""
    import unicodedata

    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def load_prompts_file(path: str | Path, form: str = "prompts", seed: int = 0) -> list[str]:
    """Condition texts from a dataset JSON file (a list of records with "prompt", and "response" for the
    forms that read answers, or a list of strings) or a text file (one prompt per line).

    Args:
      path: the file.
      form: condition form (CONDITIONS); every form but "prompts" needs JSON records with responses.
      seed: seed of the mix draw.
    """
    path = Path(path)
    if not path.is_file():
        raise DndError(f"{path}: no such prompts file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DndError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_prompts(text, path.suffix == ".json", form, seed, str(path))


def parse_prompts(text: str, is_json: bool, form: str = "prompts", seed: int = 0, where: str = "prompts") -> list[str]:
    """Condition texts from the contents of a prompts file: `load_prompts_file`'s parser, shared with the web page.

    JSON: a list of strings or records; a record's prompt is its "prompt", or LLaMA-Factory's alpaca "instruction"
    followed by its "input" on a new line; its answer is "response" (or alpaca's "output"). Text: one prompt per
    line. Blank prompts are dropped.

    Args:
      text: the contents.
      is_json: whether `text` is JSON (a .json file).
      form: condition form (CONDITIONS); every form but "prompts" needs JSON records with responses.
      seed: seed of the mix draw.
      where: the source, for error messages.
    """
    if is_json:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DndError(f"{where}: invalid JSON ({e})") from None
        if not isinstance(records, list):
            raise DndError(f"{where}: expected a JSON list of records or strings")
        records = [{"prompt": r} if isinstance(r, str) else _alpaca(r) for r in records]
        if any(not isinstance(r, dict) or not isinstance(r.get("prompt"), str) for r in records):
            raise DndError(f"{where}: every record needs a string 'prompt' (or LLaMA-Factory's 'instruction')")
    else:
        if needs_answers(form):
            raise DndError(f"{where}: a text file holds prompts only; condition form {form!r} needs a JSON list of "
                           '{"prompt", "response"} records (or pass --condition prompts)')  # fmt: skip
        records = [{"prompt": p} for p in text.splitlines()]
    records = [r for r in records if r["prompt"].strip()]
    if not records:
        raise DndError(f"{where}: no prompts")
    return condition_texts(records, form, seed, where)


def _alpaca(r):
    """A LLaMA-Factory alpaca record ({"instruction", "input", "output"}) as {"prompt", "response"}; others as-is."""
    if not isinstance(r, dict) or "prompt" in r or not isinstance(r.get("instruction"), str):
        return r
    extra = r.get("input") if isinstance(r.get("input"), str) else ""
    out = {"prompt": r["instruction"] + ("\n" + extra if extra else "")}
    if isinstance(r.get("output"), str):
        out["response"] = r["output"]
    return out


def sample_prompt_batch(num_prompts: int, num_texts: int, rng: np.random.Generator, where: str = "prompts"):
    """Indices of `num_texts` prompts drawn without replacement (the original's random.sample).

    Args:
      num_prompts: size of the pool.
      num_texts: prompts per sample (128 in the paper).
      rng: a seeded NumPy generator (reproducible).
      where: the dataset, for the error message.
    """
    if num_prompts < num_texts:
        raise DndError(f"{where}: {num_prompts} prompts, fewer than num_texts={num_texts}")
    return rng.choice(num_prompts, size=num_texts, replace=False)


def check_condition(form: str) -> None:
    if form not in CONDITIONS:
        raise DndError(f"config field data.condition: {form!r} (expected one of {', '.join(CONDITIONS)})")


def needs_answers(form: str) -> bool:
    """Whether a condition form reads the responses (labeled examples), not only the prompts."""
    check_condition(form)
    return form != "prompts"


def condition_texts(records: list[dict], form: str, seed: int, where: str) -> list[str]:
    """The texts a condition is made of, one per record, in record order (spec §7.9).

    Args:
      records: `load_split` records (or {"prompt", "response"} dicts from a prompts file).
      form: "prompts" (the prompt only: the default and the only form for unlabeled prompts), "answers"
        (the response only), "prompts_answers" (prompt + "answer: " + response, the original's text with no
        separator) or "mix" (each text is prompt + answer with probability MIX_ANSWER_P, else the prompt;
        drawn once per text from (seed, the text itself), as the original fixes it when the dataset is built:
        the same records and seed give the same texts wherever they are read from, CLI or experiment).
      seed: the run's seed (mix only).
      where: the dataset or file, for error messages.

    Returns:
      One string per record.
    """
    if not needs_answers(form):
        return [r["prompt"] for r in records]
    for i, r in enumerate(records):
        if not isinstance(r.get("response"), str) or not r["response"].strip():
            raise DndError(f"{where}: record {i} has no response; condition form {form!r} needs labeled "
                           "examples (use data.condition='prompts' for unlabeled prompts)")  # fmt: skip
    if form == "answers":
        return [r["response"] for r in records]
    with_answer = [r["prompt"] + "answer: " + r["response"] for r in records]
    if form == "prompts_answers":
        return with_answer
    carry = [np.random.default_rng([seed, 29, zlib.crc32(w.encode())]).random() < MIX_ANSWER_P for w in with_answer]
    return [w if c else r["prompt"] for w, c, r in zip(with_answer, carry, records, strict=True)]
