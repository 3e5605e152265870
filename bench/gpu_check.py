"""GPU check: the GPU recipes' code path on a real device, against the same on this machine's CPU.

Builds a Llama of about 100 M parameters offline (tokenizer trained on the demo rows, random weights: nothing is
downloaded), then on each device runs, through tuneline's own functions: SFT with LoRA (bf16 where the device
runs it natively), SFT with QLoRA (4-bit NF4 base; CUDA only), DPO from the LoRA model, greedy evaluation
generation (batch 32) and the server's dynamic batcher. Prints one JSON line per measurement and a table:
tokens/s and peak memory per step and device. ``bench/gpu_check.sh`` runs it under 8 minutes on one GPU.

    python bench/gpu_check.py --devices cuda,cpu --out bench/results/gpu_check.json
    python bench/gpu_check.py --devices cpu --size small --steps 2   # the code path, quickly, on any machine
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._machine import cpu as cpu_line  # noqa: E402

SIZES = {  # ~100 M parameters (8k vocab, 12 x 768), and a small one for a quick code-path check
    "100m": dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                 num_kv_heads=4, max_position_embeddings=512),
    "small": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                  num_kv_heads=2, max_position_embeddings=256),
}


def records(n_sft: int, n_pref: int) -> tuple[list[Any], list[Any]]:
    from tuneline.data.demo import alpaca_prompt, build_rows
    from tuneline.params import DemoDataParams
    from tuneline.records import ChatRecord

    rows = build_rows(DemoDataParams(examples_per_task=max(8, n_sft // 6), preference_pairs=n_pref))
    sft = [ChatRecord(kind="sft", source="demo", line=i, task=r["task"], messages=[
        {"role": "user", "content": alpaca_prompt(r["instruction"], r["input"])},
        {"role": "assistant", "content": r["output"]}]) for i, r in enumerate(rows["sft"][:n_sft])]
    pref = [ChatRecord(kind="preference", source="demo", line=i, task=r["task"], chosen=r["chosen"],
                       rejected=r["rejected"], messages=[{"role": "user", "content": r["prompt"]}])
            for i, r in enumerate(rows["preference"][:n_pref])]
    return sft, pref


def build_base(size: str, texts: list[str], out: Path) -> tuple[Path, int]:
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer
    from tuneline.params import TinyModelParams

    params = TinyModelParams(tokenizer_min_frequency=1, **SIZES[size])
    tokenizer = train_tokenizer(texts, params)
    model = init_tiny_model(tokenizer, params, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    return save_model(model, tokenizer, out), n_params


class Meter:
    """Wall time and peak memory of one measured step on a device (CUDA: the allocator's peak; CPU: the RSS peak)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> "Meter":
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        import resource

        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        else:
            self.peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak)
        self.seconds = time.perf_counter() - self.start


