"""Classification: a sequence classifier on a pretrained encoder (the recipe's strategy, ``auto`` decided from the
data), its short/mid/long ensemble, the prompt-template arm on the base causal LM, and the registered classifier
the macro-F1 gate let through. Each trains or scores out of process through the launcher."""

import dagster as dg

from assets._meta import image, mlflow_link
from assets._stage import RETRY, finish_stage, launch_stage, stage_uri
from resources.artifacts import ArtifactStore
from resources.launcher import TrainingLauncher
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.refs import ClassifierRef, ModelRef, RawDataRef, SplitsRef

GROUP = "classification"


@dg.asset(group_name=GROUP, kinds={"pytorch"}, retry_policy=RETRY)
def classifier_model(context: dg.AssetExecutionContext, recipe: RecipeResource, artifacts: ArtifactStore,
                     mlflow: MlflowResource, launcher: TrainingLauncher, raw_dataset: RawDataRef,
                     dataset_splits: SplitsRef) -> dg.Output:
    """The encoder with a classification head, trained with the recipe's strategy (``auto``: the matrix from the
    examples per class and the MiniLM distance to the reference sample, recorded with its evidence); evaluated on
    the test split beside the linear probe and the champion; the macro-F1 gate's decision."""
    from tuneline.classify.stage import classifier_ref, classifier_spec, comparison_table
    from tuneline.deploy.registry import current_champion

    r = recipe.load()
    champion = current_champion(mlflow.tracker(), r.registered_model_name())
    if champion and champion["tags"].get("tuneline.model_kind") != "classifier":
        champion = None
    spec = classifier_spec(r, dataset_splits, stage_uri(artifacts, "classifier_model", context),
                           champion=champion["model_uri"] if champion else None,
                           reference_uris=tuple(f.uri for f in raw_dataset.by_role("reference")))
    outcome, run_id = launch_stage(context, recipe=r, mlflow=mlflow, launcher=launcher, spec=spec,
                                   params=r.flat_section("classifier", "seed", "max_steps"),
                                   dataset_sha256=dataset_splits.dataset_sha256,
                                   upstream={"dataset_splits": dataset_splits.mlflow_run_id})
    metadata = finish_stage(mlflow, run_id, outcome, title="Classifier training", resolved_params=r.classifier)
    ref = classifier_ref(outcome, r, run_id=run_id, champion_version=champion["version"] if champion else None)
    plots = outcome.details["headlines"]["classifier"]["plots"]
    return dg.Output(ref, metadata={**metadata, "strategy_decision": dg.MetadataValue.json(ref.decision or {
        "strategy": ref.strategy, "note": "named by the recipe"}), "gate": ref.gate.summary(),
        "test_table": dg.MetadataValue.md(comparison_table({k: v for k, v in (("classifier", ref.test),
                                          ("linear_probe", ref.probe), ("champion", ref.champion)) if v})),
        "confusion": image(plots["confusion"], "confusion"), "reliability": image(plots["reliability"], "reliability")})


@dg.asset(group_name=GROUP, kinds={"pytorch"}, retry_policy=RETRY)
def classifier_ensemble(context: dg.AssetExecutionContext, recipe: RecipeResource, artifacts: ArtifactStore,
                        mlflow: MlflowResource, launcher: TrainingLauncher, dataset_splits: SplitsRef,
                        classifier_model: ClassifierRef) -> dg.Output:
    """Members at the recipe's short/mid/long maximum lengths (the strategy ``classifier_model`` used),
    probabilities averaged with validation weights; reported against the best single member."""
    from tuneline.classify.stage import classifier_spec, comparison_table, ensemble_ref

    r = recipe.load()
    spec = classifier_spec(r, dataset_splits, stage_uri(artifacts, "classifier_ensemble", context),
                           strategy=classifier_model.strategy, max_lengths=tuple(r.classifier.ensemble_max_lengths))
    outcome, run_id = launch_stage(context, recipe=r, mlflow=mlflow, launcher=launcher, spec=spec,
                                   params={"strategy": classifier_model.strategy, **r.flat_section("classifier")},
                                   dataset_sha256=dataset_splits.dataset_sha256,
                                   upstream={"classifier_model": classifier_model.mlflow_run_id})
    metadata = finish_stage(mlflow, run_id, outcome, title="Ensemble members")
    ref = ensemble_ref(outcome, run_id=run_id)
    table = comparison_table({"ensemble": ref.test, f"best member ({ref.best_member['name']})": ref.best_member})
    return dg.Output(ref, metadata={**metadata, "comparison": dg.MetadataValue.md(table),
                                    "weights": dg.MetadataValue.json(dict(zip(map(str, ref.max_lengths), ref.weights)))})


@dg.asset(group_name=GROUP, kinds={"pytorch"}, retry_policy=RETRY)
def classifier_template(context: dg.AssetExecutionContext, recipe: RecipeResource, artifacts: ArtifactStore,
                        mlflow: MlflowResource, launcher: TrainingLauncher, dataset_splits: SplitsRef,
                        base_model: ModelRef) -> dg.Output:
    """The prompt-template arm: the base causal LM scores each label name under the recipe's template,
    zero- and few-shot, on the same test split with the same metrics."""
    from tuneline.classify.stage import comparison_table, template_ref, template_spec

    r = recipe.load()
    spec = template_spec(r, dataset_splits, base_model, stage_uri(artifacts, "classifier_template", context))
    outcome, run_id = launch_stage(context, recipe=r, mlflow=mlflow, launcher=launcher, spec=spec,
                                   params=r.flat_section("classifier"), dataset_sha256=dataset_splits.dataset_sha256,
                                   upstream={"dataset_splits": dataset_splits.mlflow_run_id,
                                             "base_model": base_model.mlflow_run_id})
    metadata = finish_stage(mlflow, run_id, outcome, title="Template arm")
    ref = template_ref(outcome, base_model, run_id=run_id)
    return dg.Output(ref, metadata={**metadata, "comparison": dg.MetadataValue.md(comparison_table(ref.results))})


@dg.asset(group_name=GROUP, kinds={"mlflow"})
def registered_classifier(context: dg.AssetExecutionContext, recipe: RecipeResource, mlflow: MlflowResource,
                          classifier_model: ClassifierRef) -> dg.Output:
    """The classifier in the MLflow Model Registry (transformers flavor) when the macro-F1 gate passed it:
    ``challenger`` on the new version, ``champion`` moved by compare-and-set. A refusal is a result."""
    from tuneline.classify.stage import publish_classifier

    r = recipe.load()
    gate = classifier_model.gate
    run_id = mlflow.start_stage_run(context, r, params={"decision": "registered" if gate.passed else "refused"},
                                    upstream={"classifier_model": classifier_model.mlflow_run_id})
    ref = publish_classifier(mlflow.tracker(), r, classifier_model, run_id=run_id)
    mlflow.tracker().end_run(run_id)
    context.log.info(f"{ref.name}: {ref.decision} {ref.version or ref.reason}")
    return dg.Output(ref, metadata={"decision": ref.decision, "reason": ref.reason or gate.summary(),
                                    "version": ref.version or 0, "champion_version": ref.champion_version or 0,
                                    "model_uri": ref.model_uri or "none", **mlflow_link(run_id, mlflow.tracking_uri)})
