"""DPO on the preference split (and accepted feedback pairs), from the SFT model."""

import dagster as dg

from assets._stage import RETRY, skip_stage, stage_uri, train_stage
from assets.feedback import feedback_params, feedback_uris
from resources.artifacts import ArtifactStore
from resources.launcher import TrainingLauncher
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.refs import FeedbackRef, ModelRef, SplitsRef
from tuneline.specs import DpoSpec

GROUP = "training"


@dg.asset(group_name=GROUP, kinds={"pytorch"}, retry_policy=RETRY)
def dpo_adapter(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    dataset_splits: SplitsRef,
    sft_adapter: ModelRef,
    feedback_preferences: FeedbackRef,
) -> dg.Output:
    """DPO on the preference split (and the accepted feedback pairs, ``feedback.use``), starting from the SFT model
    (merged) with a fresh adapter, so the adapter disabled is the reference: no second full copy in memory. After
    prompt learning it trains the SFT's virtual tokens on, against their frozen copy."""
    r = recipe.load()
    if not r.dpo.enabled:
        return skip_stage(sft_adapter, "dpo.enabled is false: no DPO model (the gate takes the SFT model)")
    spec = DpoSpec(out_uri=stage_uri(artifacts, "dpo_adapter", context), seed=r.seed, max_steps=r.max_steps,
                   sft=sft_adapter, train_uri=dataset_splits.uri("preference_train"),
                   val_uri=dataset_splits.uri("preference_validation"), params=r.dpo,
                   extra_train_uris=feedback_uris(r, feedback_preferences),
                   merge_cache_uri=artifacts.shared_uri("merged_sft"))
    return train_stage(context, recipe=r, mlflow=mlflow, launcher=launcher, spec=spec, section="dpo", params=r.dpo,
                       splits=dataset_splits, upstream={"sft_adapter": sft_adapter}, title="DPO loss",
                       extra_params=feedback_params(r, feedback_preferences))
