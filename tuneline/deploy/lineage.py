"""The lineage passport: the whole chain behind a registered model version.

Starting from the version's source run (the ``registered_model`` stage), the walk follows the
``tuneline.upstream.<stage>`` tags every stage run carries, back to the data files. Every link is
checked: a run that no longer exists, a data file that is gone or whose sha256 changed, an artifact
that cannot be read. A broken link is reported, never skipped.

The records a model was trained on, the split membership (record ids per split) and the quarantine are
logged by their stages as content-addressed MLflow artifacts (``content/<sha256>/<file>``, indexed in each
run's ``lineage/content.json``); the passport names them by sha256, and :func:`verify_passport`
re-downloads every one of them from the tracking server and re-hashes it, so an auditor on another machine
that reaches the server can check the whole chain.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from tuneline.data.prepare import INPUTS_ARTIFACT
from tuneline.data.split import REPLAY_ARTIFACT
from tuneline.deploy.registry import get_version, parse_model_ref
from tuneline.records import sha256_file
from tuneline.tracking import (
    CONTENT_ARTIFACT,
    TAG_ASSET,
    TAG_DAGSTER_RUN,
    TAG_DATASET,
    TAG_GIT,
    TAG_PARENT_PREFIX,
    Tracker,
)

GATE_ARTIFACT = "evaluation/gate.json"  # logged by evaluation_report: the promotion decision and evidence
MODEL_ARTIFACT = "lineage/model.json"  # logged by every stage that makes a model: its ModelRef
SPEC_ARTIFACT = "lineage/spec.json"  # logged by every launched stage: the trainer spec it ran (what reproduce re-runs)
TAG_STARTED_FROM = "tuneline.started_from"  # on a retrain's base_model run: the champion it continued from


def _time(ms: Optional[int]) -> Optional[str]:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds") if ms else None


def _artifact_json(tracker: Tracker, run_id: str, path: str) -> Any:
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                tracking_uri=tracker.tracking_uri)
    return json.loads(Path(local).read_text(encoding="utf-8"))


def walk_runs(tracker: Tracker, stage: str, run_id: str, broken: list[dict]) -> dict[str, dict[str, Any]]:
    """stage -> run summary for ``run_id`` and every run upstream of it."""
    client = tracker.client()
    found: dict[str, dict[str, Any]] = {}
    queue = [(stage, run_id, None)]
    while queue:
        name, rid, child = queue.pop(0)
        if name in found:
            continue
        try:
            run = client.get_run(rid)
        except Exception as exc:  # noqa: BLE001 - any failure to fetch is a broken link
            broken.append({"link": f"{child or 'model version'} -> {name} run {rid}",
                           "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
            continue
        tags = run.data.tags
        found[name] = {
            "run_id": rid,
            "status": run.info.status,
            "dagster_run_id": tags.get(TAG_DAGSTER_RUN),
            "git_sha": tags.get(TAG_GIT),
            "dataset_sha256": tags.get(TAG_DATASET),
            "started": _time(run.info.start_time),
            "ended": _time(run.info.end_time),
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "upstream": {k[len(TAG_PARENT_PREFIX):]: v for k, v in tags.items() if k.startswith(TAG_PARENT_PREFIX)},
            "asset": tags.get(TAG_ASSET),
            "started_from": tags.get(TAG_STARTED_FROM),
        }
        if run.info.status != "FINISHED":
            broken.append({"link": f"{name} run {rid}", "error": f"run status is {run.info.status}"})
        for up_stage, up_id in found[name]["upstream"].items():
            queue.append((up_stage, up_id, name))
    return found


def check_files(files: list[dict[str, Any]], broken: list[dict]) -> list[dict[str, Any]]:
    """Each input file's status: ok, missing or changed (fetched from its URI, re-hashed)."""
    from tuneline import storage

    out = []
    for f in files:
        uri = f.get("uri") or storage.to_uri(f["path"])
        entry = {"uri": uri, "sha256": f["sha256"], "role": f.get("role"), "licence": f.get("licence")}
        try:
            actual = sha256_file(storage.fetch(uri))
        except OSError:
            broken.append({"link": f"data file {storage.redact(uri)}", "error": "file not found"})
            entry["status"] = "missing"
        else:
            if actual != f["sha256"]:
                broken.append({"link": f"data file {storage.redact(uri)}", "error": "sha256 differs from the one recorded"})
            entry["status"] = "ok" if actual == f["sha256"] else "changed"
        out.append(entry)
    return out


