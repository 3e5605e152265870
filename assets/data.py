"""Data stages: raw files -> prepared chat records (validated, quarantined) -> train/validation/test splits."""


import random
from pathlib import Path
from typing import Any

import dagster as dg

from assets._meta import mlflow_link, scalars
from resources.artifacts import ArtifactStore
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.data import split as splitting
from tuneline.paths import resolve, state_dir
from tuneline.records import ChatRecord, read_jsonl, read_records, sha256_file, sha256_text, write_jsonl

GROUP = "data"


def _file_entry(path: Path, role: str, **source: Any) -> dict[str, Any]:
    return {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size, "role": role, **source}


INCOMING_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def incoming_files(r) -> list[Path]:
    """Newly labelled files dropped into the recipe's incoming folder (for retraining)."""
    folder = Path(r.drift.incoming_dir) if r.drift.incoming_dir else state_dir() / "incoming"
    return sorted(p for p in folder.glob("*") if p.suffix in INCOMING_SUFFIXES and p.is_file())


@dg.asset(group_name=GROUP, kinds={"python"})
def raw_dataset(
    context: dg.AssetExecutionContext, recipe: RecipeResource, artifacts: ArtifactStore
) -> dg.Output[dict]:
    """The recipe's input files (and the generated demo data), each with its sha256."""
    from tuneline.data.demo import write_demo_data

    r = recipe.load()
    files: list[dict[str, Any]] = []
    demo_manifest = None
    if r.data.demo is not None:
        out = artifacts.stage_dir("raw_dataset", context.run.run_id) / "demo"
        demo_manifest = write_demo_data(r.data.demo, out)
        roles = {"sft.jsonl": "sft", "preference.jsonl": "preference", "corpus.txt": "corpus", "drift.jsonl": "drift"}
        for name, role in roles.items():
            files.append(_file_entry(out / name, role, format="auto", schema="auto", fields={}, task=None))
    for source in r.data.sources:
        path = resolve(source.path)
        if not path.is_file():
            raise FileNotFoundError(f"data.sources: {path} does not exist (recipe {recipe.path})")
        files.append(
            _file_entry(path, "data", format=source.format, schema=source.schema, fields=dict(source.fields),
                        task=source.task)
        )
    if recipe.retrain:
        for path in incoming_files(r):
            files.append(_file_entry(path, "incoming", format="auto", schema="auto", fields={}, task=None))
        context.log.info(f"retrain: {sum(f['role'] == 'incoming' for f in files)} incoming file(s)")
    for corpus in r.data.corpus:
        path = resolve(corpus)
        if not path.is_file():
            raise FileNotFoundError(f"data.corpus: {path} does not exist (recipe {recipe.path})")
        files.append(_file_entry(path, "corpus", format="txt", schema="text", fields={}, task=None))
    value = {
        "recipe": r.name,
        "files": files,
        "demo": demo_manifest,
        "sha256": sha256_text("\n".join(f["sha256"] for f in files)),
    }
    table = "\n".join(f"| {f['role']} | `{f['path']}` | {f['bytes']:,} | `{f['sha256'][:16]}` |" for f in files)
    return dg.Output(
        value,
        metadata={
            "files": dg.MetadataValue.md("| role | path | bytes | sha256 |\n|---|---|---:|---|\n" + table),
            "n_files": len(files),
            "sha256": value["sha256"],
            "recipe": dg.MetadataValue.json(r.to_dict()),
            **{f"{f['role']}_path": dg.MetadataValue.path(f["path"]) for f in files if f["role"] == "drift"},
        },
    )


