"""BIG-bench tasks (the `bigbench==1.0.0` sdist, or a local copy of it) in the project's dataset format.

Tasks are read (`source`) from $DND_JAX_BIGBENCH (a copy of the sdist, any tar.gz of the repository, or a
checkout), else from the sdist cached in $DND_JAX_CACHE (default ~/.cache/dnd_jax), else from the sdist (358 MB,
Apache-2.0) downloaded through pip's own indexes, certificate and proxy and sha256-checked: since 2026-12 the
registry no longer serves it (0.0.1 only, no tasks). Only the needed `benchmark_tasks/<task>/task.json` files are
read ("task/subtask" for subtasks); it is never pip-installed (it pulls TensorFlow). Each task becomes
`<name>_train.json` / `<name>_test.json` (a seeded split: BIG-bench gives none), registered in `dataset_info.json`,
in one of two formats (`task_format`):

  multiple_choice  examples with `target_scores`: records {"prompt", "response", "system", "choices", "answer"}
                   like the common-sense suite: lettered options, response "[C]", the shared SYSTEM prompt that
                   asks for that form. Built exactly as before generative tasks existed (repeats included).
  generative       examples with a `target` (a string or a list of strings): records {"prompt", "response",
                   "system", "answers", "format": "generative"}. The prompt is BIG-bench's own zero-shot text
                   (task_prefix + example_input_prefix + input + example_output_prefix, its defaults "\nQ: " /
                   "\nA: "), stripped; the response is the first target, stripped; `answers` holds every
                   acceptable target for exact-match scoring. The system prompt is empty: the chat template's
                   own default turn (SmolLM2: "You are a helpful AI assistant named SmolLM, ..."), so no
                   instruction shared by all tasks fixes the answer's form; each task's form comes from its
                   own prefix and targets. A prompt repeated within a task is one item (`_generative_records`).

A task that cannot be used (no usable example, fewer than MIN_EXAMPLES, not English) is skipped with one
printed line and listed with its reason in the directory's `skipped.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from dnd_jax.assets import cache_dir
from dnd_jax.errors import DndError
from dnd_jax.fileio import atomic_dir

SDIST = "bigbench-1.0.0.tar.gz"
# A local copy of BIG-bench (sdist, repository tarball or checkout), used before the cache and the registry.
SOURCE_ENV = "DND_JAX_BIGBENCH"
SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
LETTERS = "ABCDEFGH"
SYSTEM = ("You are going to answer the question of the user by picking one answer among the given choices. "
          "Answer by a single [ans] (ans is the letter of the choice).")  # fmt: skip
# Generative records: no system turn (the chat template's default one), so no shared format instruction.
GENERATIVE_SYSTEM = ""
# Fewest usable examples a task needs (a 64-item test split and a training split of about its size).
MIN_EXAMPLES = 100
# A task whose letters are more than this share non-ASCII is taken for non-English (a guard: the task lists
# are chosen English by hand; German written in ASCII passes it).
NON_ENGLISH = 0.2
# The list of the tasks `build` left out of a data directory, with the reasons.
SKIPPED = "skipped.json"


def pip_settings() -> dict[str, str]:
    """pip's own configuration (`pip config list`: config files and PIP_* variables, the environment winning),
    the fields that say where and how pip reaches its index: index-url, extra-index-url, cert, proxy, timeout."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    found: dict[str, tuple[int, str]] = {}
    rank = {"global": 0, "download": 1, "install": 1, ":env:": 2}
    for line in r.stdout.splitlines():
        key, sep, value = line.partition("=")
        section, _, field = key.rpartition(".")
        if sep and section in rank and rank[section] >= found.get(field, (-1, ""))[0]:
            found[field] = (rank[section], value.strip().strip("'\""))
    return {k: v for k, (_, v) in found.items()}


def index_urls(settings: dict[str, str]) -> list[str]:
    """The indexes pip would search, in its order: index-url (default PyPI), then each extra-index-url."""
    main = settings.get("index-url", "https://pypi.org/simple")
    return [main, *settings.get("extra-index-url", "").split()]


def _opener(settings: dict[str, str]):
    import ssl

    handlers = []
    if settings.get("cert"):
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=settings["cert"])))
    if settings.get("proxy"):
        handlers.append(urllib.request.ProxyHandler({"http": settings["proxy"], "https": settings["proxy"]}))
    return urllib.request.build_opener(*handlers)


