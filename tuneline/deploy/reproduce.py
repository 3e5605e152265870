"""``tuneline reproduce MODEL@ALIAS``: re-run the chain that made a registered version from its passport alone.

Every launched stage logged the exact trainer spec it ran (``lineage/spec.json``: params, seed, step caps,
the model it started from) and the data it read is in MLflow, content-addressed: the prepared records and the
split membership (record ids per split), each named by sha256 in the passport. :func:`reproduce`:

1. rebuilds every split the stages read from those two artifacts (downloaded, their sha256 checked), and
   fetches the corpus files the base model was pretrained on (sha256 checked);
2. re-runs each requested stage in chain order, in this process, into a scratch folder, with the logged spec:
   a stage whose upstream stage was re-run starts from the reproduced model, else from the original one
   (fetched from its URI and checked against its sha256);
3. reports, stage by stage, the original and reproduced figures and whether the weights are bitwise equal, or
   else the largest absolute difference of any weight (``within tolerance`` when it is at most ``atol``).

The code version is the checkout's: the report names both git shas and says when they differ.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from tuneline.tracking import Tracker, git_sha

STAGES = ("base_model", "sft_adapter", "dpo_adapter", "distilled_student")
ALIASES = {"base": "base_model", "pretrain": "base_model", "sft": "sft_adapter", "dpo": "dpo_adapter",
           "student": "distilled_student", "distill": "distilled_student"}
COMPARED = {  # the figures compared per stage (those a rerun must give again)
    "base_model": ("pretrain_eval_loss_after", "pretrain_final_loss"),
    "sft_adapter": ("best_val_loss", "global_step", "final_train_loss"),
    "dpo_adapter": ("final_loss", "reward_accuracy_after", "reward_margin_after"),
    "distilled_student": ("val_kl_after", "val_ce_after", "final_loss"),
}


class ReproduceError(RuntimeError):
    """The passport lacks what a rerun needs (a spec, a data artifact); the message says which."""


def stage_names(requested: Optional[Sequence[str]]) -> list[str]:
    if not requested:
        return list(STAGES)
    out = []
    for name in requested:
        stage = ALIASES.get(name, name)
        if stage not in STAGES:
            raise ReproduceError(f"unknown stage {name!r}: use {', '.join(sorted(ALIASES))} (or asset names)")
        out.append(stage)
    return [s for s in STAGES if s in out]


def _download(tracker: Tracker, entry: dict[str, str], dest: Path) -> Path:
    import mlflow.artifacts

    from tuneline.records import sha256_file

    local = Path(mlflow.artifacts.download_artifacts(run_id=entry["run_id"], artifact_path=entry["artifact"],
                                                     dst_path=str(dest), tracking_uri=tracker.tracking_uri))
    if sha256_file(local) != entry["sha256"]:
        raise ReproduceError(f"{entry['artifact']}: the downloaded file's sha256 differs from the passport's")
    return local


def rebuild_splits(tracker: Tracker, passport: dict[str, Any], dest: Path) -> dict[str, Path]:
    """split name -> a JSONL of its records, rebuilt from the content-addressed records and membership."""
    from tuneline.records import read_records, write_jsonl

    content = passport.get("content", {})
    try:
        records_entry = content["prepared_dataset"]["records"]
        members_entry = content["dataset_splits"]["membership"]
    except KeyError as exc:
        raise ReproduceError(f"the passport names no {exc.args[0]} artifact: this version predates "
                             "content-addressed lineage and cannot be reproduced from its passport") from None
    records = {r.id: r for r in read_records(_download(tracker, records_entry, dest / "records"))}
    membership = json.loads(_download(tracker, members_entry, dest / "membership").read_text(encoding="utf-8"))
    out = {}
    for name, ids in membership.items():
        missing = [i for i in ids if i not in records]
        if missing:
            raise ReproduceError(f"split {name}: {len(missing)} record ids are not among the prepared records")
        out[name] = dest / "splits" / f"{name}.jsonl"
        write_jsonl(out[name], (records[i].to_dict() for i in ids))
    return out


def _local_uris(spec_data: dict[str, Any], splits: dict[str, Path], corpus: dict[str, str]) -> dict[str, Any]:
    """The spec with every split URI pointing at the rebuilt split and corpus URIs at the checked copies."""
    data = dict(spec_data)
    for key in ("train_uri", "val_uri", "test_uri", "preference_uri"):
        if data.get(key):
            name = data[key].rstrip("/").rsplit("/", 1)[-1].removesuffix(".jsonl")
            if name not in splits:
                raise ReproduceError(f"the spec's {key} names split {name!r}, which the membership does not hold")
            data[key] = splits[name].as_uri()
    if "corpus_uris" in data:
        data["corpus_uris"] = [corpus[u] for u in data["corpus_uris"]]
    return data


def _corpus(passport: dict[str, Any]) -> dict[str, str]:
    """original corpus URI -> a URI of a checked local copy."""
    from tuneline import storage
    from tuneline.records import sha256_file

    out = {}
    for f in passport.get("data", []):
        if f.get("role") != "corpus":
            continue
        local = storage.fetch(f["uri"])
        if sha256_file(local) != f["sha256"]:
            raise ReproduceError(f"corpus file {storage.redact(f['uri'])} changed since training (sha256 differs)")
        out[f["uri"]] = storage.to_uri(local)
    return out


def weights_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two models' weights (same tensors expected)."""
    from safetensors.torch import load_file

    left = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    right = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    if set(left) != set(right):
        return float("inf")
    return max((float((left[k].float() - right[k].float()).abs().max()) for k in left if left[k].numel()),
               default=0.0) if all(left[k].shape == right[k].shape for k in left) else float("inf")