def _stage_content(tracker: Tracker, runs: dict[str, dict[str, Any]], broken: list[dict]) -> dict[str, Any]:
    """stage -> {name: {artifact, sha256, run_id}}: the content-addressed files each stage run logged."""
    content: dict[str, Any] = {}
    for stage, run in runs.items():
        if not _has_artifact(tracker, run["run_id"], CONTENT_ARTIFACT):
            continue
        try:
            content[stage] = _artifact_json(tracker, run["run_id"], CONTENT_ARTIFACT)
        except Exception as exc:  # noqa: BLE001 - an unreadable index is a broken link
            broken.append({"link": f"{stage} -> {CONTENT_ARTIFACT}", "error": str(exc)[:200]})
    return content


def _stage_artifacts(tracker: Tracker, runs: dict[str, dict[str, Any]], path: str) -> dict[str, Any]:
    """stage -> the JSON artifact ``path`` its run logged (the ModelRef, the trainer spec), where it has one."""
    return {stage: _artifact_json(tracker, run["run_id"], path) for stage, run in runs.items()
            if _has_artifact(tracker, run["run_id"], path)}


def _has_artifact(tracker: Tracker, run_id: str, path: str) -> bool:
    folder = path.rsplit("/", 1)[0] if "/" in path else None
    return any(a.path == path for a in tracker.client().list_artifacts(run_id, folder))


def verify_passport(tracker: Tracker, passport: dict[str, Any]) -> list[dict[str, str]]:
    """Re-download every content-addressed artifact the passport names and re-hash it; also re-fetch the
    registered weights and check them against the version's sha256. Returns the broken links (empty: all
    verified)."""
    import tempfile

    import mlflow.artifacts

    from tuneline.deploy.registry import RegistryError, download_version, get_version

    broken: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="tuneline-verify-") as tmp:
        for stage, files in passport.get("content", {}).items():
            for name, entry in files.items():
                link = f"{stage} {name} content/{entry['sha256'][:12]}"
                try:
                    local = mlflow.artifacts.download_artifacts(
                        run_id=entry["run_id"], artifact_path=entry["artifact"], dst_path=tmp,
                        tracking_uri=tracker.tracking_uri)
                except Exception as exc:  # noqa: BLE001 - any failure to fetch is a broken link
                    broken.append({"link": link, "error": f"cannot download: {str(exc).splitlines()[0][:200]}"})
                    continue
                if sha256_file(local) != entry["sha256"]:
                    broken.append({"link": link, "error": "sha256 of the downloaded artifact differs"})
        try:
            download_version(tracker, get_version(tracker, passport["model"], passport["version"]),
                             cache_dir=Path(tmp) / "registry")
        except (RegistryError, OSError) as exc:
            broken.append({"link": f"registered weights {passport['model_uri']}", "error": str(exc)[:300]})
    return broken


def build_passport(tracker: Tracker, ref: str) -> dict[str, Any]:
    """The passport of ``NAME@ALIAS`` or ``NAME/VERSION`` as a JSON-able dict (``broken_links`` may be empty)."""
    name, alias, version = parse_model_ref(ref)
    info = get_version(tracker, name, alias if alias is not None else version)
    broken: list[dict] = []
    source_run = info.get("tags", {}).get("tuneline.source_run_id") or info.get("run_id")
    runs = walk_runs(tracker, "registered_model", source_run, broken) if source_run else {}
    if not source_run:
        broken.append({"link": "model version -> source run", "error": "the version names no source run"})

    data: list[dict[str, Any]] = []
    if "prepared_dataset" in runs:
        try:
            data = check_files(_artifact_json(tracker, runs["prepared_dataset"]["run_id"], INPUTS_ARTIFACT)["files"],
                               broken)
        except Exception as exc:  # noqa: BLE001
            broken.append({"link": f"prepared_dataset -> {INPUTS_ARTIFACT}", "error": str(exc)[:200]})
    else:
        broken.append({"link": "chain -> prepared_dataset", "error": "no prepared_dataset run upstream"})

    gate: dict[str, Any] = {}
    if "evaluation_report" in runs:
        try:
            gate = _artifact_json(tracker, runs["evaluation_report"]["run_id"], GATE_ARTIFACT)
        except Exception as exc:  # noqa: BLE001
            broken.append({"link": f"evaluation_report -> {GATE_ARTIFACT}", "error": str(exc)[:200]})
    for stage in ("base_model", "dataset_splits", "sft_adapter", "evaluation_report"):
        if stage not in runs and not any(b["link"].endswith(f"-> {stage} run") for b in broken):
            if not any(stage in b["link"] for b in broken):
                broken.append({"link": f"chain -> {stage}", "error": f"no {stage} run upstream"})

    def stage(name: str) -> dict[str, Any]:
        return runs.get(name, {})

    splits = stage("dataset_splits")
    replay = None  # only a retrain mixes new rows with replayed ones
    if splits and _has_artifact(tracker, splits["run_id"], REPLAY_ARTIFACT):
        replay = _artifact_json(tracker, splits["run_id"], REPLAY_ARTIFACT)
    content = _stage_content(tracker, runs, broken)
    prepared = stage("prepared_dataset")
    hpo = stage("hpo_study")
    shas = {r["git_sha"] for r in runs.values() if r.get("git_sha")}
    return {
        "model": name,
        "version": int(info["version"]),
        "aliases": info.get("aliases", []),
        "model_uri": f"models:/{name}/{info['version']}",
        "data": data,
        "content": content,
        "models": _stage_artifacts(tracker, runs, MODEL_ARTIFACT),
        "specs": _stage_artifacts(tracker, runs, SPEC_ARTIFACT),
        "recipe": _recipe(tracker, runs),
        "validation": {k: prepared.get("metrics", {}).get(k) for k in ("read", "accepted", "quarantined",
                                                                         "quarantined_fraction")},
        "splits": {"dataset_sha256": splits.get("dataset_sha256"),
                   "rows": {k[5:]: v for k, v in splits.get("metrics", {}).items() if k.startswith("rows_")},
                   "replay": replay},
        "search": {"best_value": hpo.get("metrics", {}).get("best_value"),
                   "best_params": {k[5:]: v for k, v in hpo.get("params", {}).items() if k.startswith("best.")}},
        "started_from": stage("base_model").get("started_from"),
        "runs": {name_: r["run_id"] for name_, r in runs.items()},
        "stages": {name_: {k: r[k] for k in ("run_id", "dagster_run_id", "started", "ended", "status", "params",
                                            "metrics")} for name_, r in runs.items()},
        "evaluation": stage("evaluation_report").get("metrics", {}),
        "gate": gate,
        "git_sha": sorted(shas)[0] if len(shas) == 1 else sorted(shas),
        "dagster_run_ids": sorted({r["dagster_run_id"] for r in runs.values() if r.get("dagster_run_id")}),
        "broken_links": broken,
    }


