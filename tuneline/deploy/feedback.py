"""Feedback on served answers, and the preference pairs it becomes.

``POST /feedback`` (:func:`tuneline.deploy.server.create_app`) takes one of

- ``{"request_id": N, "rating": R}``: a rating (integer 1-5) of the answer a logged ``/generate`` request got;
- ``{"chosen_request_id": A, "rejected_request_id": B}``: a choice between the answers two logged requests got
  to the same prompt.

:func:`parse_feedback` checks the body (422 with the field named), :func:`record_feedback` checks the requests
(404 for an id that was never logged, 422 for a failed request or a pair with different prompts, 409 for feedback
given before: nothing is logged twice) and writes it to the inference log's ``feedback`` table.

:func:`feedback_pairs` turns feedback into preference rows (the ``preference`` schema: prompt turns, chosen,
rejected, plus the request ids and the model version that answered): each pairwise choice is a pair; ratings of
answers to the same prompt make pairs where one rating beats the other by at least ``min_rating_gap``. The rows
then go through the same reader and validation suite as any preference file (``feedback_preferences`` asset).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from tuneline.deploy.http import RequestError
from tuneline.deploy.inference_log import DuplicateFeedback, InferenceLog

RATING_RANGE = (1, 5)
RATING_FIELDS = {"request_id", "rating"}
PAIRWISE_FIELDS = {"chosen_request_id", "rejected_request_id"}


class FeedbackError(RequestError):
    """Feedback the server refuses: ``status`` is the HTTP status (never 5xx), the message says why."""


@dataclass(frozen=True)
class Feedback:
    kind: str  # rating or pairwise
    request_id: int  # the rated request, or the chosen one
    other_request_id: Optional[int] = None  # the rejected request (pairwise)
    rating: Optional[int] = None


def _request_id(body: dict, key: str) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FeedbackError(422, f"'{key}' must be a positive integer (the request_id /generate returned), "
                                 f"got {value!r}")
    return value


def parse_feedback(body: Any) -> Feedback:
    """A :class:`Feedback` from a decoded JSON body, or :class:`FeedbackError` (400/422)."""
    if not isinstance(body, dict):
        raise FeedbackError(400, f"the body must be a JSON object, got {type(body).__name__}")
    keys = set(body)
    if keys == RATING_FIELDS:
        rating = body["rating"]
        low, high = RATING_RANGE
        if isinstance(rating, bool) or not isinstance(rating, int) or not low <= rating <= high:
            raise FeedbackError(422, f"'rating' must be an integer from {low} to {high}, got {rating!r}")
        return Feedback("rating", _request_id(body, "request_id"), rating=rating)
    if keys == PAIRWISE_FIELDS:
        chosen, rejected = _request_id(body, "chosen_request_id"), _request_id(body, "rejected_request_id")
        if chosen == rejected:
            raise FeedbackError(422, "a pairwise choice needs two different requests")
        return Feedback("pairwise", chosen, other_request_id=rejected)
    raise FeedbackError(422, f"send {{'request_id', 'rating'}} or {{'chosen_request_id', 'rejected_request_id'}}; "
                             f"got fields {sorted(keys)}")


def _answered(log: InferenceLog, request_id: int, key: str) -> dict[str, Any]:
    row = log.get(request_id)
    if row is None:
        raise FeedbackError(404, f"{key} {request_id}: no such request in the inference log")
    if row["status"] != 200 or row["response"] is None or not row["messages"]:
        raise FeedbackError(422, f"{key} {request_id}: that request got no answer (status {row['status']}); "
                                 "there is nothing to give feedback on")
    return row


def record_feedback(log: InferenceLog, feedback: Feedback) -> dict[str, Any]:
    """Check the requests the feedback names and log it; the answer the server sends back."""
    first = _answered(log, feedback.request_id, "request_id" if feedback.kind == "rating" else "chosen_request_id")
    if feedback.kind == "pairwise":
        other = _answered(log, int(feedback.other_request_id), "rejected_request_id")
        if first["messages"] != other["messages"]:
            raise FeedbackError(422, f"requests {feedback.request_id} and {feedback.other_request_id} answered "
                                     "different prompts; a pairwise choice compares two answers to the same prompt")
    try:
        feedback_id = log.add_feedback(kind=feedback.kind, request_id=feedback.request_id,
                                       other_request_id=feedback.other_request_id, rating=feedback.rating)
    except DuplicateFeedback as exc:
        raise FeedbackError(409, str(exc)) from None
    return {"feedback_id": feedback_id, "kind": feedback.kind, "request_id": feedback.request_id,
            **({"rejected_request_id": feedback.other_request_id} if feedback.kind == "pairwise" else {}),
            **({"rating": feedback.rating} if feedback.kind == "rating" else {})}


@dataclass
class FeedbackPairs:
    """Preference rows made from feedback, and what could not be paired."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # preference schema + request ids + model versions
    feedback_read: int = 0  # feedback rows read from the log
    unpaired_ratings: int = 0  # ratings with no other rating of the same prompt at least min_rating_gap away
    missing_requests: int = 0  # feedback whose request is no longer in the log
    last_feedback_id: int = 0  # the cursor after this read
    model_versions: dict[str, int] = field(default_factory=dict)  # model version -> rows with an answer from it