def sdist_url(settings: dict[str, str]) -> str:
    """The sdist's URL on the first of pip's configured indexes that lists it (PEP 691 JSON or PEP 503 HTML)."""
    from urllib.parse import urldefrag, urljoin

    opener, tried = _opener(settings), []
    timeout = float(settings.get("timeout") or settings.get("default-timeout") or 60)
    for index in index_urls(settings):
        page = index.rstrip("/") + "/bigbench/"
        if page.startswith("file:"):  # a local index: a directory per project with its index.html, as pip reads it
            page += "index.html"
        req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
        try:
            with opener.open(req, timeout=timeout) as r:
                body, kind = r.read().decode("utf-8", "replace"), r.headers.get("Content-Type", "")
        except (OSError, ValueError) as e:
            tried.append(f"{page} ({e})")
            continue
        if "json" in kind:
            urls = {f["filename"]: f["url"] for f in json.loads(body).get("files", [])}
        else:
            urls = {m[2].strip(): m[1] for m in re.finditer(r'<a[^>]*href="([^"]+)"[^>]*>([^<]+)</a>', body)}
        if SDIST in urls:
            return urldefrag(urljoin(page, urls[SDIST]))[0]  # the #sha256= fragment: checked here anyway
        tried.append(f"{page} (no {SDIST})")
    raise DndError(
        f"cannot find {SDIST} on pip's configured indexes: "
        + "; ".join(tried)
        + f"; set {SOURCE_ENV} to a local copy of BIG-bench (the sdist, or a checkout of its repository)"
    )


def source() -> Path:
    """Where the BIG-bench tasks are read from: $DND_JAX_BIGBENCH if set, else the cached (or downloaded) sdist."""
    local = os.environ.get(SOURCE_ENV, "")
    if not local:
        return fetch_sdist()
    path = Path(local).expanduser()
    if not (path.is_dir() or path.is_file()):
        raise DndError(f"{SOURCE_ENV}={local}: no such file or directory (a BIG-bench sdist or checkout)")
    return path


def _tasks_root(path: Path) -> Path:
    """The `benchmark_tasks` folder of a BIG-bench checkout at `path` (or `path` itself when it is that folder)."""
    for root in (path / "bigbench" / "benchmark_tasks", path / "benchmark_tasks", path):
        if root.is_dir() and (root.name == "benchmark_tasks" or any(root.glob("*/task.json"))):
            return root
    raise DndError(f"{path}: no bigbench/benchmark_tasks/ folder (expected a BIG-bench checkout or sdist)")


def fetch_sdist() -> Path:
    """The cached sdist, downloaded (and sha256-checked) on first use."""
    path = cache_dir() / SDIST
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    from tqdm import tqdm

    settings = pip_settings()
    try:
        with _opener(settings).open(sdist_url(settings), timeout=120) as r, part.open("wb") as f:
            h = hashlib.sha256()
            bar = tqdm(total=int(r.headers.get("Content-Length", 0)), unit="B", unit_scale=True, desc=SDIST,
                       file=sys.stderr)  # fmt: skip
            while chunk := r.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
            bar.close()
    except OSError as e:
        part.unlink(missing_ok=True)
        raise DndError(
            f"cannot download {SDIST} from the package registry ({e}); set {SOURCE_ENV} to a local copy"
        ) from None
    if h.hexdigest() != SHA256:
        part.unlink(missing_ok=True)
        raise DndError(f"{SDIST}: sha256 {h.hexdigest()} differs from the published {SHA256}")
    part.rename(path)
    return path


def member_key(name: str) -> str:
    """A tar member's path below `bigbench/benchmark_tasks/` at any depth ("" when not there): `<task>/task.json`."""
    return ("/" + name.removeprefix("./")).partition("/bigbench/benchmark_tasks/")[2]


def read_tasks(sdist: Path, tasks: list[str]) -> dict[str, dict]:
    """{task: parsed task.json} of the named tasks ("social_iqa", "a/b"), from a tar.gz or a checkout directory."""
    where, out = _tasks_root(sdist) if sdist.is_dir() else sdist, {}
    try:
        if sdist.is_dir():
            out = {t: json.loads((where / t / "task.json").read_bytes()) for t in tasks
                   if (where / t / "task.json").is_file()}  # fmt: skip
        else:
            want = {f"{t}/task.json": t for t in tasks}
            with tarfile.open(sdist, "r:gz") as tar:
                for m in tar:
                    if (key := member_key(m.name)) in want and (f := tar.extractfile(m)) is not None:
                        out[want[key]] = json.loads(f.read())
                        if len(out) == len(want):
                            break
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as e:
        raise DndError(f"{where}: unreadable BIG-bench copy ({e}); replace or delete it") from None
    missing = sorted(set(tasks) - set(out))
    if missing:
        raise DndError(f"{where}: no BIG-bench task {', '.join(missing)}")
    return out


def task_format(task: dict) -> str:
    """A task's format: "multiple_choice" when its examples carry `target_scores` (BIG-bench's scored options),
    else "generative" (free text, checked against the examples' `target`)."""
    return "multiple_choice" if any("target_scores" in ex for ex in task.get("examples") or ()) else "generative"


