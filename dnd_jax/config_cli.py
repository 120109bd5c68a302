"""Shared command-line plumbing: config files with overrides, flags, version logging.

Entry points define their flags with absl + `config_flags.DEFINE_config_file` and call
`parse_or_exit`, which turns a config typo (unknown field, bad value) into one line naming it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from dnd_jax.errors import DndError


def parse_or_exit(argv: list[str], config_names: tuple[str, ...] = ("config",)) -> list[str]:
    """Parses absl flags; a bad flag, config file or override prints one line and exits with status 2."""
    from absl import flags

    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(usage(flags.FLAGS))
        sys.exit(0)
    try:
        rest = flags.FLAGS(argv)
        for name in config_names:  # ml_collections loads config files lazily: force it here
            value = getattr(flags.FLAGS, name, None)
            if value is not None:
                value.to_dict()
        return rest
    except (flags.Error, KeyError, ValueError, AttributeError, TypeError, OSError) as e:
        print(f"error: {_one_line(e, argv)}", file=sys.stderr)
        sys.exit(2)


def usage(flag_values) -> str:
    """--help: the docstring of the module that defined the command's flags, then those flags."""
    import importlib

    main = sys.argv[0] if sys.argv else "__main__"  # absl files flags defined in `python -m X` under its path
    own = {m: fl for m, fl in flag_values.flags_by_module_dict().items()
           if m.startswith("dnd_jax") or m in ("__main__", main)}  # fmt: skip
    parts = []
    for m, fl in sorted(own.items(), key=lambda x: x[0].startswith("dnd_jax")):  # the command's own first
        try:
            mod = sys.modules["__main__"] if m in ("__main__", main) else importlib.import_module(m)
            doc = (mod.__doc__ or "").strip()
        except ImportError:
            doc = ""
        parts.append(doc)
        parts.append("flags:\n" + "\n".join(f"  --{f.name}: {f.help}" for f in sorted(fl, key=lambda f: f.name)))
    return "\n\n".join(p for p in parts if p)


def _unknown_field(e: KeyError, argv: list[str]) -> str:
    """ml_collections' KeyError for an unknown override ('stepz'\nDid you mean "steps" ...) -> one line
    naming the whole field, e.g. `... no existing field: train.stepz (did you mean train.steps?)`."""
    lines = [ln.strip() for ln in str(e.args[0] if e.args else e).splitlines() if ln.strip()]
    key = lines[0].strip("'\"") if lines else "?"
    paths = [a.split("=", 1)[0].removeprefix("--") for a in argv if a.startswith("--") and "." in a.split("=", 1)[0]]
    comps = [p.split(".")[1:] for p in paths]
    full = next((".".join(c[: c.index(key) + 1]) for c in comps if key in c), key)
    hint = re.search(r'Did you mean "([^"]+)"', " ".join(lines[1:]))
    parent = full.rsplit(".", 1)[0] + "." if "." in full else ""
    return f"config override names no existing field: {full}" + (f" (did you mean {parent}{hint[1]}?)" if hint else "")


def _one_line(e: BaseException, argv: list[str] = ()) -> str:
    # ml_collections raises KeyError (sometimes inside an AttributeError) for an unknown override field.
    key_error = e if isinstance(e, KeyError) else (e.args[0] if e.args and isinstance(e.args[0], KeyError) else None)
    if key_error is not None:
        return _unknown_field(key_error, list(argv))
    text = str(e)
    lines = [ln.strip() for ln in text.replace("\\'", "'").splitlines() if ln.strip()]
    if any(ln.startswith("Traceback") for ln in lines):  # an error raised inside a config file
        return f"{lines[0].split(': Error whilst')[0]}: {lines[-1]}"
    errno = [ln for ln in lines if ln.startswith("[Errno")]
    if errno:  # a config file that cannot be read
        return f"{lines[0]} {' '.join(ln for ln in lines[1:] if not ln.startswith('Attempted'))}"
    return " ".join(lines)


def save_config(config, path: Path) -> None:
    """Writes the resolved config as JSON (atomically) next to a run's outputs."""
    from dnd_jax.fileio import atomic_file

    with atomic_file(path, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


# Config fields added after runs existed (dotted name -> the default, i.e. the behaviour before the field): a
# saved config without one of them resumes as if it had the default, so an old run directory stays usable.
ADDED_FIELDS = {
    "encoder.type": "sentence_bert",
    "encoder.num_layers": 0,
    "data.condition": "prompts",
    "data.max_prompts": 0,
    "experiment.train_tasks": 0,
    "experiment.run_folds": [],
    "experiment.shots": 0,
    "sft.microbatches": 1,
}


def _parent(d, name: str) -> tuple[dict | None, str]:
    """(the dict that holds dotted field `name`, or None where the path ends early; the field's last key)."""
    *head, last = name.split(".")
    for h in head:
        d = d.get(h) if isinstance(d, dict) else None
    return (d if isinstance(d, dict) else None), last


def _with_added_fields(saved: dict, current: dict) -> dict:
    saved = json.loads(json.dumps(saved))
    for name, default in ADDED_FIELDS.items():
        (s, last), (c, _) = _parent(saved, name), _parent(current, name)
        if s is not None and c is not None and last in c and last not in s:
            s[last] = default
    return saved


# How often a run saves does not change what it computes: a resumed run may save more or less often (a long run
# started with rare checkpoints can go on with frequent ones).
RESUME_FREE = ("train.checkpoint_every", "train.keep_checkpoints")


def _without(d: dict, names) -> dict:
    d = json.loads(json.dumps(d))
    for name in names:
        node, last = _parent(d, name)
        if node is not None:
            node.pop(last, None)
    return d


def check_same_config(saved: dict, current: dict, where: str) -> None:
    """Refuses to resume a run with a config that differs from the one it started with (fields that only say
    how often it saves, RESUME_FREE, may change)."""
    saved = _without(_with_added_fields(saved, current), RESUME_FREE)
    current = _without(current, RESUME_FREE)
    if saved != current:
        diffs = sorted(_diff(saved, current))
        raise DndError(
            f"{where}: was started with a different config ({', '.join(diffs[:5])}); "
            "use a new output directory or the original config"
        )


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield f"{prefix[:-1]}: {a!r} -> {b!r}"


def versions() -> str:
    import importlib.metadata as md

    out = []
    for pkg in ("jax", "flax", "optax", "orbax-checkpoint", "torch", "transformers", "peft"):
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)
