"""Distillation: a smaller student trained on the DPO model's token distributions."""

import dagster as dg

from assets._stage import RETRY, skip_stage, stage_uri, train_stage
from resources.artifacts import ArtifactStore
from resources.launcher import TrainingLauncher
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.refs import ModelRef, SplitsRef
from tuneline.specs import DistillSpec

GROUP = "training"


@dg.asset(group_name=GROUP, kinds={"pytorch"}, retry_policy=RETRY)
def distilled_student(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    dataset_splits: SplitsRef,
    dpo_adapter: ModelRef,
) -> dg.Output:
    """A smaller student trained on the DPO model's token distributions (KL at a temperature + CE);
    the teacher's outputs are cached under their inputs' hash, so a retry reuses them."""
    r = recipe.load()
    if not r.distill.enabled:
        return skip_stage(dpo_adapter, "distill.enabled is false: no student is distilled")
    spec = DistillSpec(out_uri=stage_uri(artifacts, "distilled_student", context), seed=r.seed,
                       max_steps=r.max_steps, teacher=dpo_adapter, train_uri=dataset_splits.uri("train"),
                       val_uri=dataset_splits.uri("validation"), cache_uri=artifacts.shared_uri("teacher_cache"),
                       params=r.distill)
    return train_stage(context, recipe=r, mlflow=mlflow, launcher=launcher, spec=spec, section="distill",
                       params=r.distill, splits=dataset_splits, upstream={"dpo_adapter": dpo_adapter},
                       title="Distillation loss")