def reproduce(tracker: Tracker, ref: str, *, stages: Optional[Sequence[str]] = None, atol: float = 1e-4,
              work_dir: Optional[Path] = None) -> dict[str, Any]:
    """Re-run the stages of ``ref`` (``NAME@ALIAS`` or ``NAME/VERSION``); returns the comparison report."""
    from tuneline import specs as spec_module
    from tuneline.deploy.lineage import build_passport
    from tuneline.refs import ModelRef

    passport = build_passport(tracker, ref)
    wanted = stage_names(stages)
    missing = [s for s in wanted if s not in passport.get("specs", {})]
    if missing:
        raise ReproduceError(f"the passport of {ref} holds no trainer spec for {', '.join(missing)} "
                             "(stages that did not run, or a version registered before specs were logged)")
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="tuneline-reproduce-"))
    splits = rebuild_splits(tracker, passport, root / "data")
    corpus = _corpus(passport) if "base_model" in wanted else {}
    reproduced: dict[str, ModelRef] = {}
    report: dict[str, Any] = {"model": passport["model"], "version": passport["version"],
                              "code": {"original": passport["git_sha"], "now": git_sha(),
                                       "same": passport["git_sha"] == git_sha()},
                              "stages": {}, "work_dir": str(root)}
    for stage in wanted:
        logged = passport["specs"][stage]
        cls = getattr(spec_module, logged["type"])
        data = _local_uris(logged["spec"], splits, corpus)
        data.update(out_uri=(root / stage).as_uri(), mlflow=None, error_file=None)
        spec = cls.from_dict(data)
        for field in ("base", "sft", "teacher"):
            upstream = getattr(spec, field, None)
            if isinstance(upstream, ModelRef) and upstream.stage in reproduced:
                spec = dataclasses.replace(spec, **{field: reproduced[upstream.stage]})
        if isinstance(spec, spec_module.DistillSpec):
            spec = dataclasses.replace(spec, cache_uri=(root / "teacher_cache").as_uri())
        if getattr(spec, "merge_cache_uri", None):  # merged here again, not taken from the original's cache
            spec = dataclasses.replace(spec, merge_cache_uri=(root / "merged_sft").as_uri())
        outcome = _run(spec)
        reproduced[stage] = outcome.model
        original = ModelRef.from_dict(passport["models"][stage])
        report["stages"][stage] = _compare(stage, passport, original, outcome, atol)
    report["all_match"] = all(s["weights"] in ("bitwise", "within tolerance") and s["metrics_match"]
                              for s in report["stages"].values())
    return report


def _run(spec: Any) -> Any:
    import importlib

    return importlib.import_module(spec.module).run(spec, None)


def _compare(stage: str, passport: dict[str, Any], original: Any, outcome: Any, atol: float) -> dict[str, Any]:
    from tuneline import storage

    before = passport["stages"][stage]["metrics"]
    figures = {}
    for key in COMPARED[stage]:
        if key in before or key in outcome.metrics:
            figures[key] = {"original": before.get(key), "reproduced": outcome.metrics.get(key)}
    metrics_match = all(f["original"] == f["reproduced"] for f in figures.values())
    if outcome.model.sha256 == original.sha256:
        weights, diff = "bitwise", 0.0
    else:
        try:
            diff = weights_difference(storage.fetch(original.uri), storage.fetch(outcome.model.uri))
        except OSError:
            weights, diff = "differ (the original weights are not reachable to measure by how much)", None
        else:
            weights = "within tolerance" if diff <= atol else "differ"
    return {"figures": figures, "metrics_match": metrics_match, "weights": weights, "max_abs_weight_diff": diff,
            "atol": atol, "original_sha256": original.sha256, "reproduced_sha256": outcome.model.sha256}


def report_markdown(report: dict[str, Any]) -> str:
    code = report["code"]
    lines = [f"# Reproduction of {report['model']} version {report['version']}", "",
             f"code: original {code['original']}, now {code['now']}"
             + ("" if code["same"] else " (DIFFERENT: results may differ for that reason)"), "",
             "| stage | figure | original | reproduced | weights |", "|---|---|---:|---:|---|"]
    for stage, s in report["stages"].items():
        first = True
        for key, f in s["figures"].items():
            lines.append(f"| {stage if first else ''} | {key} | {f['original']} | {f['reproduced']} | "
                         f"{s['weights'] if first else ''} |")
            first = False
    lines += ["", f"all match: {report['all_match']}", f"work dir: {report['work_dir']}"]
    return "\n".join(lines) + "\n"
