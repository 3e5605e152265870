"""Data stages: raw files -> prepared chat records (validated, quarantined) -> train/validation/test splits."""

import dagster as dg

from assets._meta import file_table, mlflow_link, scalars
from resources.artifacts import ArtifactStore
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.refs import ModelRef, PreparedRef, RawDataRef, SplitsRef

GROUP = "data"


@dg.asset(group_name=GROUP, kinds={"python"})
def raw_dataset(context: dg.AssetExecutionContext, recipe: RecipeResource, artifacts: ArtifactStore) -> dg.Output:
    """The recipe's input files (and the generated demo data), each with its sha256. A retrain claims the newly
    labelled files of the incoming folder (moved to ``consumed/``, so no later retrain reuses them)."""
    from tuneline.data.raw import claim, collect_inputs, incoming_files, stage_inputs

    r = recipe.load()
    run_id = context.run.root_run_id or context.run.run_id
    work = artifacts.workspace("raw_dataset", run_id)
    claimed = claim(incoming_files(r), r, run_id) if recipe.retrain else []
    raw = stage_inputs(collect_inputs(r, work.path / "demo", recipe_path=recipe.path, retrain=recipe.retrain,
                                      claimed=claimed), artifacts.shared_uri("inputs"))
    context.log.info(f"{len(raw.files)} input files; claimed {len(claimed)} incoming")
    return dg.Output(raw, metadata={
        "files": file_table(raw.files), "n_files": len(raw.files), "sha256": raw.sha256,
        "incoming_claimed": len(claimed), "recipe": dg.MetadataValue.json(r.to_dict()),
        **{"drift_file": dg.MetadataValue.url(f.uri) for f in raw.by_role("drift")},
    })


@dg.asset(group_name=GROUP, kinds={"python"})
def prepared_dataset(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    raw_dataset: RawDataRef,
    base_model: ModelRef,
) -> dg.Output:
    """Canonical chat records from every input file; rows failing the row rules go to quarantine."""
    from tuneline.data.prepare import log_prepared, prepare
    from tuneline.models.provision import load_tokenizer, local_model_dir

    r = recipe.load()
    work = artifacts.workspace("prepared_dataset", context.run.run_id)
    prepared = prepare(raw_dataset, r, load_tokenizer(local_model_dir(base_model)), work.path)
    work.sync()
    v = prepared.validation
    run_id = mlflow.start_stage_run(context, r, dataset_sha256=raw_dataset.sha256,
                                    params=r.flat_section("validation", "data"),
                                    upstream={"base_model": base_model.mlflow_run_id})
    content = log_prepared(mlflow.tracker(), run_id, prepared, raw_dataset)
    mlflow.tracker().end_run(run_id)
    ref = PreparedRef(
        records_uri=work.uri_of(prepared.records_path), quarantine_uri=work.uri_of(prepared.quarantine_path),
        sha256=content["records"]["sha256"], quarantine_sha256=content["quarantine"]["sha256"],
        **prepared.counts(), reasons=v.reasons, success=v.success, failures=tuple(v.failures),
        expectations=tuple(v.expectations), files=tuple(prepared.files), mlflow_run_id=run_id,
        docs_uri=work.uri_of(v.docs_path) if v.docs_path else None,
    )
    return dg.Output(ref, metadata={
        **scalars("", prepared.counts()), "accepted_plus_quarantined_equals_read": ref.balanced,
        "quarantine_reasons": dg.MetadataValue.json(v.reasons), "sha256": ref.sha256,
        "files": dg.MetadataValue.json([f.to_dict() for f in prepared.files]),
        "records": dg.MetadataValue.url(ref.records_uri), "quarantine": dg.MetadataValue.url(ref.quarantine_uri),
        "data_docs": dg.MetadataValue.url(ref.docs_uri or "none"), **mlflow_link(run_id, mlflow.tracking_uri),
    })


@dg.asset_check(asset=prepared_dataset, blocking=True)
def prepared_dataset_passes_validation(prepared_dataset: PreparedRef) -> dg.AssetCheckResult:
    """The Great Expectations suite passed and quarantine stayed within the recipe's thresholds."""
    v = prepared_dataset
    failures = list(v.failures) + ([] if v.balanced else ["accepted + quarantined != read: rows were lost"])
    return dg.AssetCheckResult(
        passed=v.success and v.balanced,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(failures) or "all row rules and thresholds passed",
        metadata={"read": v.read, "accepted": v.accepted, "quarantined": v.quarantined,
                  "quarantine_reasons": dg.MetadataValue.json(v.reasons),
                  "expectations": dg.MetadataValue.json(list(v.expectations)),
                  "data_docs": dg.MetadataValue.url(v.docs_uri or "none")},
    )


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
