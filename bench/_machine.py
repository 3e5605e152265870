"""What every benchmark prints beside its figures: the CPU model and the flags that decide its speed."""

from __future__ import annotations

import os
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu() -> str:
    """``"<model name>; flags: avx2 avx512_bf16 ..."`` (only the flags that matter here)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    held = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
            if os.environ.get(k)]  # kernels held below what the CPU has (an AVX2-only CPU emulated)
    return f"{model}; flags: " + " ".join(f for f in FLAGS if f in flags) + (f"; held: {' '.join(held)}" if held else "")
