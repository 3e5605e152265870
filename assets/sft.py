"""Supervised fine-tuning (the recipe's PEFT method) out of process through the launcher."""

import dagster as dg

from assets._stage import RETRY, stage_uri, train_stage
from resources.artifacts import ArtifactStore
from resources.launcher import TrainingLauncher
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.refs import ModelRef, SplitsRef, StudyRef
from tuneline.specs import SftSpec

GROUP = "training"


@dg.asset(group_name=GROUP, kinds={"pytorch"}, retry_policy=RETRY)
def sft_adapter(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    base_model: ModelRef,
    dataset_splits: SplitsRef,
    hpo_study: StudyRef,
) -> dg.Output:
    """Supervised fine-tuning with the search's best params (method from the recipe), early stopping on
    validation loss, checkpoints that a retry resumes from."""
    from tuneline.train.hpo import sft_params_from_trial

    r = recipe.load()
    params = sft_params_from_trial(r.sft, hpo_study.best_params) if hpo_study.enabled else r.sft
    spec = SftSpec(out_uri=stage_uri(artifacts, "sft_adapter", context), seed=r.seed, max_steps=r.max_steps,
                   base=base_model, train_uri=dataset_splits.uri("train"), val_uri=dataset_splits.uri("validation"),
                   params=params, tokenizer=r.tokenizer, offload=r.offload)
    return train_stage(context, recipe=r, mlflow=mlflow, launcher=launcher, spec=spec, section="sft", params=params,
                       splits=dataset_splits, upstream={"base_model": base_model, "hpo_study": hpo_study},
                       title="SFT loss")