@dg.asset(group_name=GROUP, kinds={"python"})
def prepared_dataset(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    raw_dataset: dict,
    base_model: dict,
) -> dg.Output[dict]:
    """Canonical chat records from every input file; rows failing the row rules go to quarantine."""
    from tuneline.data.ingest import read_source
    from tuneline.data.validate import validate_records
    from tuneline.models.provision import load_tokenizer
    from tuneline.params import DataSource

    r = recipe.load()
    out = artifacts.stage_dir("prepared_dataset", context.run.run_id)
    records, parse_rejections, per_file, read = [], [], [], 0
    for f in raw_dataset["files"]:
        if f["role"] not in ("sft", "preference", "data", "incoming"):
            continue
        result = read_source(
            DataSource(path=f["path"], format=f["format"], schema=f["schema"], fields=f["fields"], task=f["task"])
        )
        context.log.info(f"{f['path']}: {result.schema}, {result.read} rows, {len(result.rejected)} unreadable")
        per_file.append({"path": f["path"], "role": f["role"], "schema": result.schema, "read": result.read,
                         "parse_rejected": len(result.rejected)})
        records.extend(result.records)
        parse_rejections.extend(result.rejected)
        read += result.read
    sampled = splitting.sample_records(records, r.data.sample_fraction, r.seed)
    sampled_out = len(records) - len(sampled)
    tokenizer = load_tokenizer(base_model["path"])
    result = validate_records(
        sampled, r.validation, tokenizer=tokenizer, parse_rejections=parse_rejections,
        read=read - sampled_out, docs_dir=out / "data_docs",
    )
    write_jsonl(out / "records.jsonl", (rec.to_dict() for rec in result.accepted))
    write_jsonl(out / "quarantine.jsonl", (q.to_dict() for q in result.quarantined))
    sha = sha256_file(out / "records.jsonl")
    run_id = mlflow.start_stage_run(
        context, r, dataset_sha256=sha, params={k: v for k, v in r.flat().items() if k.startswith(("validation.", "data."))},
        upstream={"base_model": base_model["mlflow_run_id"]},
    )
    tracker = mlflow.tracker()
    counts = {"read": result.read, "accepted": len(result.accepted), "quarantined": len(result.quarantined),
              "sampled_out": sampled_out}
    tracker.log_metrics(run_id, {**counts, "quarantined_fraction": result.quarantined_fraction()})
    tracker.log_dict(run_id, {"reasons": result.reasons, "failures": result.failures, "files": per_file},
                     "validation/summary.json")
    tracker.log_artifact(run_id, out / "quarantine.jsonl", "validation")
    tracker.log_dict(run_id, {"files": raw_dataset["files"], "raw_sha256": raw_dataset["sha256"]},
                     "lineage/inputs.json")
    docs_path = getattr(result, "docs_path", None)
    if docs_path:
        tracker.log_artifact(run_id, Path(docs_path).parent, "validation/data_docs")
    tracker.end_run(run_id)
    value = {
        "records_path": str(out / "records.jsonl"),
        "quarantine_path": str(out / "quarantine.jsonl"),
        "sha256": sha,
        **counts,
        "reasons": result.reasons,
        "success": result.success,
        "failures": result.failures,
        "expectations": result.expectations,
        "docs_path": str(docs_path) if docs_path else None,
        "files": per_file,
        "mlflow_run_id": run_id,
    }
    return dg.Output(
        value,
        metadata={
            **scalars("", counts),
            "accepted_plus_quarantined_equals_read": counts["accepted"] + counts["quarantined"] == counts["read"],
            "quarantine_reasons": dg.MetadataValue.json(result.reasons),
            "files": dg.MetadataValue.json(per_file),
            "sha256": sha,
            "records_path": dg.MetadataValue.path(value["records_path"]),
            "quarantine_path": dg.MetadataValue.path(value["quarantine_path"]),
            "data_docs": dg.MetadataValue.path(str(docs_path)) if docs_path else dg.MetadataValue.text("none"),
            **mlflow_link(run_id, mlflow.tracking_uri),
        },
    )


@dg.asset_check(asset=prepared_dataset, blocking=True)
def prepared_dataset_passes_validation(prepared_dataset: dict) -> dg.AssetCheckResult:
    """The Great Expectations suite passed and quarantine stayed within the recipe's thresholds."""
    v = prepared_dataset
    balanced = v["accepted"] + v["quarantined"] == v["read"]
    failures = list(v["failures"]) + ([] if balanced else ["accepted + quarantined != read: rows were lost"])
    return dg.AssetCheckResult(
        passed=bool(v["success"]) and balanced,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(failures) or "all row rules and thresholds passed",
        metadata={
            "read": v["read"],
            "accepted": v["accepted"],
            "quarantined": v["quarantined"],
            "quarantine_reasons": dg.MetadataValue.json(v["reasons"]),
            "expectations": dg.MetadataValue.json(v["expectations"]),
            "data_docs": dg.MetadataValue.path(v["docs_path"] or "none"),
        },
    )


