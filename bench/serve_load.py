"""Load drill for the served champion: bounded request counts at several concurrencies, on loopback.

    .venv/bin/python bench/serve_load.py [--recipe configs/demo.yaml] [--requests 2000] [--concurrency 1 8 32]
                                         [--rollback-drill] [--out bench/results/serve_load.json]

Starts ``tuneline serve`` for the recipe's registered champion (run ``make run`` first) on a free 127.0.0.1 port,
waits for ``/health``, then for each concurrency sends ``--requests`` ``/generate`` requests from that many client
threads (prompts drawn from the demo's task families; it stops by itself) while one more thread sends oversized
and malformed bodies at the same time. Reported per concurrency: throughput (good requests/s), p50/p95/p99
latency, answers by status, the bad bodies' statuses (all must be 4xx) and whether the inference log gained
exactly one row per request. ``--rollback-drill`` then rolls the champion back under load at concurrency 8,
waits until the server follows, promotes the previous champion again, and counts failed requests (must be 0)
and the versions the answers came from. The server is stopped by PID. Prints the CPU model and flags.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._machine import cpu  # noqa: E402

PROMPTS = [
    "What is 17 plus 25?",
    "Reverse the word 'garden'.",
    "Sort these numbers: 9, 3, 7, 1.",
    "Is 29 a prime number?",
    "Translate 'red' into French.",
    "Count the vowels in 'pipeline'.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: bytes, timeout: float = 120.0) -> tuple[int, dict, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            payload = json.loads(raw or b"null")
        except json.JSONDecodeError:
            payload = {"raw": raw[:200].decode("utf-8", "replace")}
        return resp.status, payload if isinstance(payload, dict) else {}, time.perf_counter() - start
    except OSError as exc:  # a refused or reset connection counts as an error, status 0
        return 0, {"detail": str(exc)}, time.perf_counter() - start
    finally:
        conn.close()


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def start_server(recipe: str, port: int, follow_seconds: Optional[float]) -> subprocess.Popen:
    env = dict(os.environ, TUNELINE_RECIPE=recipe)
    command = [sys.executable, "-m", "pipelines.cli", "serve", "--recipe", recipe, "--port", str(port)]
    if follow_seconds is not None:
        command += ["--follow-seconds", str(follow_seconds)]
    proc = subprocess.Popen(command,
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            health(port)
            return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise SystemExit("the server did not answer /health within 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bad_bodies(port: int, max_body: int, stop: threading.Event) -> Counter:
    """Oversized and malformed bodies, one after the other, until ``stop``: their statuses."""
    bodies = [json.dumps({"prompt": "x" * (max_body + 10)}).encode(), b"{not json", b"[]", b'{"prompt": 5}',
              json.dumps({"prompt": "hi", "max_new_tokens": -1}).encode()]
    statuses: Counter = Counter()
    k = 0
    while not stop.is_set():
        status, _, _ = post(port, bodies[k % len(bodies)])
        statuses[status] += 1
        k += 1
    return statuses


def phase(port: int, requests: int, concurrency: int, max_body: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    bodies = [json.dumps({"prompt": rng.choice(PROMPTS)}).encode() for _ in range(requests)]
    stop = threading.Event()
    with ThreadPoolExecutor(1) as side:
        bad = side.submit(bad_bodies, port, max_body, stop)
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda b: post(port, b), bodies))
        wall = time.perf_counter() - start
        stop.set()
        bad_statuses = bad.result()
    ok = sorted(lat for status, _, lat in results if status == 200)
    q = statistics.quantiles(ok, n=100) if len(ok) >= 2 else [float("nan")] * 99
    return {
        "concurrency": concurrency,
        "requests": requests,
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(ok) / wall, 1),
        "p50_ms": round(q[49] * 1000, 1), "p95_ms": round(q[94] * 1000, 1), "p99_ms": round(q[98] * 1000, 1),
        "statuses": dict(Counter(status for status, _, _ in results)),
        "versions": dict(Counter(str(body.get("version")) for status, body, _ in results if status == 200)),
        "bad_bodies": dict(bad_statuses),
        "bad_bodies_all_4xx": all(400 <= s < 500 for s in bad_statuses),
        "sent": requests + sum(bad_statuses.values()),
    }


def check_rollback_possible(recipe: Any) -> None:
    """The drill rolls the champion back to the one before it: there must be one (two registered runs)."""
    from tuneline.deploy.registry import TAG_PREVIOUS_CHAMPION, current_champion
    from tuneline.settings import load_settings
    from tuneline.tracking import Tracker

    name = recipe.registered_model_name()
    champion = current_champion(Tracker(load_settings().tracking_uri), name)
    if champion is None or not (champion.get("tags") or {}).get(TAG_PREVIOUS_CHAMPION):
        raise SystemExit(f"--rollback-drill needs a champion of {name} that replaced an earlier one: run the "
                         "pipeline twice with a gate that promotes the second candidate")


def rollback_drill(port: int, recipe: Any, follow_limit_s: float) -> dict[str, Any]:
    """Roll the champion back under load, wait until it is served, promote the old champion again."""
    from tuneline.deploy.registry import current_champion, promote, rollback
    from tuneline.tracking import Tracker
    from tuneline.settings import load_settings

    tracker = Tracker(load_settings().tracking_uri)
    name = recipe.registered_model_name()
    before = current_champion(tracker, name)
    results: list[tuple[int, dict, float]] = []
    stop = threading.Event()

    def load() -> None:
        rng = random.Random(len(results))
        while not stop.is_set():
            results.append(post(port, json.dumps({"prompt": rng.choice(PROMPTS)}).encode()))

    def follow(version: Any) -> float:
        start = time.monotonic()
        while str(health(port)["version"]) != str(version):
            if time.monotonic() - start > follow_limit_s:
                raise SystemExit(f"the server did not serve version {version} within {follow_limit_s} s")
            time.sleep(0.2)
        return round(time.monotonic() - start, 2)

    workers = [threading.Thread(target=load) for _ in range(8)]
    for w in workers:
        w.start()
    try:
        time.sleep(2)
        back = rollback(tracker, name)  # {name, alias, from_version, to_version}
        to_previous_s = follow(back["to_version"])
        time.sleep(2)
        promote(tracker, name, before["version"], expected=back["to_version"])
        to_restored_s = follow(before["version"])
        time.sleep(2)
    finally:
        stop.set()
        for w in workers:
            w.join()
    return {
        "champion": before["version"], "rolled_back_to": back["to_version"],
        "seconds_until_served": {"rollback": to_previous_s, "restore": to_restored_s},
        "requests": len(results),
        "failed": sum(1 for status, _, _ in results if status != 200),
        "versions": dict(Counter(str(body.get("version")) for status, body, _ in results if status == 200)),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=os.environ.get("TUNELINE_RECIPE", "configs/demo.yaml"))
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rollback-drill", action="store_true", help="roll the champion back under load")
    parser.add_argument("--follow-seconds", type=float, default=2.0, help="the server's alias poll interval")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    args = parser.parse_args(argv)

    from tuneline.deploy.inference_log import InferenceLog
    from tuneline.params import load_recipe
    from tuneline.settings import load_settings

    os.environ["TUNELINE_RECIPE"] = args.recipe
    settings = load_settings(recipe=args.recipe)
    recipe = load_recipe(settings.recipe)
    log = InferenceLog(settings.log_path(recipe))
    if args.rollback_drill:
        check_rollback_possible(recipe)
    port = free_port()
    proc = start_server(args.recipe, port, args.follow_seconds)
    report: dict[str, Any] = {"cpu": cpu(), "cores": os.cpu_count(), "recipe": args.recipe,
                              "serve": {"max_batch_size": recipe.serve.max_batch_size,
                                        "batch_wait_ms": recipe.serve.batch_wait_ms},
                              "model": {k: health(port).get(k) for k in ("model", "version", "alias")}, "phases": []}
    try:
        post(port, json.dumps({"prompt": PROMPTS[0]}).encode())  # warm-up, not counted
        for k, concurrency in enumerate(args.concurrency):
            before = log.count()
            result = phase(port, args.requests, concurrency, recipe.serve.max_body_bytes, seed=k)
            result["log_rows"] = log.count() - before
            result["one_log_row_per_request"] = result["log_rows"] == result["sent"]
            report["phases"].append(result)
            print(json.dumps(result), flush=True)
        if args.rollback_drill:
            report["rollback"] = rollback_drill(port, recipe, follow_limit_s=10 * args.follow_seconds + 60)
            print(json.dumps(report["rollback"]), flush=True)
    finally:
        stop_server(proc)
    base = report["phases"][0]["throughput_rps"] if report["phases"] else None
    for row in report["phases"]:
        row["speedup_vs_first"] = round(row["throughput_rps"] / base, 2) if base else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nCPU: {report['cpu']}; {report['cores']} cores; model {report['model']}")
    print("| concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | statuses | bad bodies | log rows = sent | x c1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["phases"]:
        print(f"| {r['concurrency']} | {r['requests']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p95_ms']} | "
              f"{r['p99_ms']} | {r['statuses']} | {r['bad_bodies']} | {r['one_log_row_per_request']} | "
              f"{r['speedup_vs_first']} |")
    ok = all(r["statuses"] == {200: r["requests"]} and r["bad_bodies_all_4xx"] and r["one_log_row_per_request"]
             for r in report["phases"])
    if args.rollback_drill:
        ok = ok and report["rollback"]["failed"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
