"""The reward model: a 1-label sequence classifier on the preference split (RLHF's first half)."""

import dagster as dg

from assets._stage import RETRY, skip_stage, stage_uri, train_stage
from assets.feedback import feedback_params, feedback_uris
from resources.artifacts import ArtifactStore
from resources.launcher import TrainingLauncher
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.refs import FeedbackRef, ModelRef, SplitsRef
from tuneline.specs import RewardSpec

GROUP = "training"


@dg.asset(group_name=GROUP, kinds={"pytorch"}, retry_policy=RETRY)
def reward_model(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    dataset_splits: SplitsRef,
    sft_adapter: ModelRef,
    feedback_preferences: FeedbackRef,
) -> dg.Output:
    """A 1-label sequence classifier trained with TRL's RewardTrainer on the preference split and the accepted
    feedback pairs (``feedback.use``), from the SFT model or the MiniLM encoder (``reward.base``); pairwise accuracy
    on the held-out pairs before and after."""
    r = recipe.load()
    if not r.reward.enabled:
        return skip_stage(sft_adapter, "reward.enabled is false: no reward model (the table has no reward column)")
    spec = RewardSpec(out_uri=stage_uri(artifacts, "reward_model", context), seed=r.seed, max_steps=r.max_steps,
                      sft=sft_adapter if r.reward.base == "sft" else None,
                      train_uris=(dataset_splits.uri("preference_train"),) + feedback_uris(r, feedback_preferences),
                      val_uri=dataset_splits.uri("preference_validation"),
                      test_uri=dataset_splits.uris.get("preference_test"), params=r.reward,
                      merge_cache_uri=artifacts.shared_uri("merged_sft"))
    return train_stage(context, recipe=r, mlflow=mlflow, launcher=launcher, spec=spec, section="reward",
                       params=r.reward, splits=dataset_splits, upstream={"sft_adapter": sft_adapter},
                       title="Reward model loss", extra_params=feedback_params(r, feedback_preferences))