def _row(chosen: dict[str, Any], rejected: dict[str, Any], how: str) -> dict[str, Any]:
    return {"prompt": chosen["messages"], "chosen": chosen["response"], "rejected": rejected["response"],
            "feedback": how, "chosen_request_id": chosen["id"], "rejected_request_id": rejected["id"],
            "model_version_chosen": chosen["model_version"], "model_version_rejected": rejected["model_version"],
            "model_name": chosen["model_name"]}


def feedback_pairs(log: InferenceLog, *, since_id: int = 0, min_rating_gap: int = 1) -> FeedbackPairs:
    """Preference rows from the feedback logged after ``since_id`` (0: all of it)."""
    feedback = log.read_feedback_since(since_id)
    out = FeedbackPairs(feedback_read=len(feedback), last_feedback_id=max([since_id] + [f["id"] for f in feedback]))
    rated: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for item in feedback:
        request = log.get(item["request_id"])
        if request is None:
            out.missing_requests += 1
            continue
        if item["kind"] == "pairwise":
            other = log.get(item["other_request_id"])
            if other is None:
                out.missing_requests += 1
                continue
            out.rows.append(_row(request, other, "pairwise"))
        else:
            key = json.dumps(request["messages"], sort_keys=True)
            rated.setdefault(key, []).append((int(item["rating"]), request))
    for ratings in rated.values():
        paired: set[int] = set()
        ordered = sorted(ratings, key=lambda x: (-x[0], x[1]["id"]))
        for i, (high, better) in enumerate(ordered):
            for low, worse in ordered[i + 1:]:
                if high - low >= min_rating_gap:
                    out.rows.append(_row(better, worse, f"ratings {high} > {low}"))
                    paired.update((better["id"], worse["id"]))
        out.unpaired_ratings += sum(1 for _, r in ratings if r["id"] not in paired)
    for row in out.rows:
        for version in {row["model_version_chosen"], row["model_version_rejected"]}:
            out.model_versions[str(version)] = out.model_versions.get(str(version), 0) + 1
    return out


def prepare_feedback(log: InferenceLog, work: Any, recipe: Any, tokenizer: Any = None) -> Any:
    """Feedback pairs through the preference reader and the validation suite (the recipe's ``validation`` rules,
    the base model's tokenizer): ``feedback.jsonl`` (the rows as made), ``records.jsonl`` (accepted) and
    ``quarantine.jsonl`` in the :class:`~tuneline.storage.Workspace` ``work`` (uploaded when remote); a
    :class:`~tuneline.refs.FeedbackRef` with their URIs and the counts."""
    from tuneline.data.ingest import read_source
    from tuneline.data.validate import validate_records
    from tuneline.params import DataSource
    from tuneline.records import sha256_file, write_jsonl
    from tuneline.refs import FeedbackRef

    out = work.path
    pairs = feedback_pairs(log, min_rating_gap=recipe.feedback.min_rating_gap)
    raw = out / "feedback.jsonl"
    write_jsonl(raw, pairs.rows)
    accepted, quarantined, reasons, read = [], [], {}, 0
    if pairs.rows:
        source = read_source(DataSource(path=str(raw), format="jsonl", schema="preference"))
        result = validate_records(source.records, recipe.validation, tokenizer, parse_rejections=source.rejected,
                                  read=source.read)
        accepted, quarantined, reasons, read = result.accepted, result.quarantined, result.reasons, result.read
    records, quarantine = out / "records.jsonl", out / "quarantine.jsonl"
    write_jsonl(records, (r.to_dict() for r in accepted))
    write_jsonl(quarantine, (q.to_dict() for q in quarantined))
    work.sync()
    return FeedbackRef(records_uri=work.uri_of("records.jsonl"), quarantine_uri=work.uri_of("quarantine.jsonl"),
                       sha256=sha256_file(records), feedback_read=pairs.feedback_read, read=read,
                       accepted=len(accepted), quarantined=len(quarantined), reasons=dict(reasons),
                       unpaired_ratings=pairs.unpaired_ratings, missing_requests=pairs.missing_requests,
                       last_feedback_id=pairs.last_feedback_id, model_versions=pairs.model_versions)
