"""The machine's measured matmul peak, per dtype: what "model FLOPs utilization" (MFU) is measured against.

Square matmuls (n = 1024 and 2048) on every core torch uses, best of several timed repeats after a warm-up:
GFLOP/s = 2 n^3 / seconds. bf16 is fast only where the CPU has native bf16 (AVX512-BF16 or AMX); elsewhere it
is emulated and far below fp32, which is why the trainers pick fp32 there.

    python bench/matmul_peak.py            # prints JSON: {"cpu": ..., "threads": ..., "fp32": GFLOP/s, "bf16": ...}

:func:`useful_mfu` turns a stage's rate into MFU, given the model FLOPs one unit of its work needs: training needs about
6 x N FLOPs per token (forward 2N, backward 4N) and generation 2 x N (bench/stage_throughput.py counts DPO pairs and
distilled sequences the same way), with N the parameters that take part in matmuls (embeddings excluded, the
LM head included); attention's own FLOPs are left out (small at these sequence lengths), so the figure is a
slight underestimate.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._machine import cpu  # noqa: E402


def measure(dtype_name: str, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> float:
    """Best GFLOP/s of ``n x n @ n x n`` in ``dtype_name`` over ``sizes``."""
    import torch

    dtype = getattr(torch, dtype_name)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b  # warm-up (oneDNN picks its kernel)
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: every 2-D weight except the input embeddings (a lookup)."""
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed
    n = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embed)
    return n + (embed.numel() if tied else 0)  # a tied head still multiplies by the embedding matrix


def useful_mfu(units_per_s: float, flops_per_unit: float, peak_gflops: float) -> float:
    """Share of the measured peak a stage's rate corresponds to, at the model FLOPs each unit (token, pair, ...)
    needs."""
    return units_per_s * flops_per_unit / (peak_gflops * 1e9)


def main() -> int:
    import torch

    print(json.dumps({"cpu": cpu(), "threads": torch.get_num_threads(),
                      "fp32": round(measure("float32"), 1), "bf16": round(measure("bfloat16"), 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
