"""Bad input, command by command: every case must exit with status 2 and one `error:` line naming what and
where (no traceback, no repr noise), and leave every output that existed before byte-for-byte as it was.

Each case gets its own copy of a small world (prompt datasets, a synthetic PEFT collection, a finished
2-step generator run, a tiny Llama base model and a collection made with it), breaks one thing, and runs
the real command line in a process of its own (`python -m ...`, forked warm by tests/warm.py: the same `__main__`,
exit status and streams). The cases run two at a time (the machine has 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import transformers

from converters.synthetic import write_synthetic_adapter
from tests import warm
from tests.collect_test import write_dataset
from tests.lora_fixtures import QWEN2, write_tiny_llama
from tests.train_fixtures import cli_env, cli_overrides, make_experiment

pytestmark = pytest.mark.needs_models  # every test here loads SmolLM2 or all-MiniLM-L6-v2
REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Case:
    """One bad input: `setup(root)` breaks something in the case's copy of the world and returns the argv;
    the `error:` line must contain every string of `expect`; new files may appear only under `new_ok`."""

    name: str
    setup: object
    expect: tuple[str, ...]
    new_ok: tuple[str, ...] = ()
    fsize_limit: int | None = None  # bytes: a file-size limit stands in for a full disk (writes fail, EFBIG)
    env: dict = field(default_factory=dict)
    tokens_ready: bool = False  # start with the world's prepared token store (its 473 KB files need no writing)


# ------------------------------------------------------------------------------------------- the world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    import jax

    from dnd_jax import trainer
    from tests.train_fixtures import tiny_config

    root = tmp_path_factory.mktemp("world")
    make_experiment(root / "exp")
    over = {"train.steps": 2, "mesh.shape": (1, 1), "data.token_dir": str(root / "run-tokens")}
    trainer.train_and_evaluate(tiny_config(root / "exp", **over), root / "run", devices=jax.devices()[:1])
    write_tiny_llama(root / "llama")
    write_dataset(root / "toy")
    r = warm.run(_collect(root, "toy"), env=cli_env(), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (root / "prompts.txt").write_text("\n".join(f"What is {i} + {i}?" for i in range(8)) + "\n")
    return root


def _train(root: Path, *extra: str, config: str = "configs/arc_c.py:smoke", **over) -> list[str]:
    return [PY, "-m", "dnd_jax.train", "--config", str(REPO / config), f"--workdir={root / 'work'}",
            *cli_overrides(root / "exp", **over), *extra]  # fmt: skip


def _collect(root: Path, dataset: str = "toy", *extra: str) -> list[str]:
    cfg = REPO / f"configs/collect/commonsense_smollm2.py:{dataset},smoke"
    return [PY, "-m", "dnd_jax.collect", "--config", str(cfg),
            f"--config.model={root / 'llama'}", f"--config.data_dir={root / 'toy'}", "--config.device=cpu",
            f"--out={root / 'collected'}", *extra]  # fmt: skip


def _generate(root: Path, prompts: Path, *extra: str) -> list[str]:
    return [PY, "-m", "dnd_jax.generate", "--workdir", str(root / "run"), "--prompts", str(prompts), "--out",
            str(root / "gen"), *extra]  # fmt: skip


def _evaluate(root: Path, adapter: Path) -> list[str]:
    return [PY, "-m", "dnd_jax.evaluate", "--base", str(root / "llama"), "--data", str(root / "toy"), "--dataset",
            "toy", "--generated", str(adapter), "--out", str(root / "eval"), "--limit", "2"]  # fmt: skip


def _ckpt(root: Path, name: str = "alpha", step: int = 2) -> Path:
    return root / "exp" / "collect" / name / f"step-{step:06d}"


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _poke(path: Path, fn) -> None:
    """Rewrites one safetensors file through `fn(dict of arrays) -> dict of arrays`."""
    from safetensors.numpy import load_file, save_file

    save_file(fn(load_file(path)), path, metadata={"format": "pt"})


def _set_first(value):
    def fn(sd):
        k = sorted(sd)[0]
        sd[k] = sd[k].copy()
        sd[k].flat[3] = value
        return sd

    return fn


def _other_base(root: Path) -> Path:
    """An adapter for a wider Qwen2 (another base model), put in place of one checkpoint."""
    cfg = transformers.Qwen2Config(**{**QWEN2, "hidden_size": 96, "num_attention_heads": 4})
    d = _ckpt(root)
    shutil.rmtree(d)
    write_synthetic_adapter(d, cfg, r=8, alpha=16, dtype="float32", seed=5, base_name="another-qwen2")
    return d


def _rank4(root: Path) -> Path:
    d = _ckpt(root)
    shutil.rmtree(d)
    write_synthetic_adapter(d, transformers.Qwen2Config(**QWEN2), r=4, alpha=8, dtype="float32", seed=5,
                            base_name="tiny-qwen2")  # fmt: skip
    return d


def _manifests_with_inits(root: Path) -> None:
    for i, name in enumerate(("alpha", "beta", "gamma")):
        _write(root / "exp" / "collect" / name / "manifest.json", json.dumps({"init_hash": f"{i:016d}"}))


def _other_config_workdir(root: Path) -> None:
    shutil.copytree(root / "run", root / "work")  # trained with train.steps 2; the case asks for 3


def _records(root: Path, recs) -> None:
    _write(root / "exp" / "prompts" / "alpha_train.json", json.dumps(recs))


def _toy_records(root: Path, data) -> None:
    _write(root / "toy" / "toy_train.json", data if isinstance(data, bytes) else json.dumps(data))


def _unfinish(root: Path, **manifest) -> None:
    """The world's finished toy collection, reopened mid-run (not complete), with manifest fields replaced."""
    ds = root / "collected" / "toy"
    m = json.loads((ds / "manifest.json").read_text())
    m.update(complete=False, **manifest)
    m["config"].update(data_dir=str(root / "toy"), model=str(root / "llama"))  # this copy's paths
    (ds / "manifest.json").write_text(json.dumps(m))


