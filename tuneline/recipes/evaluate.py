"""Evaluate models side by side out of process: ``python -m tuneline.recipes.evaluate --spec SPEC.json``
(an :class:`~tuneline.specs.EvalSpec`).

Every model of the spec (and the registered champion, when named) is evaluated on the test split and the
preference test split (:func:`tuneline.evaluate.report.evaluate_model`), and its own tokenizer's
training/serving template parity is checked. ``<out_uri>`` receives ``report.json`` (every report, the
comparison, the parity results and the Markdown table), ``report.md`` and ``comparison.png``;
``result.json`` holds the :class:`~tuneline.specs.Outcome` with each model's loss and accuracy. Any error
exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

from tuneline.recipes import _runner
from tuneline.specs import EvalSpec, Outcome

REPORT_FILE = "report.json"
PARITY_RECORDS = (200, 50)  # test and preference records checked for template parity


def run(spec: EvalSpec, pipes: Any = None) -> Outcome:
    from tuneline import storage
    from tuneline.evaluate.report import compare, evaluate_model, markdown_table, plot_comparison, template_parity
    from tuneline.models.loading import load_model_ref
    from tuneline.records import read_records

    log = _runner.StepLogger(pipes, spec.mlflow)
    test = read_records(storage.fetch(spec.test_uri))
    pref = [p for p in read_records(storage.fetch(spec.preference_uri))] if spec.preference_uri else []
    pref = [p for p in pref if p.kind == "preference"]
    checker = _checker(spec.checker, test)
    loaders = {name: (lambda ref=ref: load_model_ref(ref, offload=spec.offload, device=spec.compute.device))
               for name, ref in spec.models.items()}
    if spec.champion:
        loaders["champion"] = lambda: _load_champion(spec)
    reports: dict[str, Any] = {}
    parity: dict[str, Any] = {}
    policy = _PolicyFigures(spec, test)
    for name, load in loaders.items():
        model, tokenizer = load()
        reports[name] = evaluate_model((model, tokenizer), test, pref, spec.params, name=name, checker=checker)
        reports[name]["policy"] = policy(model, tokenizer)
        parity[name] = template_parity(tokenizer, test[: PARITY_RECORDS[0]] + pref[: PARITY_RECORDS[1]])
        accuracy = (reports[name]["task_accuracy"] or reports[name]["exact_match"])["mean"]
        log.emit(f"{name}: loss {reports[name]['loss']:.3f}, accuracy {accuracy:.3f}, "
                 f"template parity {'ok' if parity[name]['ok'] else 'MISMATCH'}")
        del model
    work = storage.Workspace(spec.out_uri)
    table = markdown_table(reports)
    plot_comparison(reports, work.path / "comparison.png")
    report = {"models": reports, "comparison": compare(reports), "template_parity": parity, "table": table,
              "checker": spec.checker}
    (work.path / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    (work.path / "report.md").write_text(table + "\n", encoding="utf-8")
    work.sync()
    metrics: dict[str, Any] = {}
    for name, rep in reports.items():
        metrics[f"{name}_loss"] = rep["loss"]
        metrics[f"{name}_accuracy"] = (rep["task_accuracy"] or rep["exact_match"])["mean"]
        metrics[f"{name}_parity_ok"] = parity[name]["ok"]
        for key, value in (rep.get("policy") or {}).items():
            if isinstance(value, (int, float)):
                metrics[f"{name}_{key}"] = value
    return _runner.finish(spec, Outcome(model=None, metrics=metrics, details={"table": table}), pipes, log=log)


class _PolicyFigures:
    """Per model: the reward model's mean score of its greedy answers to the first ``policy_prompts`` test prompts,
    and the exact KL of its next-token distributions to the reference model's along those answers (None when the
    spec names no reward model / reference)."""

    def __init__(self, spec: EvalSpec, test: list[Any]) -> None:
        from tuneline.models.loading import load_model_ref, local_model_dir
        from tuneline.train.reward import RewardScorer
        from tuneline.train.rl import prompts_of

        self.prompts = prompts_of(test)[: spec.params.policy_prompts]
        self.max_new_tokens = spec.params.max_new_tokens
        self.batch_size = spec.params.batch_size
        self.scorer = RewardScorer(local_model_dir(spec.reward_model)) if spec.reward_model is not None else None
        self.reference = (load_model_ref(spec.models[spec.reference], device=spec.compute.device)[0]
                          if spec.reference else None)

    def __call__(self, model: Any, tokenizer: Any) -> Optional[dict[str, Any]]:
        from tuneline.evaluate.policy import kl_to_reference, mean_reward, rollouts

        if not self.prompts or (self.scorer is None and self.reference is None):
            return None
        out = rollouts(model, tokenizer, self.prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        figures: dict[str, Any] = {"prompts": len(self.prompts), "tokens_per_s": out["tokens_per_s"]}
        if self.scorer is not None:
            figures["reward"] = mean_reward(self.scorer, self.prompts, out["texts"], out["ids"])[0]
        if self.reference is not None:
            figures["kl_to_reference"] = kl_to_reference(model, out["prompt_ids"], out["ids"], reference=self.reference,
                                                         pad_id=tokenizer.pad_token_id or 0,
                                                         batch_size=self.batch_size)
        return figures


def _checker(name: Optional[str], test: list[Any]) -> Any:
    """The answer checker: ``demo`` (the demo tasks' own), ``auto`` (demo when every test record is a demo
    task), or None."""
    from tuneline.data.demo import TASK_FAMILIES, check_answer

    if name is None:
        return None
    if name == "auto":
        tasks = {rec.task for rec in test}
        return check_answer if tasks and tasks <= set(TASK_FAMILIES) else None
    if name == "demo":
        return check_answer
    raise ValueError(f"unknown answer checker {name!r} (known: auto, demo)")


def _load_champion(spec: EvalSpec) -> tuple[Any, Any]:
    from tuneline.deploy.registry import load_registered
    from tuneline.tracking import Tracker

    if spec.mlflow is None:
        raise ValueError("the spec names a champion but no tracking server (mlflow)")
    model, tokenizer, _ = load_registered(Tracker(spec.mlflow.tracking_uri), str(spec.champion),
                                          device=spec.compute.device)
    return model, tokenizer


def report_uri(out_uri: str) -> str:
    from tuneline import storage

    return storage.join(out_uri, REPORT_FILE)


def read_report(out_uri: str) -> dict[str, Any]:
    """The report a finished evaluation wrote under ``out_uri``."""
    from tuneline import storage

    return json.loads(storage.read_text(report_uri(out_uri)))


def main(argv: Optional[list[str]] = None) -> int:
    return _runner.run_cli(argv, spec_class=EvalSpec, run=run)


if __name__ == "__main__":
    sys.exit(main())
