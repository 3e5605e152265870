"""What a training job costs before and after its steps: a fresh interpreter against a job forked from the
preloaded server (tuneline/recipes/_preload.py), for every training stage, interleaved.

    .venv/bin/python bench/launch_overhead.py --rounds 5 [--stages pretrain,sft,dpo,distill] \
        [--out bench/results/launch_overhead.json]

Each round runs every stage's short job (bench/kill_drill.py's tiny world and specs) once each way, in
alternating order: ``python -m tuneline.recipes.<stage> --spec S`` as a fresh interpreter (what the launcher did
before), and the same module forked from the server. The server is started (and its imports paid) once, before
the rounds, as ``make run`` pays it once at its first job; that start is reported on its own. Reported per stage:
the wall time of a job each way, medians with min-max, and whether both ways end with the same figures and
bitwise the same weights. Prints the CPU model and flags with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._machine import cpu  # noqa: E402
from bench.kill_drill import FIGURES, launch, outcome, spec_for, world  # noqa: E402


def fresh(stage: str, spec: dict, spec_path: Path) -> float:
    started = time.monotonic()
    proc = launch(stage, spec, spec_path)
    _, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    return time.monotonic() - started


def forked(stage: str, spec: dict, spec_path: Path) -> float:
    from tuneline.recipes import _preload

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert _preload.compatible(env), "this environment cannot fork jobs (not Linux, or TUNELINE_PRELOAD=0)"
    spec_path.write_text(json.dumps(spec))
    started = time.monotonic()
    code = _preload.run(f"tuneline.recipes.{stage}", ["--spec", str(spec_path)], env, str(ROOT))
    assert code == 0, f"the forked {stage} job exited with {code}"
    return time.monotonic() - started


def summary(values: list[float]) -> dict:
    return {"median_s": round(statistics.median(values), 2), "min_s": round(min(values), 2),
            "max_s": round(max(values), 2), "runs": [round(v, 2) for v in values]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stages", default="pretrain,sft,dpo,distill")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "launch_overhead.json"))
    args = parser.parse_args()
    stages = args.stages.split(",")
    ways = {"fresh": fresh, "forked": forked}
    times: dict[str, dict[str, list[float]]] = {s: {w: [] for w in ways} for s in stages}
    results: dict[str, dict[str, dict]] = {s: {} for s in stages}
    with tempfile.TemporaryDirectory(prefix="tuneline-launch-") as tmp:
        w = world(Path(tmp))
        from tuneline.recipes import _preload

        started = time.monotonic()  # the server's start: its imports, paid once per launching process
        assert _preload.run("platform", [], {**os.environ, "PYTHONPATH": str(ROOT)}, str(ROOT)) == 0
        server_start = time.monotonic() - started
        for r in range(args.rounds):
            for stage in stages:
                order = list(ways) if r % 2 == 0 else list(reversed(ways))
                for way in order:
                    out = Path(tmp) / f"{stage}-{way}-{r}"
                    times[stage][way].append(ways[way](stage, spec_for(stage, w, out), Path(f"{out}.json")))
                    results[stage][f"{way}-{r}"] = outcome(out)
    report = {"cpu": cpu(), "rounds": args.rounds, "server_start_s": round(server_start, 2), "stages": {}}
    same_everywhere = True
    for stage in stages:
        outcomes = list(results[stage].values())
        same = all(o["model"]["sha256"] == outcomes[0]["model"]["sha256"]
                   and all(o["metrics"].get(k) == outcomes[0]["metrics"].get(k) for k in FIGURES[stage])
                   for o in outcomes)
        same_everywhere &= same
        report["stages"][stage] = {**{way: summary(times[stage][way]) for way in ways}, "same_results": same,
                                   "saved_s": round(statistics.median(times[stage]["fresh"])
                                                    - statistics.median(times[stage]["forked"]), 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"CPU: {report['cpu']}")
    print(f"server start (imports, once per launching process): {report['server_start_s']} s")
    for stage, r in report["stages"].items():
        f, k = r["fresh"], r["forked"]
        print(f"{stage:9s} fresh {f['median_s']:5.2f} s [{f['min_s']:.2f}-{f['max_s']:.2f}]  forked "
              f"{k['median_s']:5.2f} s [{k['min_s']:.2f}-{k['max_s']:.2f}]  saved {r['saved_s']:.2f} s  "
              f"same figures and weights: {r['same_results']}")
    return 0 if same_everywhere else 1


if __name__ == "__main__":
    sys.exit(main())
