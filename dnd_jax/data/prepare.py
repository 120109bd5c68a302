"""Token store: every checkpoint of a collection tokenized once, plus per-token criterion weights.

  python -m dnd_jax.data.prepare --collection runs/collect --out runs/tokens --chunk 64 [--real-length 50]

For each dataset folder of the collection (`<collection>/<dataset>/step-*/`), the first
`real_length` checkpoints in step order are tokenized (dnd_jax.lora_tokens) into
  <out>/<dataset>/tokens.npy             float32 [N, T, r + 2, C + 2], memory-mapped by training
  <out>/<dataset>/criterion_weight.npy   float32 [T]
  <out>/<dataset>/manifest.json          steps, sources, adapter spec, chunk, content hash
Criterion weights follow the original (spec §5.2): the population std over checkpoints of every
token entry, averaged per token and divided by its mean over all entries; computed streaming
(Welford), never holding all checkpoints in memory. A dataset whose manifest already matches
(same checkpoints by content hash, same chunk and real_length) is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from converters.peft_to_jax import list_checkpoints, load_peft_adapter
from converters.spec import LoraSpec
from dnd_jax import lora_tokens
from dnd_jax.errors import DndError, run_cli
from dnd_jax.fileio import atomic_dir

FORMAT = 1


@dataclasses.dataclass
class TokenSet:
    """One dataset's prepared tokens (memory-mapped) and weights."""

    name: str
    tokens: np.ndarray  # [N, T, R, K] float32, memory-mapped
    weight: np.ndarray  # [T]
    steps: list[int]
    layout: lora_tokens.TokenLayout
    init_hash: str | None = None  # the collection's LoRA init (collect manifest), if recorded


def _hash_checkpoints(ckpts: list[tuple[int, Path]]) -> str:
    h = hashlib.sha256()
    for step, path in ckpts:
        h.update(str(step).encode())
        for f in sorted(path.iterdir()) if path.is_dir() else [path]:
            if f.name in ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json") or f == path:
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def prepare_dataset(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    chunk: int,
    real_length: int | None = None,
    pad: bool = False,
    verbose: bool = True,
) -> Path:
    """Tokenizes one dataset's checkpoints and computes its criterion weights.

    Args:
      ckpt_dir: the dataset's checkpoint folder (step-N/ PEFT dirs or N.safetensors).
      out_dir: destination folder (written atomically).
      chunk: token chunk width C.
      real_length: use the first N checkpoints in step order (None: all).
      pad: zero-pad feature axes that C does not divide.
      verbose: print a summary line.

    Returns:
      out_dir.
    """
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    ckpts = list_checkpoints(ckpt_dir)[:real_length]
    if real_length is not None and len(ckpts) < real_length:
        raise DndError(f"{ckpt_dir}: {len(ckpts)} checkpoints, fewer than real_length {real_length}")
    digest = _hash_checkpoints(ckpts)
    key = {"format": FORMAT, "hash": digest, "chunk": chunk, "pad": pad, "n": len(ckpts),
           "init_hash": _collection_init_hash(ckpt_dir)}  # fmt: skip
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if all(old.get(k) == v for k, v in key.items()):
            if verbose:
                print(f"{out_dir}: up to date ({len(ckpts)} checkpoints)")
            return out_dir
    t0 = time.perf_counter()
    with atomic_dir(out_dir, overwrite=True) as tmp:
        layout = spec0 = None
        for i, (_, path) in enumerate(ckpts):
            params, spec = load_peft_adapter(path) if path.is_dir() else _load_flat(ckpt_dir, path)
            if spec0 is None:
                spec0, layout = spec, lora_tokens.make_layout(spec, chunk, pad=pad)
                tokens = np.lib.format.open_memmap(tmp / "tokens.npy", "w+", np.float32, (len(ckpts), *layout.shape))
                mean = np.zeros(layout.shape, np.float64)
                m2 = np.zeros(layout.shape, np.float64)
            elif spec.modules != spec0.modules:
                raise DndError(f"{path}: adapter layout differs from {ckpts[0][1]} (modules, ranks or shapes)")
            tok = lora_tokens.tokenize(params, layout)
            if not np.isfinite(tok).all():
                kinds = " and ".join(k for k, f in (("NaN", np.isnan), ("Inf", np.isinf)) if f(tok).any())
                raise DndError(f"{path}: the adapter holds {kinds} values (a diverged or corrupt checkpoint)")
            tokens[i] = tok
            delta = tok - mean  # Welford update, float64
            mean += delta / (i + 1)
            m2 += delta * (tok - mean)
        tokens.flush()
        del tokens
        std = np.sqrt(m2 / len(ckpts))
        weight = (std.mean(axis=(1, 2)) / max(std.mean(), 1e-30)).astype(np.float32)
        np.save(tmp / "criterion_weight.npy", weight)
        manifest = {**key, "dataset": ckpt_dir.name, "steps": [s for s, _ in ckpts],
                    "sources": [str(p) for _, p in ckpts], "token_shape": list(layout.shape),
                    "spec": json.loads(spec0.to_json())}  # fmt: skip
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if verbose:
        print(f"{out_dir}: {len(ckpts)} checkpoints -> tokens {list(layout.shape)} in {time.perf_counter() - t0:.1f} s")
    return out_dir