CASES = [
    # ---- config: unknown field, wrong type, impossible values, placeholders, files
    Case("unknown config field", lambda r: _train(r, "--config.train.stepz=3"),
         ("train.stepz", "no existing field")),
    Case("wrong type", lambda r: _train(r, "--config.train.steps=abc"), ("train.steps", "abc")),
    Case("negative batch", lambda r: _train(r, **{"train.batch_size": -4}), ("train.batch_size", "must be positive")),
    Case("zero steps", lambda r: _train(r, **{"train.steps": 0}), ("train.steps", "must be positive")),
    Case("negative seed", lambda r: _train(r, seed=-1), ("config field seed", "from 0 to 2147483647")),
    Case("batch not divisible by the mesh", lambda r: _train(r, **{"train.batch_size": 6, "mesh.shape": (4, 2)}),
         ("train.batch_size", "not divisible by the 8 devices")),
    Case("config file missing", lambda r: _train(r, config="configs/nope.py"), ("nope.py",)),
    Case("config argument typo", lambda r: _train(r, config="configs/arc_c.py:smok"), ("smok",)),
    Case("{workdir} outside the pipeline", lambda r: _train(r, config="configs/demo.py:smoke"),
         ("{workdir}", "dnd_jax.pipeline")),
    Case("pipeline prompt datasets missing", lambda r: [PY, "-m", "dnd_jax.pipeline", "--config",
                                                         str(REPO / "configs/demo.py:smoke"), f"--workdir={r / 'demo'}",
                                                         f"--config.data.prompts_dir={r / 'nowhere'}"],
         ("nowhere: no dataset_info.json", "../shared/data/commonsense")),
    Case("workdir of another config", lambda r: (_other_config_workdir(r), _train(r, **{"train.steps": 3}))[1],
         ("work", "different config")),
    # ---- collections: corrupt, truncated, mixed, foreign, non-finite
    Case("corrupt safetensors", lambda r: (_write(_ckpt(r) / "adapter_model.safetensors", b"\x00" * 64), _train(r))[1],
         ("alpha/step-000002/adapter_model.safetensors",), new_ok=("exp/tokens/",)),
    Case("truncated safetensors",
         lambda r: (_truncate(_ckpt(r, "beta", 3) / "adapter_model.safetensors"), _train(r))[1],
         ("beta/step-000003/adapter_model.safetensors",), new_ok=("exp/tokens/",)),
    Case("checkpoints mixing ranks", lambda r: (_rank4(r), _train(r))[1], ("alpha", "rank"), new_ok=("exp/tokens/",)),
    Case("checkpoints mixing base models", lambda r: (_other_base(r), _train(r))[1], ("alpha",),
         new_ok=("exp/tokens/",)),
    Case("collections with different LoRA inits", lambda r: (_manifests_with_inits(r), _train(r))[1],
         ("LoRA init",), new_ok=("exp/tokens/",)),
    Case("missing adapter_config.json", lambda r: ((_ckpt(r) / "adapter_config.json").unlink(), _train(r))[1],
         ("alpha/step-000002", "adapter_config.json"), new_ok=("exp/tokens/",)),
    Case("NaN in a checkpoint", lambda r: (_poke(_ckpt(r) / "adapter_model.safetensors", _set_first(np.nan)),
                                           _train(r))[1], ("alpha/step-000002", "NaN"), new_ok=("exp/tokens/",)),
    Case("Inf in a checkpoint", lambda r: (_poke(_ckpt(r, "gamma", 4) / "adapter_model.safetensors",
                                                 _set_first(np.inf)), _train(r))[1],
         ("gamma/step-000004", "Inf"), new_ok=("exp/tokens/",)),
    # ---- prompt datasets
    Case("dataset JSON missing a column", lambda r: (_records(r, [{"response": "[A]"}] * 12), _train(r))[1],
         ("alpha_train.json", "record 0", "prompt"), new_ok=("exp/tokens/",)),
    Case("dataset JSON with a mistyped column", lambda r: (_records(r, [{"prompt": 5, "response": "[A]"}] * 12),
                                                          _train(r))[1],
         ("alpha_train.json", "record 0", "prompt"), new_ok=("exp/tokens/",)),
    Case("empty dataset JSON", lambda r: (_records(r, []), _train(r))[1], ("alpha_train.json", "non-empty"),
         new_ok=("exp/tokens/",)),
    # ---- training itself
    Case("NaN loss", lambda r: _train(r, **{"train.learning_rate": 1e30, "train.steps": 4}),
         ("work", "non-finite loss", "train.learning_rate"), new_ok=("exp/tokens/", "work/")),
    # orbax writes a checkpoint as several data files whose sizes vary with the writes' timing (in one run all
    # were 0.06-0.95 MB, under the old 1 MB limit), so the limit sits well below them, the token store ready.
    Case("disk full during a checkpoint", lambda r: _train(r, **{"train.steps": 2}), ("work/checkpoints", "no space"),
         new_ok=("work/",), fsize_limit=200_000, tokens_ready=True),
    # ---- collect
    Case("collect: impossible value", lambda r: _collect(r, "toy", "--config.phase1.batch_size=0"),
         ("phase1.batch_size", "must be positive")),
    Case("collect: empty dataset", lambda r: (_toy_records(r, []), _collect(r))[1], ("toy_train.json", "non-empty")),
    Case("collect: non-UTF-8 dataset", lambda r: (_toy_records(r, b"\xff\xfe[]"), _collect(r))[1],
         ("toy_train.json", "UTF-8")),
    Case("collect: dataset not registered", lambda r: _collect(r, "nope"), ("dataset_info.json", "nope_train")),
    Case("collect: LoRA init differs from the collection's", lambda r: (_unfinish(r, init_hash="0" * 16),
                                                                       _collect(r))[1],
         ("collected/toy", "LoRA init differs")),
    Case("collect: corrupt resume state", lambda r: (_unfinish(r), _write(r / "collected/toy/resume.pt", b"junk"),
                                                     _collect(r))[2], ("resume.pt", "unreadable")),
    Case("collect: disk full", lambda r: (shutil.rmtree(r / "collected"), _collect(r))[1], ("toy", "no space"),
         new_ok=("collected/",), fsize_limit=16_000),
    # ---- generate
    Case("generate: empty prompts file", lambda r: _generate(r, _write(r / "p.txt", "\n\n")), ("p.txt", "no prompts")),
    Case("generate: non-UTF-8 prompts file", lambda r: _generate(r, _write(r / "p.txt", b"caf\xe9\n" * 8)),
         ("p.txt", "UTF-8")),
    Case("generate: too few prompts", lambda r: _generate(r, _write(r / "p.txt", "one?\ntwo?\n")),
         ("p.txt", "2 prompts", "num_texts=4")),
    Case("generate: no such checkpoint step", lambda r: _generate(r, r / "prompts.txt", "--step", "7"),
         ("run", "step 7")),
    Case("generate: output exists", lambda r: (_write(r / "gen" / "keep.txt", "x"), _generate(r, r / "prompts.txt"))[1],
         ("gen", "already exists")),
    Case("generate: not a training workdir", lambda r: (shutil.rmtree(r / "run"), (r / "run").mkdir(),
                                                        _generate(r, r / "prompts.txt"))[2], ("run", "config.json")),
    # ---- evaluate and the converters
    Case("evaluate: adapter for another base model", lambda r: _evaluate(r, _ckpt(r)), ("alpha/step-000002",)),
    Case("evaluate: adapter without adapter_config.json",
         lambda r: ((r / "collected/toy/step-000003/adapter_config.json").unlink(),
                    _evaluate(r, r / "collected/toy/step-000003"))[1], ("step-000003", "adapter_config.json")),
    Case("converter: truncated safetensors",
         lambda r: (_truncate(_ckpt(r) / "adapter_model.safetensors"),
                    [PY, "-m", "converters.peft_to_jax", str(_ckpt(r)), str(r / "out.safetensors")])[1],
         ("adapter_model.safetensors",)),
]  # fmt: skip


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------------------------- runner