def record_format(rec: dict) -> str:
    """The format of a record: its "format" field (generative records), else "multiple_choice" when it carries
    options (multiple-choice records of this module and the common-sense suite), else "generative"."""
    return rec.get("format") or ("multiple_choice" if "choices" in rec else "generative")


def to_records(task: dict, name: str, max_choices: int = 4) -> list[dict]:
    """A task's examples as records, by `task_format`: lettered multiple choice, or the task's own text.

    Args:
      task: a parsed task.json.
      name: the task's name (for messages).
      max_choices: multiple choice keeps examples with one correct option among 2..max_choices.

    Returns:
      The records in example order. Raises DndError when no example is usable.
    """
    if task_format(task) == "multiple_choice":
        return _multiple_choice_records(task, name, max_choices)
    return _generative_records(task, name)


def _multiple_choice_records(task: dict, name: str, max_choices: int) -> list[dict]:
    """Examples with one correct option among 2..max_choices, as lettered multiple-choice records."""
    recs = []
    for ex in task.get("examples", []):
        scores = ex.get("target_scores") or {}
        opts = list(scores)
        gold = [i for i, o in enumerate(opts) if scores[o] == 1]
        if not 2 <= len(opts) <= max_choices or len(gold) != 1:
            continue
        lines = "\n".join(f"{LETTERS[i]}: {o.strip()}" for i, o in enumerate(opts))
        recs.append({"prompt": f"{ex['input'].strip()}\n{lines}", "response": f"[{LETTERS[gold[0]]}]",
                     "system": SYSTEM, "choices": [o.strip() for o in opts], "answer": gold[0]})  # fmt: skip
    if not recs:
        raise DndError(f"BIG-bench task {name}: no usable multiple-choice examples")
    return recs


def generative_prompt(task: dict, text: str) -> str:
    """BIG-bench's zero-shot prompt of one example, stripped: task_prefix + example_input_prefix + input +
    example_output_prefix, with BIG-bench's defaults ("", "\\nQ: ", "\\nA: ") where the task sets none."""
    return (str(task.get("task_prefix", "")) + str(task.get("example_input_prefix", "\nQ: ")) + text
            + str(task.get("example_output_prefix", "\nA: "))).strip()  # fmt: skip


def targets(example: dict) -> list[str]:
    """An example's acceptable answers: its `target` (a string or a list of them), stripped, empty and non-text
    ones left out, duplicates once, in the task's order."""
    t = example.get("target")
    out = [s.strip() for s in (t if isinstance(t, list) else [t]) if isinstance(s, str)]
    return list(dict.fromkeys(s for s in out if s))


def prompt_key(prompt: str) -> str:
    """A prompt as the leak check compares prompts (`dnd_jax.data.prompts.normalize_prompt`)."""
    from dnd_jax.data.prompts import normalize_prompt

    return normalize_prompt(prompt)


def _generative_records(task: dict, name: str) -> list[dict]:
    """Examples with a text input and at least one text target, one record per distinct prompt: the response is
    the first target, `answers` every acceptable target.

    An exact repeat of a prompt adds its targets to the first one's answers (BIG-bench accepts either); a near
    repeat (equal under `prompt_key`: "Context Word:  Stones." / "context word: stones.") is left out, so no
    test item of a task is in its own train split by the leak check's comparison.
    """
    recs: dict[str, dict] = {}
    for ex in task.get("examples", []):
        answers, text = targets(ex), ex.get("input")
        if not answers or not isinstance(text, str) or not text.strip():
            continue
        prompt = generative_prompt(task, text)
        key = prompt_key(prompt)
        if key in recs:
            if recs[key]["prompt"] == prompt:
                recs[key]["answers"] = list(dict.fromkeys([*recs[key]["answers"], *answers]))
            continue
        recs[key] = {"prompt": prompt, "response": answers[0], "system": GENERATIVE_SYSTEM, "answers": answers,
                     "format": "generative"}  # fmt: skip
    if not recs:
        raise DndError(f"BIG-bench task {name}: no example with a text input and a non-empty text target")
    return list(recs.values())


def non_ascii_share(recs: list[dict], sample: int = 500) -> float:
    """Share of non-ASCII letters in the prompts and responses of the first `sample` records."""
    text = "".join(r["prompt"] + r["response"] for r in recs[:sample])
    letters = [ch for ch in text if ch.isalpha()]
    return sum(not ch.isascii() for ch in letters) / max(len(letters), 1)


