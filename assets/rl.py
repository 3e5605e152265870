"""Online RL (RLOO or GRPO) from the SFT model against the reward model (RLHF's second half)."""

import dagster as dg

from assets._stage import RETRY, skip_stage, stage_uri, train_stage
from resources.artifacts import ArtifactStore
from resources.launcher import TrainingLauncher
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.refs import ModelRef, SplitsRef
from tuneline.specs import RlSpec

GROUP = "training"


@dg.asset(group_name=GROUP, kinds={"pytorch"}, retry_policy=RETRY)
def rl_policy(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    dataset_splits: SplitsRef,
    sft_adapter: ModelRef,
    reward_model: ModelRef,
) -> dg.Output:
    """Online RL (RLOO or GRPO, ``recipe.rl_algorithm()``) from the SFT model against the reward model, with a KL
    penalty to the SFT model (a fresh adapter, disabled for the reference; after prompt learning the SFT's virtual
    tokens trained on, against their frozen copy); no critic: the baseline is the other
    completions of each prompt. Its policy joins the evaluation table; ``alignment.method`` says whether the gate
    takes it."""
    r = recipe.load()
    if not r.rl.enabled:
        return skip_stage(sft_adapter, "rl.enabled is false: no RL policy is trained")
    algorithm = r.rl_algorithm()
    spec = RlSpec(out_uri=stage_uri(artifacts, "rl_policy", context), seed=r.seed, max_steps=r.max_steps,
                  sft=sft_adapter, reward_model=reward_model, algorithm=algorithm,
                  train_uri=dataset_splits.uri("preference_train"),
                  val_uri=dataset_splits.uri("preference_validation"), params=r.rl,
                  merge_cache_uri=artifacts.shared_uri("merged_sft"))
    return train_stage(context, recipe=r, mlflow=mlflow, launcher=launcher, spec=spec, section="rl", params=r.rl,
                       splits=dataset_splits, upstream={"sft_adapter": sft_adapter, "reward_model": reward_model},
                       title=f"{algorithm.upper()} loss", extra_params={"rl.algorithm": algorithm})
