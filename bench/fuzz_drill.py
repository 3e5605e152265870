"""The fuzzing drill: every reader and the validator, given thousands of random valid and damaged files.

    .venv/bin/python bench/fuzz_drill.py [--examples 5000] [--validator-examples 500] [--prepare-examples 100]
        [--cli-examples 300] [--readers jsonl,csv,...] [--out bench/results/fuzz_drill.json]

Runs the properties of tests/unit/test_fuzz.py (the short version ``make test`` runs) with their example counts
scaled so that each reader gets at least ``--examples`` (JSONL, JSON, CSV/TSV in random dialects, Parquet, plain
text, a container sniffed from its bytes, a recipe-named format/schema/fields, the MANIFEST.json licence
reader). The validator, the whole prepare step and the ``tuneline ingest``/``tuneline drift`` commands run a
Great Expectations suite per example (about 0.2 s each), so they get their own, smaller counts. Examples are
derandomized (the same ones every run, no example database), so a failure reproduces with the same command.

What must hold, example after example: no exception but a one-line ``IngestError`` naming the file;
``read == accepted + quarantined``; every rejection with the file, a line within it and a known reason; valid
rows all read back unchanged. Reported per reader: examples run, properties, wall and CPU seconds, failures
(with hypothesis's falsifying example). Exit status 1 when any property failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROPERTIES = ROOT / "tests" / "unit" / "test_fuzz.py"


def cpu() -> str:
    text = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return f"{model}; flags: " + " ".join(sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, PROPERTIES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def properties(module) -> dict[str, list]:
    """reader -> its hypothesis properties, in file order."""
    by_reader: dict[str, list] = defaultdict(list)
    for value in vars(module).values():
        if callable(value) and hasattr(value, "fuzz_reader"):
            by_reader[value.fuzz_reader].append(value)
    return by_reader


def base_examples(tests: list) -> int:
    return sum(t._hypothesis_internal_use_settings.max_examples for t in tests)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=5000, help="at least this many examples per reader")
    parser.add_argument("--validator-examples", type=int, default=500)
    parser.add_argument("--prepare-examples", type=int, default=100)
    parser.add_argument("--cli-examples", type=int, default=300)
    parser.add_argument("--readers", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz_drill.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

    targets = {"validator": args.validator_examples, "prepare": args.prepare_examples, "cli": args.cli_examples}
    base = {reader: base_examples(tests) for reader, tests in properties(load("fuzz_base")).items()}
    wanted = [r for r in args.readers.split(",") if r] or list(base)
    for reader, count in base.items():  # scale each reader's properties so that they add up to its target
        target = targets.get(reader, args.examples)
        os.environ[f"TUNELINE_FUZZ_SCALE_{reader.upper()}"] = str(math.ceil(target / count * 1000) / 1000)
    module = load("fuzz_drill_run")

    print(f"fuzz drill on {cpu()}", flush=True)
    started, report = time.time(), {"cpu": cpu(), "readers": {}, "command": " ".join([Path(sys.argv[0]).name,
                                                                                         *(argv or sys.argv[1:])])}
    for reader, tests in properties(module).items():
        if reader not in wanted:
            continue
        wall, cpu_time = time.perf_counter(), time.process_time()
        before = module.COUNTS[reader]
        failures = []
        for test in tests:
            try:
                test()
            except BaseException as exc:  # a failed property: keep hypothesis's falsifying example
                if isinstance(exc, KeyboardInterrupt):
                    raise
                text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                notes = "\n".join(getattr(exc, "__notes__", []))
                failures.append({"property": test.__name__, "error": text[-1500:], "example": notes[-3000:]})
        row = {
            "properties": len(tests),
            "examples": module.COUNTS[reader] - before,
            "seconds": round(time.perf_counter() - wall, 1),
            "cpu_seconds": round(time.process_time() - cpu_time, 1),
            "failures": failures,
        }
        report["readers"][reader] = row
        print(f"{reader:<10} {row['examples']:>7} examples  {row['properties']} properties  "
              f"{row['seconds']:>7.1f} s wall  {row['cpu_seconds']:>7.1f} s CPU  "
              f"{'OK' if not failures else f'{len(failures)} FAILED'}", flush=True)
        for failure in failures:
            print(f"  {failure['property']}: {failure['error']}\n{failure['example']}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    rows = report["readers"].values()
    report["total"] = {"examples": sum(r["examples"] for r in rows), "seconds": round(time.time() - started, 1),
                       "failures": sum(len(r["failures"]) for r in rows)}
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"total      {report['total']['examples']:>7} examples in {report['total']['seconds']} s, "
          f"{report['total']['failures']} failed properties; written to {args.out}")
    return 1 if report["total"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