def _recipe(tracker: Tracker, runs: dict[str, dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The recipe the chain ran with (every launched stage logs it as ``recipe.json``)."""
    for stage in ("sft_adapter", "base_model", "evaluation_report"):
        if stage in runs and _has_artifact(tracker, runs[stage]["run_id"], "recipe.json"):
            return _artifact_json(tracker, runs[stage]["run_id"], "recipe.json")
    return None


def passport_markdown(p: dict[str, Any]) -> str:
    """A readable rendering of the passport (stored with the model version)."""
    lines = [f"# Lineage passport: {p['model']} version {p['version']}", ""]
    lines += [f"- aliases: {', '.join(p['aliases']) or 'none'}", f"- code: git {p['git_sha']}",
              f"- Dagster runs: {', '.join(p['dagster_run_ids'])}", ""]
    lines += ["## Data", "", "| role | uri | sha256 | licence | status |", "|---|---|---|---|---|"]
    lines += [f"| {d.get('role')} | `{d['uri']}` | `{d['sha256'][:16]}` | {d.get('licence') or '-'} | {d.get('status')} |"
              for d in p["data"]]
    lines += ["", "## Content-addressed artifacts (re-checked by `tuneline lineage --verify`)", "",
              "| stage | file | sha256 | MLflow run |", "|---|---|---|---|"]
    lines += [f"| {stage} | {name} | `{e['sha256']}` | `{e['run_id']}` |"
              for stage, files in p.get("content", {}).items() for name, e in files.items()]
    if p.get("started_from"):
        lines += [f"Started from: {p['started_from']} (a retrain continues from the champion)", ""]
    replay = p["splits"].get("replay")
    if replay:
        lines += ["", f"Retrain: {replay['new']} new train rows + {replay['replayed']} replayed from the previous "
                      f"training data (ratio {replay['ratio_actual']:.3f}, target {replay['ratio_target']})"]
    lines += ["", f"Validation: {p['validation']}", f"Splits: {p['splits']}", "",
              f"Search best: {p['search']}", "", "## Stages", "", "| stage | MLflow run | Dagster run | started | ended |",
              "|---|---|---|---|---|"]
    for name, s in p["stages"].items():
        lines.append(f"| {name} | `{s['run_id']}` | `{s['dagster_run_id']}` | {s['started']} | {s['ended']} |")
    gate = p.get("gate") or {}
    lines += ["", "## Promotion gate", "", f"Decision: {'passed' if gate.get('passed') else 'not passed'}",
              f"Reasons: {gate.get('reasons')}", "", "```json", json.dumps(gate.get("evidence", {}), indent=2,
                                                                            default=str), "```", ""]
    lines += ["## Broken links", ""] + ([f"- {b['link']}: {b['error']}" for b in p["broken_links"]] or ["none"])
    return "\n".join(lines) + "\n"
