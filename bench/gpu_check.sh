#!/usr/bin/env bash
# The GPU check, as one prepared script for a lent GPU machine (under 8 minutes, no downloads): installs the
# project (CPU torch is replaced by the CUDA wheel only where the machine has one), then measures SFT LoRA bf16,
# SFT QLoRA 4-bit, DPO, evaluation generation and batched serving on CUDA and on the CPU, and writes the figures
# to $OUT/gpu_check.json (or bench/results/gpu_check.json) for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi: CPU only"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0   # the index decides the build: CUDA on a GPU machine's index
  DS_BUILD_OPS=0 .venv/bin/pip install -q -e '.[test]'
fi
DEVICES="cpu"
if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then DEVICES="cuda,cpu"; fi
timeout 460 .venv/bin/python bench/gpu_check.py --devices "$DEVICES" --steps "${STEPS:-20}" --out "$OUT_DIR/gpu_check.json"