@dg.asset(group_name=GROUP, kinds={"python"})
def dataset_splits(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    prepared_dataset: dict,
) -> dg.Output[dict]:
    """Train/validation/test (and preference) splits by content hash and seed, leak-free by prompt."""
    r = recipe.load()
    out = artifacts.stage_dir("dataset_splits", context.run.run_id)
    result = splitting.split_records(read_records(prepared_dataset["records_path"]), r.split, r.seed)
    replay = None
    new_sources = {f["path"] for f in prepared_dataset.get("files", []) if f.get("role") == "incoming"}
    if new_sources:  # retrain: new rows plus a replay sample of the previous training data
        from tuneline.monitoring.replay import mix_with_replay

        train = result.splits["train"]
        new = [rec for rec in train if rec.source in new_sources]
        previous = [rec for rec in train if rec.source not in new_sources]
        result.splits["train"], replay = mix_with_replay(new, previous, r.drift.replay_ratio, r.seed)
        context.log.info(f"retrain: {len(new)} new train rows + {replay['replayed']} replayed "
                         f"(ratio {r.drift.replay_ratio})")
    # the drift reference: a seeded sample of the train prompts (the split is ordered by stratum, so its
    # first rows would hold one task family only)
    train_prompts = [rec.prompt_text() for rec in result.splits.get("train", [])]
    reference = random.Random(r.seed).sample(train_prompts, min(len(train_prompts), r.drift.max_samples))
    write_jsonl(out / "drift_reference.jsonl", ({"prompt": p} for p in reference))
    paths = {}
    for name, rows in result.splits.items():
        paths[name] = str(out / f"{name}.jsonl")
        write_jsonl(paths[name], (row.to_dict() for row in rows))
    hashes = result.sha256()
    counts = result.counts()
    combined = sha256_text("\n".join(f"{k}:{hashes[k]}" for k in sorted(hashes)))
    run_id = mlflow.start_stage_run(
        context, r, dataset_sha256=combined,
        params={"split.seed": r.seed, **{k: v for k, v in r.flat().items() if k.startswith("split.")}},
        upstream={"prepared_dataset": prepared_dataset["mlflow_run_id"]},
    )
    tracker = mlflow.tracker()
    for name, rows in result.splits.items():
        tracker.log_dataset(run_id, [row.to_dict() for row in rows], name=f"{r.name}-{name}", digest=hashes[name],
                            source=paths[name], context=name)
    tracker.log_metrics(run_id, {f"rows_{k}": v for k, v in counts.items()})
    tracker.end_run(run_id)
    if replay is not None:
        tracker.log_dict(run_id, replay, "lineage/replay.json")
    value = {"paths": paths, "counts": counts, "sha256": hashes, "dataset_sha256": combined, "seed": r.seed,
             "strata": result.strata, "replay": replay, "drift_reference_path": str(out / "drift_reference.jsonl"),
             "mlflow_run_id": run_id}
    return dg.Output(
        value,
        metadata={
            **scalars("rows_", counts),
            **{f"sha256_{k}": dg.MetadataValue.text(v) for k, v in hashes.items()},
            "dataset_sha256": combined,
            "strata": dg.MetadataValue.json(result.strata),
            "replay": dg.MetadataValue.json(replay or {"note": "no incoming data: no replay mixing"}),
            "drift_reference_path": dg.MetadataValue.path(value["drift_reference_path"]),
            "split_params": dg.MetadataValue.json({"seed": r.seed, **r.to_dict()["split"]}),
            **mlflow_link(run_id, mlflow.tracking_uri),
        },
    )


@dg.asset_check(asset=dataset_splits, blocking=True)
def dataset_splits_have_no_leakage(dataset_splits: dict) -> dg.AssetCheckResult:
    """No record and no normalized prompt appears on two sides (train / validation / test)."""
    splits = {name: [ChatRecord.from_dict(row) for row in read_jsonl(path)]
              for name, path in dataset_splits["paths"].items()}
    report = splitting.find_leakage(splits)
    return dg.AssetCheckResult(
        passed=report.ok,
        metadata={
            "exact_overlaps": len(report.exact),
            "normalized_overlaps": len(report.normalized),
            "examples": dg.MetadataValue.json(report.exact[:5] + report.normalized[:5]),
        },
    )