def usable_records(task: dict, name: str, max_choices: int = 4, min_examples: int = MIN_EXAMPLES,
                   fits=None) -> list[dict]:  # fmt: skip
    """`to_records`, or DndError with the reason the task cannot be used: no usable example, fewer than
    `min_examples` of them, or text that is not English (more than NON_ENGLISH of its letters non-ASCII).
    `fits(record) -> bool`: keep only the examples it accepts (whole examples within the collection's cut-off)."""
    if not task.get("examples"):
        raise DndError(f"BIG-bench task {name}: no examples (a parent of subtasks?)")
    recs = to_records(task, name, max_choices)
    if fits is not None:
        kept = [r for r in recs if fits(r)]
        if len(kept) < min_examples:
            raise DndError(f"BIG-bench task {name}: {len(kept)} of its {len(recs)} usable examples fit the cut-off "
                           f"whole, fewer than {min_examples}")  # fmt: skip
        recs = kept
    if len(recs) < min_examples:
        raise DndError(f"BIG-bench task {name}: {len(recs)} usable examples, fewer than {min_examples}")
    share = non_ascii_share(recs)
    if share > NON_ENGLISH:
        raise DndError(f"BIG-bench task {name}: not English ({share:.0%} of its letters are non-ASCII)")
    return recs


def build(out_dir: str | Path, tasks: list[str], test_size: int, seed: int = 0, max_train: int | None = None,
          max_choices: int = 4, min_examples: int = MIN_EXAMPLES, fits=None) -> Path:  # fmt: skip
    """Writes the tasks as a data directory (dataset_info.json + splits); skips when already built.

    A task that cannot be used (see `usable_records`) is left out with one printed line, and recorded with
    its reason in `skipped.json` of the directory (`skipped`); a name the sdist lacks is an error.

    Args:
      out_dir: the data directory to write.
      tasks: BIG-bench task names ("social_iqa", "goal_step_wikihow/goal_inference", ...).
      test_size: test items per task (at most a third of the task).
      seed: seed of the train/test split.
      max_train: cap on training items per task.
      max_choices: keep multiple-choice examples with 2..max_choices options (at most 8).
      min_examples: fewest usable examples (after dropping repeated generative prompts) a task needs.
      fits: None, or record -> bool: examples it rejects are dropped before the split (`whole_examples`).

    Returns:
      out_dir.
    """
    out_dir = Path(out_dir)
    marker = out_dir / "dataset_info.json"
    if marker.is_file():
        have = {**json.loads(marker.read_text()), **{f"{task_name(t)}_train": 1 for t in skipped(out_dir)}}
        if all(f"{task_name(t)}_train" in have for t in tasks):
            return out_dir
    parsed = read_tasks(source(), tasks)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        info, left_out = {}, {}
        cols = {"prompt": "prompt", "response": "response", "system": "system"}
        for t in tasks:
            try:
                recs = usable_records(parsed[t], t, max_choices, min_examples, fits)
            except DndError as e:
                left_out[t] = str(e).removeprefix(f"BIG-bench task {t}: ")
                print(f"BIG-bench task {t}: skipped ({left_out[t]})", flush=True)
                continue
            order = np.random.default_rng([seed, len(recs)]).permutation(len(recs))
            n_test = min(test_size, len(recs) // 3)
            test, train = [recs[i] for i in order[:n_test]], [recs[i] for i in order[n_test:]][:max_train]
            for split, part in (("train", train), ("test", test)):
                (tmp / f"{task_name(t)}_{split}.json").write_text(json.dumps(part, indent=1))
                info[f"{task_name(t)}_{split}"] = {"file_name": f"{task_name(t)}_{split}.json", "columns": cols}
        (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2))
        if left_out:
            (tmp / SKIPPED).write_text(json.dumps(left_out, indent=1))
    return out_dir


def skipped(data_dir: str | Path) -> dict[str, str]:
    """{task: reason} of the tasks `build` left out of `data_dir` (empty when none was)."""
    path = Path(data_dir) / SKIPPED
    return json.loads(path.read_text()) if path.is_file() else {}


def task_name(task: str) -> str:
    """The dataset name of a BIG-bench task ("a/b" -> "a-b")."""
    return task.replace("/", "-")


def whole_examples(model: str, cutoff_len: int):
    """record -> bool: whether the chat-formatted example (`lm.encode_sft_example`) fits `cutoff_len` tokens of
    `model`'s tokenizer whole. Collection and scoring cut longer ones (the prompt from its end first, LLaMA-Factory's
    rule), which can cut away the question a long generative prompt ends with; dropping them keeps every example
    intact."""
    import transformers

    from dnd_jax.assets import resolve_model
    from dnd_jax.lm import encode_sft_example

    tok = transformers.AutoTokenizer.from_pretrained(resolve_model(model))
    return lambda rec: len(encode_sft_example(tok, rec, 1 << 30)[0]) <= cutoff_len
