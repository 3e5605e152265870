"""Prepared data: canonical chat records from every input file, validated by Great Expectations (blocking);
rows failing the row rules are quarantined with their reason."""

import dagster as dg

from assets._meta import mlflow_link, scalars
from resources.artifacts import ArtifactStore
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.refs import ModelRef, PreparedRef, RawDataRef

GROUP = "data"


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
    from tuneline.models.loading import load_tokenizer, local_model_dir

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
