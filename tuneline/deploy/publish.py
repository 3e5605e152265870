"""Publishing the gate's candidate: register it, move the champion (compare-and-set), and attach its lineage
passport and model card; or record the refusal, leaving the champion where it is.

:func:`publish_candidate` is what ``registered_model`` calls. It closes the stage's MLflow run it is given.
"""

from __future__ import annotations

from typing import Any, Optional

from tuneline.params import Recipe
from tuneline.refs import EvaluationRef, RegisteredRef
from tuneline.tracking import Tracker

DECISION_ARTIFACT = "decision.json"
CARD_FILE = "README.md"  # the model card, in Hugging Face's layout


def publish_candidate(tracker: Tracker, recipe: Recipe, evaluation: EvaluationRef, *, run_id: str,
                      drift_reference_uri: str) -> tuple[RegisteredRef, Optional[str]]:
    """(what happened, the model card's Markdown when a version was registered)."""
    from tuneline import storage
    from tuneline.deploy.card import model_card
    from tuneline.deploy.lineage import build_passport, passport_markdown
    from tuneline.deploy.registry import CHALLENGER, ChampionMoved, promote, register_model
    from tuneline.monitoring.reference import attach_reference

    name = recipe.registered_model_name()
    gate = evaluation.gate
    if not gate.passed:
        return _refused(tracker, name, run_id, "; ".join(gate.reasons), gate.to_dict()), None
    candidate = evaluation.candidate
    tags = {"tuneline.candidate_stage": gate.candidate_stage, "tuneline.gate.passed": True,
            "tuneline.candidate_run_id": candidate.mlflow_run_id, "tuneline.candidate_method": candidate.method}
    try:
        model_dir, made, base = _registrable(candidate, recipe.tracking.adapters)
    except ValueError as exc:  # e.g. prompt learning: nothing a from_pretrained directory can hold
        return _refused(tracker, name, run_id, f"not servable: {exc}", {"gate": gate.to_dict()}), None
    registered = register_model(
        tracker, name, model_dir, run_id=run_id, aliases=(CHALLENGER,),
        tags={**tags, "tuneline.candidate_kind": made},
        base_dir=base, base_tags=_base_origin(candidate) if base is not None else None,
    )
    version = int(registered["version"])
    attach_reference(tracker, name, version, run_id, storage.fetch(drift_reference_uri), model_dir)
    try:
        moved = promote(tracker, name, version, expected=gate.champion_version)
    except ChampionMoved as exc:
        return _refused(tracker, name, run_id, str(exc), {"gate": gate.to_dict(), "version": version},
                        version=version), None
    tracker.log_dict(run_id, {"decision": "registered", "gate": gate.to_dict(), "version": version},
                     DECISION_ARTIFACT)
    tracker.end_run(run_id)
    passport = build_passport(tracker, f"{name}/{version}")
    card = model_card(passport, evaluation, recipe)
    client = tracker.client()
    client.log_text(run_id, passport_markdown(passport), "passport.md")
    tracker.log_dict(run_id, passport, "passport.json")
    client.log_text(run_id, card, CARD_FILE)
    client.set_model_version_tag(name, str(version), "tuneline.model_card", f"runs:/{run_id}/{CARD_FILE}")
    ref = RegisteredRef(decision="registered", name=name, version=version, model_uri=registered["model_uri"],
                        weights_sha256=registered["weights_sha256"], champion_version=version,
                        base_weights_sha256=registered["base_weights_sha256"],
                        champion_previous_version=moved["previous_version"],
                        broken_links=len(passport["broken_links"]), mlflow_run_id=run_id)
    return ref, card


def _registrable(candidate: Any, adapters: str) -> tuple[Any, str, Any]:
    """(directory to register, how it was made, the base directory when it is registered by reference).

    Full weights as they are. An adapter (LoRA family, IA3, bottleneck) with ``tracking.adapters: reference``:
    the adapter itself on a reference to its base; with ``merged``: merged (LoRA family) or bundled (bottleneck)
    into one self-contained directory. Prompt-learning adapters raise ValueError (nothing servable)."""
    import tempfile

    from tuneline.deploy.bundle import check_servable_adapter, servable_model_dir
    from tuneline.models.loading import local_model_dir

    if candidate.kind == "adapter" and adapters == "reference":
        adapter_dir = local_model_dir(candidate)
        check_servable_adapter(adapter_dir, f"the candidate {candidate.stage}")
        return adapter_dir, "adapter-by-reference", local_model_dir(candidate.base)
    model_dir, made = servable_model_dir(candidate, tempfile.mkdtemp(prefix="tuneline-publish-"))
    return model_dir, made, None


def _base_origin(candidate: Any) -> dict[str, str]:
    """Where the candidate's base came from, for the audit: its stage and run, and the hub id or path and
    revision of the model at the root of its chain."""
    base = candidate.base
    origin = {"tuneline.base_stage": base.stage, "tuneline.base_run_id": base.mlflow_run_id or ""}
    root = base
    while root.base is not None:
        root = root.base
    if root.source:
        origin["tuneline.base_source"] = root.source
    if root.revision:
        origin["tuneline.base_revision"] = root.revision
    return origin


def _refused(tracker: Tracker, name: str, run_id: str, reason: str, evidence: dict[str, Any],
             version: Optional[int] = None) -> RegisteredRef:
    from tuneline.deploy.registry import current_champion

    tracker.log_dict(run_id, {"decision": "refused", "reason": reason, "evidence": evidence}, DECISION_ARTIFACT)
    tracker.set_tags(run_id, {"tuneline.decision": "refused"})
    tracker.end_run(run_id)
    champion = current_champion(tracker, name)
    return RegisteredRef(decision="refused", name=name, reason=reason, version=version,
                         champion_version=champion["version"] if champion else None, mlflow_run_id=run_id)
