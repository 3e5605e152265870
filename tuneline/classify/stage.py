"""What the classification assets ask for, kept out of the Dagster wiring: the trainer specs from a recipe and
the splits, and the typed references built from a trainer's outcome (the gate decided here, from the report's
per-example predictions), and the registration of a classifier the gate let through."""

from __future__ import annotations

import json
from typing import Any, Optional

from tuneline.params import Recipe
from tuneline.refs import ClassifierEnsembleRef, ClassifierRef, ModelRef, RegisteredRef, SplitsRef, TemplateArmRef
from tuneline.specs import ClassifierSpec, Outcome, TemplateSpec


def _params(recipe: Recipe) -> Any:
    if recipe.classifier is None:
        raise ValueError(f"recipe {recipe.name} has no classifier section: the classification assets need one")
    return recipe.classifier


def classifier_spec(recipe: Recipe, splits: SplitsRef, out_uri: str, *, strategy: Optional[str] = None,
                    max_lengths: tuple[int, ...] = (), champion: Optional[str] = None,
                    reference_uris: tuple[str, ...] = ()) -> ClassifierSpec:
    params = _params(recipe)
    return ClassifierSpec(out_uri=out_uri, seed=recipe.seed, max_steps=recipe.max_steps, encoder=params.encoder,
                          train_uri=splits.uri("train"), val_uri=splits.uri("validation"), test_uri=splits.uri("test"),
                          params=params, evaluation=recipe.evaluation, strategy=strategy, max_lengths=max_lengths,
                          reference_uris=reference_uris, probe=not max_lengths, champion=champion)


def template_spec(recipe: Recipe, splits: SplitsRef, base: ModelRef, out_uri: str) -> TemplateSpec:
    return TemplateSpec(out_uri=out_uri, seed=recipe.seed, base=base, train_uri=splits.uri("train"),
                        test_uri=splits.uri("test"), params=_params(recipe), evaluation=recipe.evaluation)


def _report(outcome: Outcome) -> dict[str, Any]:
    from tuneline import storage

    return json.loads(storage.read_text(outcome.details["report_uri"]))


def classifier_ref(outcome: Outcome, recipe: Recipe, *, run_id: str, champion_version: Optional[int]) -> ClassifierRef:
    """The classifier's reference with the gate's decision: test macro-F1 against the champion (paired
    bootstrap on the same test rows) and the linear probe's floor."""
    from tuneline.evaluate.gate import classifier_promotion

    report = _report(outcome)
    reports = report["reports"]
    candidate = reports["classifier"]
    assert outcome.model is not None
    gate = classifier_promotion(candidate["y_true"], candidate, recipe.gate, k=len(report["labels"]), seed=recipe.seed,
                                champion=reports.get("champion"), floor=reports.get("linear_probe"),
                                champion_version=champion_version, stage=outcome.model.stage)
    heads = outcome.details["headlines"]
    return ClassifierRef(model=outcome.model, labels=tuple(report["labels"]), strategy=report["strategy"],
                         decision=report["decision"], test=heads["classifier"], gate=gate,
                         report_uri=outcome.details["report_uri"], mlflow_run_id=run_id,
                         probe=heads.get("linear_probe"), champion=heads.get("champion"))


def ensemble_ref(outcome: Outcome, *, run_id: str) -> ClassifierEnsembleRef:
    ens, heads = outcome.details["ensemble"], outcome.details["headlines"]
    return ClassifierEnsembleRef(members=tuple(ModelRef.from_dict(m) for m in ens["members"]),
                                 max_lengths=tuple(ens["max_lengths"]), weights=tuple(ens["weights"]),
                                 test=heads["ensemble"], best_member=heads[ens["best_member"]],
                                 report_uri=outcome.details["report_uri"], mlflow_run_id=run_id)


def template_ref(outcome: Outcome, base: ModelRef, *, run_id: str) -> TemplateArmRef:
    return TemplateArmRef(base=base, results=outcome.details["headlines"], report_uri=outcome.details["report_uri"],
                          mlflow_run_id=run_id)


def comparison_table(refs: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of test figures (name -> headline)."""
    rows = ["| model | accuracy | macro-F1 [95% CI] | ECE |", "|---|---:|---:|---:|"]
    for name, h in refs.items():
        ci = h["ci"]["macro_f1"]
        rows.append(f"| {name} | {h['accuracy']:.3f} | {h['macro_f1']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] | "
                    f"{h['ece']:.3f} |")
    return "\n".join(rows)


def publish_classifier(tracker: Any, recipe: Recipe, ref: ClassifierRef, *, run_id: str) -> RegisteredRef:
    """Register the classifier the gate passed (alias ``challenger``) and move ``champion`` to it by
    compare-and-set against the champion the gate compared with; a refusal registers nothing."""
    from tuneline import storage
    from tuneline.classify.registry import register_classifier
    from tuneline.deploy.registry import ChampionMoved, promote

    name = recipe.registered_model_name()
    if not ref.gate.passed:
        return RegisteredRef(decision="refused", name=name, reason="; ".join(ref.gate.reasons), mlflow_run_id=run_id,
                             champion_version=ref.gate.champion_version)
    info = register_classifier(tracker, name, storage.fetch(ref.model.uri), run_id=run_id, tags={
        "tuneline.source_stage_run": ref.model.mlflow_run_id, "tuneline.strategy": ref.strategy,
        "tuneline.test_macro_f1": round(ref.test["macro_f1"], 4)})
    try:
        moved = promote(tracker, name, info["version"], expected=ref.gate.champion_version)
    except ChampionMoved as exc:
        return RegisteredRef(decision="refused", name=name, reason=str(exc), version=info["version"],
                             model_uri=info["model_uri"], weights_sha256=info["weights_sha256"], mlflow_run_id=run_id)
    return RegisteredRef(decision="registered", name=name, version=info["version"], model_uri=info["model_uri"],
                         weights_sha256=info["weights_sha256"], champion_previous_version=moved["previous_version"],
                         champion_version=moved["version"], mlflow_run_id=run_id)
