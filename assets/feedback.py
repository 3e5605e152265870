"""Feedback on served answers becomes preference data: the reward model and DPO train on it."""

import dagster as dg

from resources.artifacts import ArtifactStore
from resources.recipe import RecipeResource
from tuneline.refs import FeedbackRef, ModelRef


@dg.asset(group_name="data", kinds={"sqlite"})
def feedback_preferences(
    context: dg.AssetExecutionContext, recipe: RecipeResource, artifacts: ArtifactStore, base_model: ModelRef,
) -> dg.Output:
    """Ratings and pairwise choices sent to ``POST /feedback`` (in the inference log) as preference pairs: a choice
    is a pair, two ratings of answers to one prompt are a pair; each with the request ids and the model version
    that answered. They go through the same reader and validation suite as any preference file (the base model's
    tokenizer); read = accepted + quarantined."""
    from tuneline.deploy.feedback import prepare_feedback
    from tuneline.deploy.inference_log import InferenceLog
    from tuneline.models.loading import load_tokenizer, local_model_dir
    from tuneline.settings import load_settings

    r = recipe.load()
    log = InferenceLog(load_settings().log_path(r))
    work = artifacts.workspace("feedback_preferences", context.run.run_id)
    ref = prepare_feedback(log, work, r, tokenizer=load_tokenizer(local_model_dir(base_model)))
    context.log.info(f"feedback: {ref.feedback_read} rows -> {ref.read} pairs, {ref.accepted} accepted, "
                     f"{ref.quarantined} quarantined")
    return dg.Output(ref, metadata={
        "feedback_read": ref.feedback_read, "read": ref.read, "accepted": ref.accepted,
        "quarantined": ref.quarantined, "balanced": ref.balanced, "unpaired_ratings": ref.unpaired_ratings,
        "missing_requests": ref.missing_requests, "last_feedback_id": ref.last_feedback_id,
        "reasons": dg.MetadataValue.json(ref.reasons), "model_versions": dg.MetadataValue.json(ref.model_versions),
        "records": dg.MetadataValue.url(ref.records_uri), "sha256": ref.sha256,
    })


def feedback_uris(recipe, feedback: FeedbackRef) -> tuple[str, ...]:
    """The accepted feedback pairs, when the recipe uses feedback and there are any."""
    return (feedback.records_uri,) if recipe.feedback.use and feedback.accepted else ()


def feedback_params(recipe, feedback: FeedbackRef) -> dict:
    """What a stage logs about the feedback pairs it trained on (their file's sha256: the data lineage)."""
    used = bool(feedback_uris(recipe, feedback))
    return {"feedback.pairs": feedback.accepted if used else 0,
            "feedback.sha256": feedback.sha256 if used else "none"}
