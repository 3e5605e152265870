"""The prompt-template arm out of process: ``python -m tuneline.recipes.classifier_template --spec SPEC.json``
(a :class:`~tuneline.specs.TemplateSpec`). The causal LM ``base`` scores every label name under the recipe's
Jinja template for each test text, zero-shot and with k few-shot examples drawn from the train split; the same
metrics as the classifier on the same test split; ``report.json`` and the plots under ``out_uri``."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Optional

from tuneline.recipes import _runner
from tuneline.specs import Outcome, TemplateSpec


def run(spec: TemplateSpec, pipes: Any = None) -> Outcome:
    from tuneline import storage
    from tuneline.classify.data import LabelSet, examples_from_records
    from tuneline.classify.evaluate import evaluate_probs, headline
    from tuneline.classify.template import choose_shots, template_probs
    from tuneline.models.loading import load_model_ref
    from tuneline.records import read_records

    log = _runner.StepLogger(pipes, spec.mlflow)
    train = examples_from_records(read_records(storage.fetch(spec.train_uri)), "train")
    test = examples_from_records(read_records(storage.fetch(spec.test_uri)), "test")
    arm = spec.params.template
    if arm.max_examples is not None:
        test = test.subset(range(min(arm.max_examples, len(test))))
    labels = LabelSet.from_labels(train.labels)
    model, tokenizer = load_model_ref(spec.base)
    work = storage.Workspace(spec.out_uri)
    reports, metrics = {}, {"test_examples": len(test), "n_labels": len(labels)}
    for k in arm.shots:
        name = f"{k}-shot"
        shots = choose_shots(train, k, spec.seed, spec.params.label_names)
        started = time.perf_counter()
        probs = template_probs(model, tokenizer, test.texts, labels, template=arm.template, shots=shots,
                               names=spec.params.label_names, max_length=arm.max_length)
        seconds = time.perf_counter() - started
        reports[name] = evaluate_probs(probs, test, labels, name=f"template_{k}shot", out_dir=work.path / "eval",
                                       samples=spec.evaluation.bootstrap_samples, confidence=spec.evaluation.confidence,
                                       seed=spec.evaluation.seed)
        reports[name]["texts_per_second"] = len(test) / seconds if seconds > 0 else None
        metrics[f"{name}_macro_f1"] = reports[name]["macro_f1"]
        metrics[f"{name}_accuracy"] = reports[name]["accuracy"]
        log.emit(f"template {name}: macro-F1 {reports[name]['macro_f1']:.4f} on {len(test)} texts, {seconds:.0f} s")
    if not _runner.is_main_process():
        return None
    (work.path / "report.json").write_text(json.dumps(reports, indent=1, default=float), encoding="utf-8")
    work.sync()
    outcome = Outcome(model=None, metrics=metrics, details={
        "report_uri": work.uri_of("report.json"), "template": arm.template, "labels": list(labels.names),
        "headlines": {k: headline(v) for k, v in reports.items()}})
    return _runner.finish(spec, outcome, pipes, log=log)


def main(argv: Optional[list[str]] = None) -> int:
    return _runner.run_cli(argv, spec_class=TemplateSpec, run=run)


if __name__ == "__main__":
    sys.exit(main())
