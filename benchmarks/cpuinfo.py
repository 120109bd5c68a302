"""The CPU a benchmark ran on, printed with every figure: model name, cores, the ISA flags that
decide which kernels run (AVX2 / AVX-512 / AVX-512-BF16 / AMX)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from dnd_jax.models.conv_paths import cpu_flags, cpu_kind

ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def describe() -> str:
    """One line: model name, logical CPUs, ISA flags present."""
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    isa = " ".join(f for f in ISA if f in flags) or "none of " + "/".join(ISA)
    return f"CPU: {name}, {os.cpu_count()} logical CPUs, kind {cpu_kind()} ({isa})"
