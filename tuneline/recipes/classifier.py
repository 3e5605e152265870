"""Train and evaluate a sequence classifier out of process: ``python -m tuneline.recipes.classifier --spec
SPEC.json`` (a :class:`~tuneline.specs.ClassifierSpec`).

``strategy: auto`` is decided here, from the train split's class counts and the MiniLM distance between its
texts and the reference sample (:mod:`tuneline.classify.strategy`). One model is trained at ``max_length``, or,
with ``max_lengths``, one ensemble member per length (probabilities averaged with validation weights). The test
split is scored for every model beside the linear probe and, when the spec names one, the registered champion;
``report.json`` holds everything (per-class F1, confusion, reliability bins, per-example predictions for the
gate's paired bootstrap), with confusion and reliability PNGs under ``eval/``. A rerun resumes each model from
its last checkpoint.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

from tuneline.recipes import _runner
from tuneline.specs import ClassifierSpec, Outcome

REPORT = "report.json"


def run(spec: ClassifierSpec, pipes: Any = None) -> Outcome:
    from tuneline import storage
    from tuneline.classify.data import LabelSet, examples_from_records, label_counts
    from tuneline.classify.ensemble import combine, validation_weights
    from tuneline.classify.evaluate import evaluate_model, evaluate_probs, headline
    from tuneline.classify.model import encoder_path
    from tuneline.classify.train import fit_classifier
    from tuneline.models.provision import model_ref
    from tuneline.records import read_records

    log = _runner.StepLogger(pipes, spec.mlflow)
    train, val, test = (examples_from_records(read_records(storage.fetch(uri)), name) for name, uri in
                        (("train", spec.train_uri), ("validation", spec.val_uri), ("test", spec.test_uri)))
    params, ev = spec.params, spec.evaluation
    labels = LabelSet.from_labels(train.labels)
    work = storage.Workspace(spec.out_uri)
    encoder = encoder_path(spec.encoder)
    strategy, decision = spec.strategy or params.strategy, None
    if strategy == "auto":
        decision = _decide(spec, train, label_counts(train.labels))
        strategy = decision.strategy
        log.emit(f"strategy auto -> {decision.summary()}")
    lengths = spec.max_lengths or (params.max_length,)
    log.emit(f"classifier: {strategy} on {encoder}, {len(labels)} labels, train {len(train)} val {len(val)} "
             f"test {len(test)}, max lengths {list(lengths)}")
    reports: dict[str, dict[str, Any]] = {}
    members, member_probs, results, curves = [], [], [], {}
    for length in lengths:
        name = "classifier" if len(lengths) == 1 else f"member_{length}"
        sub = "model" if len(lengths) == 1 else name
        result, model, tokenizer = fit_classifier(
            encoder, train, val, params, work.path / sub, strategy=strategy, seed=spec.seed, max_steps=spec.max_steps,
            max_length=length, on_log=_runner.StepLogger(pipes, spec.mlflow, prefix=f"{name}/") if len(lengths) > 1
            else log, on_checkpoint=work.sync if work.remote else None)
        reports[name], probs = evaluate_model(model, tokenizer, labels, test, name=name, max_length=length,
                                              out_dir=work.path / "eval", samples=ev.bootstrap_samples,
                                              confidence=ev.confidence, seed=ev.seed, bf16=result.bf16)
        log.emit(f"{name}: test macro-F1 {reports[name]['macro_f1']:.4f}, best val macro-F1 "
                 f"{result.best_val_macro_f1:.4f} at step {result.best_step}, {result.train_seconds:.0f} s")
        work.sync(f"{sub}/model")
        members.append(model_ref(result.output_dir, work.uri_of(f"{sub}/model"), method=strategy,
                                 stage=spec.asset_key or "classifier_model",
                                 mlflow_run_id=spec.mlflow.run_id if spec.mlflow else None,
                                 metrics={"test_macro_f1": reports[name]["macro_f1"],
                                          "val_macro_f1": result.best_val_macro_f1},
                                 params={"strategy": strategy, "max_length": length, "labels": list(labels.names)}))
        member_probs.append(probs)
        results.append(result.to_dict())
        curves[f"{name}/train_loss"] = result.train_losses
        curves[f"{name}/val_macro_f1"] = result.val_macro_f1
    ensemble = None
    if len(lengths) > 1:
        weights = validation_weights([r["best_val_macro_f1"] for r in results])
        reports["ensemble"] = evaluate_probs(combine(member_probs, weights), test, labels, name="ensemble",
                                             out_dir=work.path / "eval", samples=ev.bootstrap_samples,
                                             confidence=ev.confidence, seed=ev.seed)
        best = max(range(len(lengths)), key=lambda i: results[i]["best_val_macro_f1"])
        ensemble = {"weights": weights, "max_lengths": list(lengths), "best_member": f"member_{lengths[best]}",
                    "members": [m.to_dict() for m in members]}
    if spec.probe:
        from tuneline.classify.probe import linear_probe

        probe_probs, _ = linear_probe(train, test, seed=spec.seed)
        reports["linear_probe"] = evaluate_probs(probe_probs, test, labels, name="linear_probe",
                                                 out_dir=work.path / "eval", samples=ev.bootstrap_samples,
                                                 confidence=ev.confidence, seed=ev.seed)
        log.emit(f"linear probe: test macro-F1 {reports['linear_probe']['macro_f1']:.4f}")
    if spec.champion:
        reports["champion"] = _champion(spec, labels, test, max(lengths))
    if not _runner.is_main_process():
        return None
    details = {"strategy": strategy, "decision": decision.to_dict() if decision else {}, "train": results,
               "reports": reports, "ensemble": ensemble, "labels": list(labels.names), "champion": spec.champion}
    (work.path / REPORT).write_text(json.dumps(details, indent=1, default=float), encoding="utf-8")
    work.sync()
    main = reports["ensemble" if ensemble else "classifier"]
    metrics = {"strategy": strategy, "n_labels": len(labels), "train_examples": len(train),
               "test_accuracy": main["accuracy"], "test_macro_f1": main["macro_f1"],
               "test_macro_f1_low": main["ci"]["macro_f1"]["low"], "test_macro_f1_high": main["ci"]["macro_f1"]["high"],
               "test_ece": main["ece"], "train_seconds": sum(r["train_seconds"] for r in results),
               "global_step": sum(r["global_step"] for r in results),
               "best_val_macro_f1": max(r["best_val_macro_f1"] for r in results)}
    for key in ("linear_probe", "champion"):
        if key in reports:
            metrics[f"{key}_macro_f1"] = reports[key]["macro_f1"]
    if not ensemble:
        lat = reports["classifier"]["latency"]
        metrics.update(latency_b1_p50_ms=lat["batch_1"]["p50_ms"], throughput_b32=lat["batch_32"]["texts_per_second"])
    outcome = Outcome(model=None if ensemble else members[0], metrics=metrics, curves=curves,
                      details={**details, "report_uri": work.uri_of(REPORT),
                               "headlines": {k: headline(v) for k, v in reports.items()}})
    return _runner.finish(spec, outcome, pipes, log=log)


def _decide(spec: ClassifierSpec, train: Any, counts: dict[str, int]) -> Any:
    from tuneline import storage
    from tuneline.classify.strategy import decide
    from tuneline.monitoring.drift import texts_from_file

    if not spec.reference_uris:
        raise ValueError("classifier.strategy auto needs classifier.reference_corpus (a sample of the text the "
                         "encoder was trained on) to measure domain similarity")
    reference = [t for uri in spec.reference_uris for t in texts_from_file(storage.fetch(uri))]
    p = spec.params
    return decide(counts, train.texts, reference, large_data_per_class=p.large_data_per_class,
                  similar_distance=p.similar_distance, sample=p.reference_sample, seed=spec.seed,
                  reference=", ".join(storage.basename(u) for u in spec.reference_uris))


def _champion(spec: ClassifierSpec, labels: Any, test: Any, max_length: int) -> dict[str, Any]:
    """The registered champion on the same test split (its labels must be the candidate's)."""
    from tuneline.classify.evaluate import evaluate_model
    from tuneline.classify.model import LABELS_FILE, load_classifier
    from tuneline.classify.registry import download_classifier
    from tuneline.tracking import Tracker

    assert spec.mlflow is not None and spec.champion is not None
    path = download_classifier(Tracker(spec.mlflow.tracking_uri), spec.champion)
    model, tokenizer, known = load_classifier(path)
    info = json.loads((path / LABELS_FILE).read_text(encoding="utf-8")) if (path / LABELS_FILE).is_file() else {}
    if known.names != labels.names:
        raise ValueError(f"champion {spec.champion} knows other labels than this train split ({len(known)} vs "
                         f"{len(labels)}): the gate cannot compare them")
    rep, _ = evaluate_model(model, tokenizer, labels, test, name="champion",
                            max_length=int(info.get("max_length", max_length)),
                            samples=spec.evaluation.bootstrap_samples, confidence=spec.evaluation.confidence,
                            seed=spec.evaluation.seed)
    return rep


def main(argv: Optional[list[str]] = None) -> int:
    return _runner.run_cli(argv, spec_class=ClassifierSpec, run=run)


if __name__ == "__main__":
    sys.exit(main())