def _collection_init_hash(ckpt_dir: Path) -> str | None:
    """The LoRA init hash `dnd_jax.collect` recorded for this folder (None for foreign checkpoints)."""
    m = ckpt_dir / "manifest.json"
    if not m.is_file():
        return None
    try:
        return json.loads(m.read_text()).get("init_hash")
    except json.JSONDecodeError:
        return None


def _load_flat(folder: Path, path: Path):
    from converters.peft_to_jax import read_adapter_config, read_state_dict, state_dict_to_pytree

    state, meta = read_state_dict(path)
    return state_dict_to_pytree(state, read_adapter_config(folder / "adapter_config.json"), str(path), meta)


def open_token_set(token_dir: str | Path, real_length: int | None = None) -> TokenSet:
    """Opens a prepared dataset (tokens memory-mapped read-only)."""
    token_dir = Path(token_dir)
    mpath = token_dir / "manifest.json"
    if not mpath.is_file():
        raise DndError(f"{token_dir}: no prepared tokens (manifest.json missing); run python -m dnd_jax.data.prepare")
    m = json.loads(mpath.read_text())
    spec = LoraSpec.from_json(json.dumps(m["spec"]), where=str(mpath))
    layout = lora_tokens.make_layout(spec, m["chunk"], pad=m["pad"])
    tokens = np.load(token_dir / "tokens.npy", mmap_mode="r")
    if real_length is not None:
        if tokens.shape[0] < real_length:
            raise DndError(f"{token_dir}: {tokens.shape[0]} checkpoints, fewer than real_length {real_length}")
        tokens = tokens[:real_length]
    return TokenSet(m["dataset"], tokens, np.load(token_dir / "criterion_weight.npy"), m["steps"][: len(tokens)],
                    layout, m.get("init_hash"))  # fmt: skip


def check_same_init(sets: list[TokenSet], allow: bool = False) -> None:
    """Refuses datasets whose collections started from different LoRA inits (manifest init_hash)."""
    hashes = {s.name: s.init_hash for s in sets if s.init_hash}
    if len(set(hashes.values())) > 1 and not allow:
        (a, ha), (b, hb) = next((x, y) for x in hashes.items() for y in hashes.items() if x[1] != y[1])
        raise DndError(f"datasets {a!r} (LoRA init {ha}) and {b!r} (init {hb}) were collected from different LoRA "
                       "inits: re-collect one, or set config data.allow_mixed_init=True")  # fmt: skip


def pooled_mean(sets: list[TokenSet]) -> np.ndarray:
    """[T, R, K] float32: the mean over every checkpoint of `sets` (each set weighs by its checkpoint count; with
    equal counts, as one collection recipe gives, the mean of the set means), summed in float64."""
    total = sum(np.asarray(s.tokens, np.float64).sum(0) for s in sets)
    return (total / sum(s.tokens.shape[0] for s in sets)).astype(np.float32)


def mean_criterion_weight(sets: list[TokenSet]) -> np.ndarray:
    """The training weight: elementwise mean of the training datasets' weight vectors."""
    shapes = {s.tokens.shape[1:] for s in sets}
    if len(shapes) != 1:
        raise DndError(
            f"datasets have different token shapes: {', '.join(f'{s.name} {list(s.tokens.shape[1:])}' for s in sets)}"
        )
    return np.mean([s.weight for s in sets], axis=0).astype(np.float32)


def prepare_collection(
    collection: str | Path,
    out: str | Path,
    chunk: int,
    datasets: list[str] | None = None,
    real_length: int | None = None,
    pad: bool = False,
    allow_mixed_init: bool = False,
) -> list[Path]:
    """Prepares every (or the named) dataset folders of a collection root.

    Collections that started from different LoRA inits (their manifests' init_hash) are refused
    unless `allow_mixed_init`: their A tokens would be unrelated noise to a generator."""
    collection = Path(collection)
    if not collection.is_dir():
        raise DndError(f"{collection}: no such collection directory")
    names = datasets or sorted(p.name for p in collection.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DndError(f"{collection}: no dataset folders")
    outs = [prepare_dataset(collection / n, Path(out) / n, chunk, real_length, pad) for n in names]
    check_same_init([open_token_set(o) for o in outs], allow_mixed_init)
    return outs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dnd_jax.data.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--collection", required=True, help="collection root with one folder per dataset")
    ap.add_argument("--out", required=True, help="token store root")
    ap.add_argument("--chunk", type=int, required=True, help="token chunk width C (128 for Qwen2.5-0.5B)")
    ap.add_argument("--datasets", default=None, help="comma-separated dataset folders (default: all)")
    ap.add_argument("--real-length", type=int, default=None, help="first N checkpoints in step order")
    ap.add_argument("--pad", action="store_true", help="zero-pad feature axes that --chunk does not divide")
    ap.add_argument("--allow-mixed-init", action="store_true", help="accept collections with different LoRA inits")
    args = ap.parse_args(argv)
    names = args.datasets.split(",") if args.datasets else None
    prepare_collection(args.collection, args.out, args.chunk, names, args.real_length, args.pad, args.allow_mixed_init)
    return 0


if __name__ == "__main__":
    run_cli(main)