def run_device(device: str, base: Path, sft: list[Any], pref: list[Any], steps: int, work: Path,
               emit: Callable[[dict[str, Any]], None]) -> None:
    import torch

    from tuneline.deploy.batching import Batcher, ModelSlot, ServedModel
    from tuneline.models.generation import generate_greedy, prompt_ids
    from tuneline.models.loading import bf16_supported, load_model_ref, place_for_inference
    from tuneline.models.provision import model_ref
    from tuneline.params import DpoParams, LoraParams, SftParams
    from tuneline.train.dpo import train_dpo
    from tuneline.train.methods import check_bitsandbytes_runs
    from tuneline.train.sft import train_sft

    if device == "cpu":
        torch.cuda.is_available = lambda: False  # this process measures the CPU: the trainers must not see the GPU
    bf16 = bf16_supported(device)
    train, val = sft[: len(sft) - 16], sft[len(sft) - 16:]
    lora = LoraParams(r=16, alpha=32, dropout=0.0)
    common = dict(max_steps=steps, batch_size=8, eval_steps=steps, save_steps=steps, learning_rate=2e-4, lora=lora,
                  bf16=bf16)

    def sft_run(method: str) -> Any:
        with Meter(device) as m:
            result = train_sft(base, train, val, SftParams(method=method, **common), work / f"{device}-{method}", seed=0)
        emit({"device": device, "step": f"sft-{method}", "bf16": bf16, "steps": result.global_step,
              "tokens_per_s": round(result.tokens_per_second, 1), "seconds": round(m.seconds, 2),
              "peak_gib": round(m.peak_gib, 3), "val_loss": result.best_val_loss})
        return result

    lora_result = sft_run("lora")
    try:
        check_bitsandbytes_runs(torch.bfloat16 if bf16 else torch.float32)
        if device != "cuda":
            raise RuntimeError("QLoRA is measured on CUDA only (bitsandbytes 4-bit on CPU is not the GPU recipe)")
        sft_run("qlora")
    except (RuntimeError, ValueError, ImportError) as exc:
        emit({"device": device, "step": "sft-qlora", "skipped": str(exc).splitlines()[0][:200]})

    with Meter(device) as m:
        dpo = train_dpo(lora_result.output_dir, base, "lora", pref[:-8], pref[-8:],
                        DpoParams(max_steps=steps, batch_size=4, bf16=bf16), work / f"{device}-dpo", seed=0)
    emit({"device": device, "step": "dpo", "steps": dpo.steps, "seconds": round(m.seconds, 2),
          "pairs_per_s": round(dpo.steps * 4 / max(m.seconds, 1e-9), 2), "peak_gib": round(m.peak_gib, 3),
          "reward_accuracy_after": dpo.after.get("reward_accuracy")})

    ref = model_ref(lora_result.output_dir, str(lora_result.output_dir), method="lora", stage="sft_adapter",
                    base=model_ref(base, str(base), method="tiny", stage="base_model"))
    ref = type(ref).from_dict({**ref.to_dict(), "kind": "adapter"})
    model, tokenizer = load_model_ref(ref)
    model = place_for_inference(model.merge_and_unload() if hasattr(model, "merge_and_unload") else model, device)
    first = next(model.parameters())
    prompts = [prompt_ids(tokenizer, r.messages[:-1]) for r in val * 2][:32]
    with Meter(device) as m:
        out = generate_greedy(model, tokenizer, prompts, max_new_tokens=32, batch_size=32)
    new = sum(o["new_tokens"] for o in out)
    emit({"device": device, "step": "eval-generate", "dtype": str(first.dtype).replace("torch.", ""),
          "placed_on": first.device.type, "batch": 32, "new_tokens": new,
          "new_tokens_per_s": round(new / m.seconds, 1), "peak_gib": round(m.peak_gib, 3)})

    slot = ModelSlot(ServedModel(model, tokenizer, {"name": "gpu-check", "version": "0"}))
    batcher = Batcher(slot, max_batch_size=16, wait_ms=5)
    with Meter(device) as m:
        futures = [batcher.submit(r.messages[:-1], 16) for r in (val * 4)[:48]]
        answers = [f.result(timeout=300) for f in futures]
    batcher.close()
    emit({"device": device, "step": "serve-batched", "requests": len(answers),
          "requests_per_s": round(len(answers) / m.seconds, 2), "peak_gib": round(m.peak_gib, 3)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="cuda,cpu", help="comma list, each measured in its own process")
    parser.add_argument("--size", choices=sorted(SIZES), default="100m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="write every measurement as JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one device here
    args = parser.parse_args(argv)

    import subprocess

    work = Path(tempfile.mkdtemp(prefix="tuneline-gpu-check-"))
    sft, pref = records(200, 64)
    if args.one:
        base = work.parent / args.one.split("@", 1)[1]
        run_device(args.one.split("@", 1)[0], base, sft, pref, args.steps, work,
                   lambda row: print("ROW " + json.dumps(row), flush=True))
        return 0
    base, n_params = build_base(args.size, [m["content"] for r in sft for m in r.messages], work / "base")
    print(f"# {cpu_line()}\n# model: {n_params / 1e6:.1f} M parameters ({args.size}), {args.steps} steps per stage",
          flush=True)
    rows: list[dict[str, Any]] = []
    for device in args.devices.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", f"{device}@{base.relative_to(work.parent)}",
                               "--steps", str(args.steps), "--size", args.size], capture_output=True, text=True)
        found = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0:
            found.append({"device": device, "step": "failed", "error": proc.stderr.strip().splitlines()[-1:]})
        for row in found:
            print(json.dumps(row), flush=True)
        rows.extend(found)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": cpu_line(), "params": n_params, "size": args.size,
                                              "steps": args.steps, "rows": rows}, indent=2) + "\n")
    return 0 if all(r.get("step") != "failed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
