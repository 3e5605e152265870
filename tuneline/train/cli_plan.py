"""``tuneline plan``: will fine-tuning this model fit, and what is the cheapest setting that makes it fit?

Reads the model's config only (a local directory, or a hub id already in the cache or reachable), never its
weights, and estimates the peak memory of one training step on one device (weights, gradients, optimizer
state, activations), then tries gradient checkpointing, smaller micro-batches with accumulation, a 4-bit base
(LoRA methods), and, for CUDA devices, ZeRO-2/3 and CPU offload, cheapest first.

    tuneline plan --model meta-llama/Llama-3.1-70B --method qlora --gpu-memory 12GiB
    tuneline plan --model .tuneline/artifacts/base_model/... --method lora --json

Without ``--gpu-memory`` the budget is the CUDA device's memory, or this machine's available RAM on CPU.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tuneline.train.memory import GIB, METHODS


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``plan`` on the ``tuneline`` command's subparsers."""
    parser = subparsers.add_parser("plan", help="estimate peak training memory from a model's config",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="PATH|ID", help="model directory or hub id (config only)")
    parser.add_argument("--revision", help="hub revision")
    parser.add_argument("--method", required=True, choices=METHODS, help="fine-tuning method")
    parser.add_argument("--gpu-memory", metavar="SIZE", help="memory per GPU, e.g. 24GiB, 80GB (plans for CUDA)")
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs ZeRO can partition over (default 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step (default 8)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="weights/activations; auto: bf16 on CUDA, fp32 on CPU (what tuneline trains with)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="plan the request with it on")
    parser.add_argument("--zero", type=int, choices=(0, 2, 3), default=0, help="plan the request with ZeRO")
    parser.add_argument("--offload", choices=("none", "optimizer", "params"), default="none",
                        help="plan the request with ZeRO CPU offload")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (lora, qlora, adalora)")
    parser.add_argument("--num-virtual-tokens", type=int, default=16, help="prompt-learning methods")
    parser.add_argument("--reduction-factor", type=int, default=16, help="bottleneck adapters")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from tuneline.train.memory import Setting, available_memory, model_shape, parse_size, plan

    if args.batch_size < 1 or args.seq_len < 1 or args.num_gpus < 1:
        raise ValueError("--batch-size, --seq-len and --num-gpus must be >= 1")
    if args.gpu_memory:
        budget, device = parse_size(args.gpu_memory), "cuda"
    else:
        budget, device = available_memory()
    if (args.zero or args.offload != "none") and device != "cuda":
        raise ValueError("--zero and --offload plan DeepSpeed on CUDA devices: pass --gpu-memory")
    if args.offload == "params" and args.zero != 3:
        raise ValueError("--offload params needs --zero 3 (ZeRO-Infinity offloads partitioned parameters)")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    shape = model_shape(args.model, revision=args.revision)
    requested = Setting(dtype=dtype, quant4=args.method == "qlora", gradient_checkpointing=args.gradient_checkpointing,
                        zero=args.zero, offload=args.offload, micro_batch=args.batch_size)
    result = plan(shape, args.method, budget_bytes=budget, batch=args.batch_size, seq_len=args.seq_len, dtype=dtype,
                  device=device, num_gpus=args.num_gpus, requested=requested, lora_r=args.lora_r,
                  num_virtual_tokens=args.num_virtual_tokens, reduction_factor=args.reduction_factor)
    result["model"] = args.model
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    return 0


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def render(result: dict[str, Any]) -> str:
    """The plan as a few readable lines."""
    rec = result["recommendation"]
    lines = [
        f"{result['model']} ({result['model_type']}, {result['params'] / 1e6:,.1f} M params), method "
        f"{result['method']}: {result['trainable_params'] / 1e6:,.2f} M trainable; batch {result['batch_size']} x "
        f"{result['seq_len']} tokens; budget {_gib(result['budget_bytes'])} per {result['device']} device "
        f"(x{result['num_gpus']})",
        f"requested ({result['setting']['description']}): peak {_gib(result['peak_bytes'])} -> "
        f"{'FITS' if result['fits'] else 'does NOT fit'}",
    ]
    for key, value in result["breakdown"].items():
        lines.append(f"  {key:<12}{_gib(value):>14}")
    lines.append(f"recommendation: {rec['text']}")
    if not result["fits"] and rec["fits"]:
        lines.append(f"  peak {_gib(rec['peak_bytes'])}, about {rec['slowdown']}x the time per step"
                     + (f", {_gib(rec['cpu_offload_bytes'])} in CPU memory" if rec["cpu_offload_bytes"] else ""))
    return "\n".join(lines)