# A write past the limit fails with EFBIG (SIGXFSZ ignored), as a write to a full disk fails with ENOSPC.
_LIMITED = (
    "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def _snapshot(root: Path) -> dict[str, str]:
    """Every file's hash; lock files (they name their last holder) aside."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and p.name != ".lock"}  # fmt: skip


def _run_case(case: Case, world: Path, base: Path) -> str | None:
    """Runs one case in a copy of the world; returns what is wrong with its outcome, or None."""
    root = base / case.name.replace(" ", "_").replace(":", "").replace("/", "_")
    shutil.copytree(world, root, ignore=shutil.ignore_patterns("run-tokens", "__pycache__"))
    if case.tokens_ready:
        shutil.copytree(world / "run-tokens", root / "exp" / "tokens")
    argv = case.setup(root)
    before = _snapshot(root)
    if case.fsize_limit is not None:  # the limit is set in the child itself (no preexec_fn in a JAX process)
        argv = [PY, "-c", _LIMITED.format(limit=case.fsize_limit), *argv[1:]]
    r = warm.run(argv, env=cli_env(**case.env), cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    problems = []
    if r.returncode != 2:
        problems.append(f"exit status {r.returncode}")
    if "Traceback" in r.stderr:
        problems.append("a traceback")
    if len(errors) != 1:
        problems.append(f"{len(errors)} error lines")
    line = errors[0] if errors else ""
    problems += [f"no {s!r}" for s in case.expect if s not in line]
    if "\\n" in line or "''" in line or "Did you mean" in line:
        problems.append("repr noise")
    after = _snapshot(root)
    changed = [k for k in before if after.get(k) != before[k]]
    new = [k for k in after if k not in before and not k.startswith(case.new_ok or ("\0",))]
    if changed:
        problems.append(f"changed {changed[:3]}")
    if new:
        problems.append(f"new files {new[:3]}")
    if problems:
        tail = r.stderr.strip().splitlines()[-3:]
        return f"{case.name}: {', '.join(problems)} | {' / '.join(tail)[:600]}"
    return None


def test_bad_inputs_are_one_line_and_touch_nothing(world, tmp_path):
    assert len(CASES) >= 25
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: _run_case(c, world, tmp_path), CASES))
    failed = [r for r in results if r]
    assert not failed, f"{len(failed)} of {len(CASES)} cases failed:\n" + "\n".join(failed)
