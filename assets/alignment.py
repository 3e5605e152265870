"""RLHF beside DPO: a reward model on the preference split, and an online-RL policy (RLOO or GRPO) trained against
it. Each launches a recipe CLI out of process (Dagster Pipes), owns an MLflow run and returns a typed reference."""

import dagster as dg

from assets._stage import RETRY, skip_stage, stage_uri, train_stage
from resources.artifacts import ArtifactStore
from resources.launcher import TrainingLauncher
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.refs import FeedbackRef, ModelRef, SplitsRef
from tuneline.specs import RewardSpec, RlSpec

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
                      test_uri=dataset_splits.uris.get("preference_test"), params=r.reward)
    return train_stage(context, recipe=r, mlflow=mlflow, launcher=launcher, spec=spec, section="reward",
                       params=r.reward, splits=dataset_splits, upstream={"sft_adapter": sft_adapter},
                       title="Reward model loss", extra_params=feedback_params(r, feedback_preferences))


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
    penalty to the SFT model (a fresh adapter, disabled for the reference); no critic: the baseline is the other
    completions of each prompt. Its policy joins the evaluation table; ``alignment.method`` says whether the gate
    takes it."""
    r = recipe.load()
    if not r.rl.enabled:
        return skip_stage(sft_adapter, "rl.enabled is false: no RL policy is trained")
    algorithm = r.rl_algorithm()
    spec = RlSpec(out_uri=stage_uri(artifacts, "rl_policy", context), seed=r.seed, max_steps=r.max_steps,
                  sft=sft_adapter, reward_model=reward_model, algorithm=algorithm,
                  train_uri=dataset_splits.uri("preference_train"),
                  val_uri=dataset_splits.uri("preference_validation"), params=r.rl)
    return train_stage(context, recipe=r, mlflow=mlflow, launcher=launcher, spec=spec, section="rl", params=r.rl,
                       splits=dataset_splits, upstream={"sft_adapter": sft_adapter, "reward_model": reward_model},
                       title=f"{algorithm.upper()} loss", extra_params={"rl.algorithm": algorithm})


def feedback_uris(recipe, feedback: FeedbackRef) -> tuple[str, ...]:
    """The accepted feedback pairs, when the recipe uses feedback and there are any."""
    return (feedback.records_uri,) if recipe.feedback.use and feedback.accepted else ()


def feedback_params(recipe, feedback: FeedbackRef) -> dict:
    """What a stage logs about the feedback pairs it trained on (their file's sha256: the data lineage)."""
    used = bool(feedback_uris(recipe, feedback))
    return {"feedback.pairs": feedback.accepted if used else 0,
            "feedback.sha256": feedback.sha256 if used else "none"}
