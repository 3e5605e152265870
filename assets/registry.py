"""Deployment: register the candidate the promotion gate accepted and move the aliases; a refusal is a result."""

import dagster as dg

from assets._meta import mlflow_link
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.refs import EvaluationRef, SplitsRef


@dg.asset(group_name="deployment", kinds={"mlflow"})
def registered_model(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    mlflow: MlflowResource,
    evaluation_report: EvaluationRef,
    dataset_splits: SplitsRef,
) -> dg.Output:
    """The gate's candidate in the MLflow Model Registry: alias ``challenger`` on the new version, ``champion``
    moved to it (compare-and-set: refused if the champion moved since the gate compared against it), with
    its lineage passport, its model card and its drift reference (the prompts and tokenizer the drift sensor
    tests its traffic against). When the gate refused the candidate, nothing is registered, the
    champion stays, and the materialization says ``refused`` and why: a refusal is a decision, not an error."""
    from tuneline.deploy.publish import publish_candidate

    r = recipe.load()
    gate = evaluation_report.gate
    run_id = mlflow.start_stage_run(
        context, r, params={"candidate": gate.candidate, "candidate_stage": gate.candidate_stage,
                            "decision": "registered" if gate.passed else "refused"},
        upstream={"evaluation_report": evaluation_report.mlflow_run_id,
                  gate.candidate_stage: evaluation_report.candidate.mlflow_run_id},
    )
    ref, card = publish_candidate(mlflow.tracker(), r, evaluation_report, run_id=run_id,
                                  drift_reference_uri=dataset_splits.drift_reference_uri)
    context.log.info(f"{ref.name}: {ref.decision}" + (f" version {ref.version}" if ref.version else f" ({ref.reason})"))
    return dg.Output(ref, metadata={
        "decision": ref.decision, "reason": ref.reason or "passed the gate", "registered_model": ref.name,
        "version": ref.version or 0, "champion_version": ref.champion_version or 0,
        "previous_champion": ref.champion_previous_version or 0, "model_uri": ref.model_uri or "none",
        "weights_sha256": ref.weights_sha256 or "", "base_weights_sha256": ref.base_weights_sha256 or "none",
        "broken_links": ref.broken_links,
        "model_card": dg.MetadataValue.md(card or f"refused: {ref.reason}"),
        **mlflow_link(run_id, mlflow.tracking_uri),
    })
