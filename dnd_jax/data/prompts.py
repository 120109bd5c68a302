"""Prompt datasets in the LLaMA-Factory format the original DnD uses.

A data directory holds `dataset_info.json` (registry: name -> {"file_name", "columns"}) and JSON
lists of records. `columns` maps our field names (prompt, response, system) to the record keys.
Records may also carry `choices` (answer texts) and `answer` (gold index) for log-likelihood
scoring. Splits are registry names `<dataset>_train` / `<dataset>_test`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dnd_jax.errors import DndError

REQUIRED = ("prompt", "response")


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


def load_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a dataset JSON file (list of records with "prompt") or a text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise DndError(f"{path}: no such prompts file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DndError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DndError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(records, list):
            raise DndError(f"{path}: expected a JSON list of records or strings")
        prompts = [r if isinstance(r, str) else (r.get("prompt") if isinstance(r, dict) else None) for r in records]
        if any(not isinstance(p, str) for p in prompts):
            raise DndError(f"{path}: every record needs a string 'prompt'")
    else:
        prompts = text.splitlines()
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise DndError(f"{path}: no prompts")
    return prompts


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
