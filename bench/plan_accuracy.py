"""How close ``tuneline plan``'s memory estimate is to the measured peak of real training steps.

For each case a fresh subprocess imports torch/transformers/peft, records its resident memory (VmRSS), builds
the model from its config (fp32, random weights), applies the method (full fine-tuning, or LoRA r=16 on every
Linear of the blocks), runs two AdamW steps on random tokens with labels, and reports the growth of its peak
resident memory (VmHWM - the RSS before the model existed). The estimate comes from
:func:`tuneline.train.memory.estimate` for the same config, batch and length (CPU: eager attention, no
overhead). On a machine with a CUDA device, ``--cuda`` measures ``torch.cuda.max_memory_allocated`` instead
(the estimate then without its flat 1 GiB context overhead, which the allocator does not count).

    python bench/plan_accuracy.py [--cases tiny,100m] [--cuda] [--out bench/results/plan_accuracy.json]

Cases: ``tiny`` is the demo's Llama (hidden 256, 4 layers, vocab 4096: 4.2 M parameters); ``100m`` a Llama of
hidden 768, 12 layers, vocab 32000 (~110 M parameters). Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True),
    "100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                 tie_word_embeddings=True),
}
# (case, method, batch, seq_len, gradient checkpointing)
CASES = {
    "tiny": [("tiny", "full", 8, 256, False), ("tiny", "lora", 8, 256, False), ("tiny", "full", 8, 256, True)],
    "100m": [("100m", "full", 2, 128, False), ("100m", "lora", 2, 128, False), ("100m", "full", 2, 128, True)],
}
STEPS = 2  # the second step is the first with optimizer state, weights, gradients and activations at once
MALLOC_MMAP_THRESHOLD = int(os.environ.get("PLAN_MMAP_THRESHOLD", str(128 * 1024)))  # 0: glibc's default


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(config_dir: str, method: str, batch: int, seq_len: int, checkpointing: bool, cuda: bool) -> dict[str, Any]:
    """Run in a fresh process: peak memory growth of building the model and training STEPS steps."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import peft  # noqa: F401 - imported before the baseline, like the trainer

    torch.set_num_threads(int(os.environ.get("PLAN_THREADS", "2")))
    device = "cuda" if cuda else "cpu"
    config = AutoConfig.from_pretrained(config_dir)
    gc.collect()
    baseline = _status("VmRSS")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa" if cuda else "eager").to(device)
    model.config.use_cache = False
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "lora":
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_alloc = torch.cuda.memory_allocated()
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = {"loss": float(loss), "trainable": sum(p.numel() for p in params)}
    if cuda:
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        out["model_bytes_before_steps"] = int(start_alloc)
    else:
        out["peak_bytes"] = _status("VmHWM") - baseline
        out["baseline_rss"] = baseline
    return out


def run_case(case: str, method: str, batch: int, seq_len: int, checkpointing: bool, cuda: bool,
             work: Path) -> dict[str, Any]:
    from transformers import LlamaConfig

    config_dir = work / case
    if not (config_dir / "config.json").is_file():
        LlamaConfig(**CONFIGS[case]).save_pretrained(config_dir)
    cmd = [sys.executable, __file__, "--child", json.dumps([str(config_dir), method, batch, seq_len, checkpointing,
                                                            cuda])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("PLAN_THREADS", "2")}
    if not cuda and MALLOC_MMAP_THRESHOLD:
        # a fixed mmap threshold: every freed tensor is returned to the OS at once, so the peak RSS is the peak of
        # live memory (glibc's default threshold grows after frees and keeps freed tensors in the heap)
        env["MALLOC_MMAP_THRESHOLD_"] = str(MALLOC_MMAP_THRESHOLD)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{case}/{method}: measurement failed:\n{proc.stderr[-3000:]}")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    row = {"case": case, "method": method, "batch": batch, "seq_len": seq_len,
           "gradient_checkpointing": checkpointing, "device": "cuda" if cuda else "cpu",
           "measured_bytes": measured["peak_bytes"], "trainable_measured": measured["trainable"],
           "loss": measured["loss"]}
    return with_estimate(row, work)


def with_estimate(row: dict[str, Any], work: Path) -> dict[str, Any]:
    """The row with the planner's estimate for its case (recomputed from the config; the measurement is kept)."""
    from transformers import LlamaConfig

    from tuneline.train.memory import Setting, estimate, model_shape

    config_dir = work / row["case"]
    if not (config_dir / "config.json").is_file():
        LlamaConfig(**CONFIGS[row["case"]]).save_pretrained(config_dir)
    shape = model_shape(config_dir)
    est = estimate(shape, row["method"], Setting(dtype="fp32", gradient_checkpointing=row["gradient_checkpointing"],
                                                 micro_batch=row["batch"]),
                   batch=row["batch"], seq_len=row["seq_len"], device=row["device"])
    predicted = est.peak_bytes - est.breakdown["overhead"]
    return {**row, "params": shape.n_params, "estimated_bytes": predicted, "breakdown": est.breakdown,
            "trainable_estimated": est.trainable_params,
            "error": (predicted - row["measured_bytes"]) / row["measured_bytes"]}


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return " ".join(sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})) or "none of avx2/avx512"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | params | method | batch x len | grad ckpt | device | measured peak | estimate | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['params'] / 1e6:.1f} M | {r['method']} | {r['batch']} x {r['seq_len']} | "
                     f"{'yes' if r['gradient_checkpointing'] else 'no'} | {r['device']} | "
                     f"{r['measured_bytes'] / 2**20:.0f} MiB | {r['estimated_bytes'] / 2**20:.0f} MiB | "
                     f"{100 * r['error']:+.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="tiny,100m")
    parser.add_argument("--cuda", action="store_true", help="measure torch.cuda.max_memory_allocated on the GPU")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "plan_accuracy.json"))
    parser.add_argument("--reestimate", action="store_true",
                        help="keep the measurements in --out, recompute only the estimates (after a planner change)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as tmp:
        if args.reestimate:
            old = json.loads(Path(args.out).read_text())
            rows = [with_estimate(r, Path(tmp)) for r in old["rows"]]
        for name in ([] if args.reestimate else args.cases.split(",")):
            for case in CASES[name]:
                row = run_case(*case, cuda=args.cuda, work=Path(tmp))
                print(f"{row['case']} {row['method']} ckpt={row['gradient_checkpointing']}: measured "
                      f"{row['measured_bytes'] / 2**20:.0f} MiB, estimate {row['estimated_bytes'] / 2**20:.0f} MiB "
                      f"({100 * row['error']:+.1f}%)", flush=True)
                rows.append(row)
    result = {"rows": rows, "cpu_flags": cpu_flags(), "machine": platform.machine(), "threads":
              os.environ.get("PLAN_THREADS", "2"), "max_abs_error": max(abs(r["error"]) for r in rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(rows))
    print(f"max |error| {100 * result['max_abs_error']:.1f}%  (cpu flags: {result['cpu_flags']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
