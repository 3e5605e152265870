"""Deployment: register the candidate that passed the promotion gate and move the aliases."""

import json
from pathlib import Path

import dagster as dg

from assets._meta import mlflow_link
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource


@dg.asset(group_name="deployment", kinds={"mlflow"})
def registered_model(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    mlflow: MlflowResource,
    evaluation_report: dict,
    dpo_adapter: dict,
    distilled_student: dict,
) -> dg.Output[dict]:
    """The gate's candidate as full weights (adapters merged, merged-vs-unmerged logits checked) in the
    MLflow Model Registry: alias ``challenger`` on the new version, ``champion`` moved to it. Runs only
    when ``candidate_passes_promotion_gate`` passed (a blocking check); stores the lineage passport."""
    from tuneline.deploy.lineage import build_passport, passport_markdown
    from tuneline.deploy.registry import promote, register_model

    r = recipe.load()
    gate = evaluation_report["gate"]
    if not gate["passed"]:  # the blocking check stops this asset first; never register a losing candidate
        raise dg.Failure(f"promotion gate did not pass: {gate['reasons']}")
    stage = gate["candidate_stage"]
    source = dpo_adapter if stage == "dpo_adapter" else distilled_student
    model_dir = Path(source["merged_model_dir"] if stage == "dpo_adapter" else source["output_dir"])
    merge_file = model_dir / "merge.json"
    merge_check = json.loads(merge_file.read_text()) if merge_file.is_file() else {"merged": False,
                                                                                     "note": "full weights"}
    name = r.registered_model_name()
    run_id = mlflow.start_stage_run(
        context, r, params={"candidate": gate["candidate"], "candidate_stage": stage, "model_dir": str(model_dir)},
        upstream={"evaluation_report": evaluation_report["mlflow_run_id"], stage: source["mlflow_run_id"]},
    )
    tracker = mlflow.tracker()
    tracker.log_dict(run_id, merge_check, "merge_check.json")
    registered = register_model(tracker, name, model_dir, run_id=run_id, passport_md=None,
                                tags={"tuneline.candidate_stage": stage, "tuneline.gate.passed": True},
                                aliases=("challenger",))
    moved = promote(tracker, name, registered["version"])
    context.log.info(f"registered {name} version {registered['version']}; champion: "
                     f"{moved['previous_version']} -> {moved['version']}")
    tracker.end_run(run_id)
    passport = build_passport(tracker, f"{name}/{registered['version']}")
    markdown = passport_markdown(passport)
    tracker.client().log_text(run_id, markdown, "passport.md")
    tracker.log_dict(run_id, passport, "passport.json")
    value = {**registered, "champion_previous_version": moved["previous_version"], "mlflow_run_id": run_id,
             "broken_links": passport["broken_links"], "model_dir": str(model_dir)}
    return dg.Output(value, metadata={
        "registered_model": name,
        "version": int(registered["version"]),
        "aliases": dg.MetadataValue.json(["challenger", "champion"]),
        "previous_champion": moved["previous_version"] or 0,
        "model_uri": registered["model_uri"],
        "weights_sha256": registered.get("weights_sha256") or "",
        "merge_check": dg.MetadataValue.json(merge_check),
        "passport": dg.MetadataValue.md(markdown),
        "broken_links": len(passport["broken_links"]),
        **mlflow_link(run_id, mlflow.tracking_uri),
    })
