"""HPO across workers: wall time of the same study with 1 and with 2 workers, and the pruned share.

The setup is the SFT benchmark's (``sft_throughput.build_setup``: the demo SFT data, the tiny Llama of ~4.5 M
parameters). Each run creates a fresh study (SQLite, or ``--storage`` for a PostgreSQL URL) exactly as the
``hpo_study`` asset does (``create_study``), then starts ``--workers`` real worker processes
(``python -m tuneline.recipes.hpo_worker``) at once and waits for them all; every trial is its own training
process, with ``threads_per_worker`` torch threads (the cores shared out over the workers). Wall time runs from
starting the workers to the last one exiting. Runs alternate 1 worker, 2 workers, 1, 2, ... (``--runs`` each).

    .venv/bin/python bench/hpo_workers.py --runs 3              # the published figures (a quiet machine)
    .venv/bin/python bench/hpo_workers.py --tiny --runs 1       # a quick check that it runs

Writes bench/results/hpo_workers.json (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench._machine import cpu  # noqa: E402
from sft_throughput import build_setup, versions, wait_for_quiet, write_json  # noqa: E402

DEFAULT_WORK_DIR = ROOT / ".bench" / "hpo_workers"
RESULTS_PATH = ROOT / "bench" / "results" / "hpo_workers.json"
SEED = 42


def hpo_params(tiny: bool, n_trials: Optional[int], workers: int) -> dict[str, Any]:
    """The study: TPE over lr and LoRA shape, median pruning on validation loss every eval_steps."""
    return {
        "n_trials": n_trials or (3 if tiny else 8),
        "trial_max_steps": 4 if tiny else 40,
        "eval_steps": 2 if tiny else 10,
        "pruner_startup_trials": 1 if tiny else 2,
        "pruner_warmup_steps": 0 if tiny else 10,
        "workers": workers,
        "heartbeat_interval": 5,
        "grace_period": 30,
        "space": {"learning_rate": [2e-4, 5e-3], "lora_r": [8, 16], "lora_alpha": [16, 32],
                  "lora_dropout": [0.0, 0.1], "warmup_ratio": [0.0, 0.1]},
    }


def run_study(setup: dict[str, Any], work: Path, name: str, workers: int, args: argparse.Namespace) -> dict:
    """One study with ``workers`` worker processes; wall time, counts, pruned share, trials per worker."""
    from tuneline.params import HpoParams, build
    from tuneline.train.hpo import counts, create_study, load_study, threads_per_worker

    hpo = build(HpoParams, hpo_params(args.tiny, args.n_trials, workers), "hpo")
    storage = args.storage or f"sqlite:///{work / 'optuna.db'}"
    create_study(name, storage, hpo)
    sft = {"method": "lora", "batch_size": 8, "max_length": 256, "group_by_length": False}
    out = work / "runs" / name
    procs = []
    started = time.perf_counter()
    for i in range(workers):
        spec = {"study_name": name, "storage_url": storage, "hpo": hpo_params(args.tiny, args.n_trials, workers),
                "params": sft, "base": setup["base"], "train_uri": Path(setup["train"]).as_uri(),
                "val_uri": Path(setup["val"]).as_uri(), "out_uri": (out / f"worker-{i}").as_uri(),
                "seed": SEED, "worker": i}
        spec_path = out / f"worker-{i}.spec.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec, indent=2))
        log = open(out / f"worker-{i}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, "-m", "tuneline.recipes.hpo_worker", "--spec", str(spec_path)],
                                       cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONPATH": str(ROOT)}), log))
    codes = []
    for proc, log in procs:
        codes.append(proc.wait())
        log.close()
    wall = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"a worker failed (exit codes {codes}); see {out}/worker-*.log")
    study = load_study(name, storage)
    now = counts(study)
    reports = [json.loads((out / f"worker-{i}" / "result.json").read_text()) for i in range(workers)]
    pruned = sum(t.state.name == "PRUNED" for t in study.trials)
    return {
        "study": name, "workers": workers, "wall_seconds": round(wall, 2), "finished": now.finished,
        "pruned": pruned, "pruned_share": round(pruned / now.finished, 3) if now.finished else None,
        "failed": now.failed, "trials_per_worker": [len(r["details"]["trials"]) for r in reports],
        "threads_per_worker": threads_per_worker(hpo, 1),
        "best_value": min((t.value for t in study.trials if t.state.name == "COMPLETE"), default=None),
        "loadavg_after": os.getloadavg()[0],
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="studies per worker count (interleaved)")
    parser.add_argument("--tiny", action="store_true", help="3 trials of 4 steps: checks that it runs")
    parser.add_argument("--n-trials", type=int, default=None, help="trials per study (default 8; --tiny 3)")
    parser.add_argument("--storage", default=None, help="SQLAlchemy URL (default: SQLite under --work-dir)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-min load average below this")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for quiet, in all")
    args = parser.parse_args(argv)

    work = args.work_dir
    setup_dir = work / "setup"
    built = build_setup(setup_dir, seed=SEED, pad_vocab=0 if args.tiny else 4096)["spec"]
    from tuneline.models.provision import model_ref

    base = model_ref(built["base_model"], Path(built["base_model"]).as_uri(), method="full", stage="base_model")
    setup = {"base": base.to_dict(), "train": built["ours_train"], "val": built["val"]}
    quiet = wait_for_quiet(args.max_load, 0.5, args.max_wait, 10, check_loadavg=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    for run in range(args.runs):
        for workers in (1, 2):
            row = run_study(setup, work, f"bench-{stamp}-r{run}-w{workers}", workers, args)
            print(json.dumps(row), flush=True)
            results.append(row)

    summary = {}
    for workers in (1, 2):
        rows = [r for r in results if r["workers"] == workers]
        summary[workers] = {"wall_seconds_median": statistics.median(r["wall_seconds"] for r in rows),
                            "pruned_share_median": statistics.median(r["pruned_share"] for r in rows),
                            "runs": len(rows)}
    speedup = summary[1]["wall_seconds_median"] / summary[2]["wall_seconds_median"]
    print(f"\n{'workers':>8} {'wall s (median)':>16} {'pruned share':>13} {'runs':>5}")
    for workers, s in summary.items():
        print(f"{workers:>8} {s['wall_seconds_median']:>16.1f} {s['pruned_share_median']:>13.2f} {s['runs']:>5}")
    print(f"2 workers / 1 worker: {speedup:.2f}x faster; CPU flags: {cpu()}; {os.cpu_count()} cores")
    write_json(args.out, {
        "what": "same study (n_trials, space, pruner) with 1 and 2 worker processes; wall time and pruned share",
        "params": hpo_params(args.tiny, args.n_trials, 0), "tiny": args.tiny, "storage": args.storage or "sqlite",
        "machine": {"cpu_flags": cpu(), "cores": os.cpu_count(), "platform": platform.platform()},
        "quiet_at_start": quiet, "versions": versions(), "runs": results,
        "summary": {str(k): v for k, v in summary.items()}, "speedup_2_over_1": round(speedup, 3),
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
