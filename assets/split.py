"""Splits: train/validation/test (and preference) by content hash and seed, leak-free by prompt (blocking check)."""

import dagster as dg

from assets._meta import mlflow_link, scalars
from resources.artifacts import ArtifactStore
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.refs import PreparedRef, SplitsRef

GROUP = "data"


@dg.asset(group_name=GROUP, kinds={"python"})
def dataset_splits(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    prepared_dataset: PreparedRef,
) -> dg.Output:
    """Train/validation/test (and preference) splits by content hash and seed, leak-free by prompt; on a
    retrain, the new rows plus a replay sample of the previous training data."""
    from tuneline.data.split import log_splits, plan_splits, write_splits

    r = recipe.load()
    work = artifacts.workspace("dataset_splits", context.run.run_id)
    new_sources = {f.uri for f in prepared_dataset.files if f.role == "incoming"}
    plan = plan_splits(prepared_dataset.read_records(), r.split, r.seed, new_sources=new_sources,
                       replay_ratio=r.drift.replay_ratio, reference_size=r.drift.max_samples)
    files = write_splits(plan, work.path)
    work.sync()
    run_id = mlflow.start_stage_run(context, r, dataset_sha256=plan.dataset_sha256(),
                                    params={"split.seed": r.seed, **r.flat_section("split")},
                                    upstream={"prepared_dataset": prepared_dataset.mlflow_run_id})
    log_splits(mlflow.tracker(), run_id, plan, files, recipe_name=r.name)
    ref = SplitsRef(uris={n: work.uri_of(p) for n, p in files.splits.items()}, counts=plan.result.counts(),
                    sha256=plan.result.sha256(), dataset_sha256=plan.dataset_sha256(), seed=r.seed,
                    membership_uri=work.uri_of(files.membership), drift_reference_uri=work.uri_of(files.reference),
                    mlflow_run_id=run_id, strata=plan.result.strata, replay=plan.replay)
    return dg.Output(ref, metadata={
        **scalars("rows_", ref.counts), **{f"sha256_{k}": dg.MetadataValue.text(v) for k, v in ref.sha256.items()},
        "dataset_sha256": ref.dataset_sha256, "strata": dg.MetadataValue.json(ref.strata),
        "replay": dg.MetadataValue.json(ref.replay or {"note": "no incoming data: no replay mixing"}),
        "drift_reference": dg.MetadataValue.url(ref.drift_reference_uri),
        "split_params": dg.MetadataValue.json({"seed": r.seed, **r.to_dict()["split"]}),
        **mlflow_link(run_id, mlflow.tracking_uri),
    })


@dg.asset_check(asset=dataset_splits, blocking=True)
def dataset_splits_have_no_leakage(dataset_splits: SplitsRef) -> dg.AssetCheckResult:
    """No record and no normalized prompt appears on two sides (train / validation / test)."""
    from tuneline.data.split import find_leakage, read_splits

    report = find_leakage(read_splits(dataset_splits))
    return dg.AssetCheckResult(
        passed=report.ok,
        metadata={"exact_overlaps": len(report.exact), "normalized_overlaps": len(report.normalized),
                  "examples": dg.MetadataValue.json(report.exact[:5] + report.normalized[:5])},
    )
