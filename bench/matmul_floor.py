"""The matmul floor of a training step: how fast ours could be if its step did nothing but its own matmuls.

For DPO and distillation (``stage_throughput.py``'s workloads, each contender in its own process, interleaved), a
callback on the Trainer times steps ``WALL`` without a profiler, then steps ``PROFILED`` under ``torch.profiler``,
summing the self time of the matmul operations (``MATMUL_OPS``: the forward and backward GEMMs of every linear layer
and attention's batched matmuls). A step cannot take less than its matmuls at the speed these kernels ran them, so
``peer step / ours' matmuls per step`` is the most ours could be ahead of the peer with the same arithmetic: below 2,
issue 16's 2x is out of reach without less arithmetic (less padding, fewer passes) or faster kernels. For
distillation ours' teacher pass, outside its loop, is left out, so its bound is generous to ours.

    python bench/matmul_floor.py --stages dpo,distill --runs 3     # bench/results/matmul_floor.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._machine import cpu  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "matmul_floor.json"
MATMUL_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation"}
WALL = (10, 30)  # steps timed without the profiler
PROFILED = (30, 50)  # steps whose matmuls are summed under it
# ours and a peer at its best flags for a CPU (eager attention) that runs in this venv: LLaMA-Factory's DPO, in its
# own venv and CLI, measured level with TRL's (docs/benchmarks.md, per-stage tables)
CONTENDERS = {"dpo": ("ours", "trl-eager"), "distill": ("ours", "trl-gkd-eager")}


def window_callback(found: dict[str, float]) -> Any:
    """A TrainerCallback filling ``found`` with the unprofiled seconds per step and the matmul seconds per step."""
    import torch
    from transformers import TrainerCallback

    class Window(TrainerCallback):
        prof: Any = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == WALL[0]:
                found["wall_start"] = time.perf_counter()
            if state.global_step == PROFILED[0]:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == WALL[1]:
                found["step_s"] = (time.perf_counter() - found.pop("wall_start")) / (WALL[1] - WALL[0])
            if state.global_step == PROFILED[1] and self.prof is not None:
                self.prof.__exit__(None, None, None)
                events = self.prof.key_averages()
                matmul_us = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
                found["matmul_s"] = matmul_us / 1e6 / (PROFILED[1] - PROFILED[0])
                found["matmul_calls"] = sum(e.count for e in events if e.key in MATMUL_OPS) / (
                    PROFILED[1] - PROFILED[0])

    return Window()


def child(stage: str, contender: str, work: Path, base: str) -> dict[str, Any]:
    """One contender's stage_throughput child with the window callback added to every Trainer it builds."""
    from transformers import Trainer

    import bench.stage_throughput as st

    found: dict[str, float] = {}
    original = Trainer.train

    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.add_callback(window_callback(found))
        return original(self, *args, **kwargs)

    Trainer.train = train
    eager = contender.endswith("-eager")
    if eager:
        st.PEER_ATTN["attn_implementation"] = "eager"
    st.CHILDREN[(stage, contender.removesuffix("-eager"))](work, base)
    if "matmul_s" not in found or "step_s" not in found:
        raise RuntimeError(f"{stage}:{contender} ran fewer than {PROFILED[1]} steps")
    return found


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["contender"] for r in rows):
        mine = [r for r in rows if r["contender"] == name and "error" not in r]
        if mine:
            out[name] = {k: statistics.median(r[k] for r in mine) for k in ("step_s", "matmul_s", "matmul_calls")}
            out[name]["matmul_share"] = out[name]["matmul_s"] / out[name]["step_s"]
    peers = {k: v["step_s"] for k, v in out.items() if k != "ours"}
    if "ours" in out and peers:
        fastest = min(peers, key=peers.__getitem__)
        out["fastest_peer"] = fastest
        out["ratio_now"] = peers[fastest] / out["ours"]["step_s"]
        out["ratio_bound"] = peers[fastest] / out["ours"]["matmul_s"]  # ours' step reduced to its matmuls
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="dpo,distill")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        stage, contender = args.child.split(":")
        print("ROW " + json.dumps(child(stage, contender, Path(args.work), args.base)), flush=True)
        return 0

    import bench.stage_throughput as st

    work = Path(tempfile.mkdtemp(prefix="tuneline-matmul-floor-"))
    setup = st.prepare(work)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    machine = cpu()
    print(f"# {machine}", flush=True)
    results: dict[str, Any] = {"machine": machine, "runs": args.runs, "wall_steps": WALL, "profiled_steps": PROFILED,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": {}}
    for stage in args.stages.split(","):
        if stage == "distill":
            st.distill_teacher(work, setup["base"])
        rows = []
        for run in range(args.runs):
            for contender in CONTENDERS[stage]:
                cache = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-", dir=work)}
                proc = subprocess.run([sys.executable, __file__, "--child", f"{stage}:{contender}", "--work",
                                       str(work), "--base", setup["base"]], capture_output=True, text=True,
                                      env={**env, **cache}, timeout=3600)
                row = {"contender": contender, "run": run, **st._row(proc)}
                print(json.dumps({"stage": stage, **row}), flush=True)
                rows.append(row)
        results["stages"][stage] = {"rows": rows, "summary": summarize(rows)}
        print(json.dumps({"stage": stage, "summary": results["stages"][stage]["summary"]}), flush=True)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
