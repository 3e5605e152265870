"""Provision the base model out of process: ``python -m tuneline.recipes.pretrain --spec SPEC.json``
(a :class:`~tuneline.specs.PretrainSpec`).

Builds the offline tiny model (``model.build: tiny``) or loads one by hub id or path (``from_pretrained``,
safetensors only, no remote code), or, for a retrain, the registered champion named by ``started_from``
(downloaded from the tracking server in ``mlflow``); then (continued-)pretrains it on the corpus files.
Pretraining writes resumable checkpoints under ``<out_uri>/checkpoints``: a retried run continues from the
last complete one with the same result as an uninterrupted run. ``<out_uri>/result.json`` holds the
:class:`~tuneline.specs.Outcome` (the model at ``<out_uri>/model`` and its figures). Any error exits
non-zero with the traceback on stderr.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Optional

from tuneline.recipes import _runner
from tuneline.specs import Outcome, PretrainSpec

MODEL_SUBDIR = "model"
CHECKPOINTS_SUBDIR = "checkpoints"


def run(spec: PretrainSpec, pipes: Any = None) -> Outcome:
    """Provision and pretrain as the spec says; stream progress; write the outcome."""
    from tuneline import storage
    from tuneline.data.ingest import read_source
    from tuneline.models.provision import model_ref, provision_base_model

    log = _runner.StepLogger(pipes, spec.mlflow)
    model_params, pretrain_params = spec.model, spec.pretrain
    if spec.started_from:
        model_params, pretrain_params = _champion(spec)
    texts = [rec.messages[0]["content"] for uri in spec.corpus_uris
             for rec in read_source(storage.fetch(uri)).records]
    work = storage.Workspace(spec.out_uri)
    steps = spec.steps if pretrain_params.enabled or model_params.build == "tiny" else 0
    log.emit(f"base model: {spec.started_from or model_params.build or model_params.name_or_path}; corpus "
             f"{len(texts)} passages; pretraining {steps} steps")

    def progress(step: int, total: int, loss: float) -> None:
        log(step, {"pretrain_loss": loss, "progress": step / total})

    info = provision_base_model(
        model_params, pretrain_params, texts, work.path / MODEL_SUBDIR, seed=spec.seed, steps=spec.steps,
        progress=progress, checkpoint_dir=work.path / CHECKPOINTS_SUBDIR,
        on_checkpoint=work.sync if work.remote else None,
    )
    work.sync(MODEL_SUBDIR)
    method = "champion" if spec.started_from else ("tiny" if model_params.build == "tiny" else "pretrained")
    model = model_ref(info.path, work.uri_of(MODEL_SUBDIR), method=method, stage=spec.asset_key or "base_model",
                      source=spec.started_from or model_params.name_or_path or "tiny",
                      revision=model_params.revision, mlflow_run_id=spec.mlflow.run_id if spec.mlflow else None)
    details = info.to_dict()
    pre = details.get("pretrain") or {}
    metrics = {"n_params": info.n_params, "vocab_size": info.vocab_size,
               **{f"pretrain_{k}": v for k, v in pre.items() if not isinstance(v, (list, dict))}}
    outcome = Outcome(model=model, metrics=metrics, details=details, curves={"pretrain loss": info.loss_curve})
    log.emit(f"base model ready: {info.n_params:,} params, weights sha256 {info.weights_sha256[:12]}"
             + (f", eval loss {pre['eval_loss_before']:.3f} -> {pre['eval_loss_after']:.3f}" if pre else ""))
    return _runner.finish(spec, outcome, pipes, log=log)


def _champion(spec: PretrainSpec) -> tuple[Any, Any]:
    """Model params that load the registered champion ``spec.started_from``, with pretraining off."""
    from tuneline.deploy.registry import download_version, get_version
    from tuneline.tracking import Tracker

    if spec.mlflow is None:
        raise ValueError("started_from names a registered model but the spec has no tracking server (mlflow)")
    tracker = Tracker(spec.mlflow.tracking_uri)
    path = download_version(tracker, get_version(tracker, spec.started_from))
    model = dataclasses.replace(spec.model, build=None, name_or_path=str(path), revision=None)
    return model, dataclasses.replace(spec.pretrain, enabled=False)


def main(argv: Optional[list[str]] = None) -> int:
    return _runner.run_cli(argv, spec_class=PretrainSpec, run=run)


if __name__ == "__main__":
    sys.exit(main())
