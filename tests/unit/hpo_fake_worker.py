"""A real search worker process (``tuneline.train.hpo.run_worker``) whose trials are short loss curves instead of
training runs, so the worker tests can run several workers, kill one, and still take seconds.

    python tests/unit/hpo_fake_worker.py STORAGE STUDY WORKER PARAMS_JSON [--step-seconds S] [--hang-first MARKER]

Each trial rebuilds itself from the storage (as the trial process does), reports 4 steps and obeys the pruner;
trials with ``lora_r == 4`` have a much worse curve. ``--hang-first`` makes the worker's first trial write
MARKER and hang (the test then SIGKILLs it). Prints ``{"worker": W, "ran": [trial numbers]}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tuneline.params import HpoParams, SearchSpace
from tuneline.train import hpo

SPACE = SearchSpace(lora_r=(4, 8, 16), lora_alpha=(8, 16), batch_size=(4,))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("storage")
    parser.add_argument("study")
    parser.add_argument("worker", type=int)
    parser.add_argument("params")
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--hang-first", default=None)
    args = parser.parse_args()
    params = HpoParams(**json.loads(args.params))
    first = [True]

    def run_trial(number: int, trial_id: int, trial_params: dict) -> dict:
        trial = hpo.load_trial(args.study, args.storage, trial_id)
        if args.hang_first and first[0]:
            Path(args.hang_first).write_text(str(number))
            time.sleep(600)
        first[0] = False
        value = None
        for step in range(4):
            time.sleep(args.step_seconds)
            value = (5.0 if trial_params["lora_r"] == 4 else 1.0) - 0.05 * step - trial_params["learning_rate"]
            trial.report(value, step)
            if trial.should_prune():
                return {"state": "pruned", "value": value, "pruned_at_step": step}
        return {"state": "complete", "value": value}

    ran = hpo.run_worker(args.study, args.storage, SPACE, params, seed=0, worker=args.worker, run_trial=run_trial,
                         log=lambda m: print(m, flush=True))
    print(json.dumps({"worker": args.worker, "ran": ran}), flush=True)


if __name__ == "__main__":
    main()
