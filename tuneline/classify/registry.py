"""Classifiers in the MLflow Model Registry, with the MLflow ``transformers`` flavor (a text-classification
pipeline; ``pip_requirements`` given explicitly, so nothing is inferred or fetched), and back to a local
``from_pretrained`` directory whose weights are checked against the version's sha256 tag.

The aliases, the compare-and-set promotion and the version lookups are :mod:`tuneline.deploy.registry`'s.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from tuneline.deploy.registry import (
    CHALLENGER,
    TAG_LOGGED_MODEL,
    TAG_SOURCE_RUN,
    TAG_WEIGHTS,
    RegistryError,
    _ensure_registered_model,
    check_model_dir,
    get_version,
    pip_requirements,
)
from tuneline.tracking import Tracker

TAG_KIND = "tuneline.model_kind"
KIND = "classifier"
MODEL_SUBDIR = "model"  # where the transformers flavor keeps the weights (save_pretrained=True)


def register_classifier(tracker: Tracker, name: str, model_dir: str | Path, *, run_id: str,
                        tags: Optional[Mapping[str, Any]] = None, aliases: Iterable[str] = (CHALLENGER,)) -> dict[str, Any]:
    """Log the classifier directory as a transformers-flavor model of run ``run_id`` and register a new version
    of ``name`` (tagged with the run, the weights sha256 and ``tags``; ``aliases`` set on it)."""
    import mlflow
    import mlflow.transformers

    from tuneline.classify.model import LABELS_FILE, load_classifier
    from tuneline.models.loading import weights_sha256

    path = check_model_dir(model_dir)
    sha = weights_sha256(path)
    model, tokenizer, labels = load_classifier(path)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer}, task="text-classification",
                name="classifier", pip_requirements=pip_requirements(), save_pretrained=True,
                metadata={TAG_WEIGHTS: sha, "labels": list(labels.names)})
            if (path / LABELS_FILE).is_file():
                mlflow.log_artifact(str(path / LABELS_FILE), "classifier_info")
    finally:
        mlflow.set_tracking_uri(previous)
    client = tracker.client()
    _ensure_registered_model(client, name)
    version_tags = {str(k): str(v) for k, v in (tags or {}).items() if v is not None}
    version_tags.update({TAG_SOURCE_RUN: run_id, TAG_WEIGHTS: sha, TAG_LOGGED_MODEL: info.model_id, TAG_KIND: KIND})
    mv = client.create_model_version(name=name, source=info.model_uri, run_id=run_id, tags=version_tags,
                                     model_id=info.model_id)
    aliases = list(aliases)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, str(mv.version))
    return {"name": name, "version": int(mv.version), "run_id": run_id, "model_uri": f"models:/{name}/{mv.version}",
            "aliases": aliases, "model_id": info.model_id, "weights_sha256": sha, "source": mv.source}


def download_classifier(tracker: Tracker, ref: str, cache_dir: str | Path | None = None) -> Path:
    """A registered classifier (``NAME@ALIAS``, ``NAME/VERSION`` or ``models:/NAME/VERSION``) as a local
    ``from_pretrained`` directory (weights and tokenizer), its sha256 checked against the version's tag."""
    import mlflow.artifacts

    from tuneline.models.loading import weights_sha256
    from tuneline.paths import state_dir

    info = get_version(tracker, ref.removeprefix("models:/"))
    if info.get("tags", {}).get(TAG_KIND) != KIND:
        raise RegistryError(f"{ref} is not a registered classifier (no {TAG_KIND}={KIND} tag)")
    dest = (Path(cache_dir) if cache_dir else state_dir() / "registry") / info["name"] / f"{info['version']}-classifier"
    expected = info.get("weights_sha256")
    if dest.is_dir() and expected and weights_sha256(dest) == expected:
        return dest
    tmp = Path(tempfile.mkdtemp(prefix="tuneline-classifier-"))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=info["source"], dst_path=str(tmp),
                                            tracking_uri=tracker.tracking_uri)
        weights = next((p.parent for p in tmp.rglob("config.json") if any(p.parent.glob("*.safetensors"))), None)
        tokenizer = next((p.parent for p in tmp.rglob("tokenizer_config.json")), None)
        if weights is None or tokenizer is None:
            raise RegistryError(f"{ref}: the logged model holds no safetensors weights and tokenizer")
        if expected and weights_sha256(weights) != expected:
            raise RegistryError(f"{ref}: downloaded weights do not match the version's sha256 {expected[:16]}")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(weights, dest)
        for item in tokenizer.iterdir():
            if item.is_file() and not (dest / item.name).exists():
                shutil.copy2(item, dest / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
