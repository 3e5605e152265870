"""How far issue 16's "2x the fastest peer" is from each machine's arithmetic, per training stage.

Reads what ``stage_throughput.py`` and ``sft_throughput.py`` wrote to ``bench/results/`` and, for every training
stage measured on a machine, takes the fastest peer at any flags, its useful MFU (model FLOPs each unit of work needs,
against the matmul peak measured in the same session, as ``matmul_peak.py`` defines it) and the useful MFU ours would
need to be twice as fast: twice the peer's. At or above 100% of the measured peak, 2x is out of reach for the same
model FLOPs per unit of work on that machine (a faster loop cannot do it, only less arithmetic); below it, 2x is not
ruled out by arithmetic, and the last column says how many times its present MFU ours would need.

    python bench/two_x_bound.py                # a markdown table
    python bench/two_x_bound.py --json OUT     # also the rows as JSON

SFT results hold no peak of their own: each is read against the peak ``stage_throughput.py`` measured on the same
machine in the same session (``SFT_PEAK_FROM``). LoRA SFT needs 4N FLOPs per real token (forward 2N, backward to the
inputs 2N; the frozen weights get no gradient; the adapters' own few FLOPs left out), as the DPO policy does in
``stage_throughput.useful_flops_per_unit``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TRAINING_STAGES = ("pretrain", "dpo", "distill")
# each SFT result -> the stage result of the same machine and session, whose measured peak it is read against
SFT_PEAK_FROM = {
    "sft_throughput.json": "stage_throughput.json",
    "sft_throughput_alpaca.json": "stage_throughput.json",
    "sft_throughput_long.json": "stage_throughput.json",
    "sft_throughput_zen4.json": "stage_throughput_zen4.json",
    "sft_throughput_alpaca_zen4.json": "stage_throughput_zen4.json",
    "sft_throughput_long_zen4.json": "stage_throughput_zen4.json",
    "sft_throughput_zen5.json": "stage_throughput_zen5.json",
    "sft_throughput_avx2_epyc.json": "stage_throughput_avx2_epyc.json",
    "sft_throughput_zen3.json": "stage_throughput_zen3.json",
    "sft_throughput_alpaca_zen3.json": "stage_throughput_zen3.json",
    "sft_throughput_long_zen3.json": "stage_throughput_zen3.json",
    "sft_throughput_avx512_nobf16.json": "stage_throughput_avx512_nobf16.json",
}


def bound_row(source: str, stage: str, machine: str, dtype: str, peak_gflops: float,
              rates: dict[str, float], flops_per_unit: float) -> dict[str, Any]:
    """One stage on one machine: ``rates`` per contender (units/s, ours under "ours", its controls "ours-*"
    left out); the fastest peer, its MFU, the MFU ours needs for 2x it, and whether that is within the peak."""
    peers = {k: v for k, v in rates.items() if not k.startswith("ours")}
    if "ours" not in rates or not peers:
        raise ValueError(f"{source} {stage}: needs ours and at least one peer, got {sorted(rates)}")
    fastest = max(peers, key=peers.__getitem__)

    def mfu(rate: float) -> float:
        return rate * flops_per_unit / (peak_gflops * 1e9)

    needed = 2 * mfu(peers[fastest])
    return {"source": source, "stage": stage, "machine": machine, "dtype": dtype, "peak_gflops": peak_gflops,
            "fastest_peer": fastest, "ratio_now": rates["ours"] / peers[fastest],
            "peer_mfu": mfu(peers[fastest]), "ours_mfu": mfu(rates["ours"]), "mfu_needed_for_2x": needed,
            "reachable_by_arithmetic": needed < 1.0, "ours_mfu_gain_needed": needed / mfu(rates["ours"])}


def stage_rows(path: Path) -> list[dict[str, Any]]:
    """The training stages of one ``stage_throughput.py`` result (the MFU it recorded gives FLOPs per unit)."""
    data = json.loads(path.read_text())
    rows = []
    for stage in TRAINING_STAGES:
        block = data["stages"].get(stage)
        summary = (block or {}).get("summary", {})
        if "ours" not in summary:
            continue
        ours = summary["ours"]
        dtype = ours["dtype"]
        peak = block["peak_gflops"][dtype]
        flops_per_unit = ours["mfu"] * peak * 1e9 / ours["median"]
        rates = {k: v["median"] for k, v in summary.items() if isinstance(v, dict) and "median" in v}
        rows.append(bound_row(path.name, stage, block["machine"], dtype, peak, rates, flops_per_unit))
    return rows


def lora_sft_flops_per_token(model: dict[str, Any]) -> float:
    """4N: N the matmul parameters of the SFT benchmark's Llama (query, key, value, output and the three MLP
    projections per layer, the tied head)."""
    h, i = model["hidden"], model["intermediate"]
    n = model["layers"] * (4 * h * h + 3 * h * i) + model["vocab"] * h
    return 4.0 * n


def sft_row(path: Path, peak_path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    peaks = json.loads(peak_path.read_text())["peak_gflops"]
    machine = data["machine"]["cpu"]
    bf16 = data["workload"].get("bf16")
    if bf16 is None:  # results before the field: ours and the peers ran bf16 where the CPU has it natively
        bf16 = "avx512_bf16" in machine or "amx_bf16" in machine
    dtype = "bfloat16" if bf16 else "float32"
    source = data["workload"]["data"]["source"]
    rows_kind = {"demo": "demo rows"}.get(source, "alpaca rows")
    if data["workload"]["data"].get("row_tokens"):
        low, high = data["workload"]["data"]["row_tokens"]
        rows_kind = f"alpaca rows of {low}-{high} tokens"
    rates = {k: v["tokens_per_second"]["median"] for k, v in data["summary"]["table"].items()}
    return bound_row(path.name, f"SFT, {rows_kind}", machine, dtype, peaks[dtype], rates,
                     lora_sft_flops_per_token(data["workload"]["model"]))


def collect(results: Path = RESULTS) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(results.glob("stage_throughput*.json")):
        rows += stage_rows(path)
    for name, peak_name in SFT_PEAK_FROM.items():
        if (results / name).exists():
            rows.append(sft_row(results / name, results / peak_name))
    return rows


def short_machine(machine: str) -> str:
    """``bench._machine.cpu()``'s string, shorter: "Intel(R) Xeon(R) Processor @ 2.60GHz; flags: avx2 avx512f" ->
    "Intel Xeon (avx2 avx512f)"; kernels held by ``ATEN_CPU_CAPABILITY`` named after."""
    name, _, rest = machine.partition("; flags: ")
    flags, _, held = rest.partition("; held: ")
    name = re.sub(r"\(R\)| Processor| @ [0-9.]+GHz", "", name).strip()
    capability = re.search(r"ATEN_CPU_CAPABILITY=(\w+)", held)
    return f"{name} ({flags})" + (f", kernels held to {capability.group(1).upper()}" if capability else "")


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| result | machine | stage, dtype | fastest peer | ours / peer now | peer's useful MFU | "
             "MFU ours needs for 2x | ours now | verdict |", "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["ratio_now"] >= 2:
            verdict = "**2x met**"
        elif r["reachable_by_arithmetic"]:
            verdict = f"not ruled out: ours needs {r['ours_mfu_gain_needed']:.1f}x its MFU"
        else:
            verdict = "**out of reach**: above the measured peak"
        lines.append(f"| `{r['source']}` | {short_machine(r['machine'])} | {r['stage']}, {r['dtype']} | "
                     f"{r['fastest_peer']} | "
                     f"{r['ratio_now']:.2f}x | {100 * r['peer_mfu']:.1f}% | {100 * r['mfu_needed_for_2x']:.1f}% | "
                     f"{100 * r['ours_mfu']:.1f}% | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the benchmarks' JSON results")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = collect(args.results)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
