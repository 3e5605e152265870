"""MLflow tracking as a resource: a local SQLite file by default, any MLflow server in production."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import dagster as dg
from pydantic import Field

from tuneline.params import Recipe
from tuneline.tracking import (
    TAG_ASSET,
    TAG_DAGSTER_RUN,
    TAG_DATASET,
    TAG_GIT,
    TAG_PARENT_PREFIX,
    TAG_RECIPE,
    TAG_ROOT_RUN,
    Tracker,
    git_sha,
)


class MlflowResource(dg.ConfigurableResource):
    """One MLflow tracking store. Each asset owns its run and returns the run id as data."""

    tracking_uri: str = Field(description="MLflow tracking URI (sqlite:////abs/path.db, postgresql://..., http://...).")
    registry_uri: Optional[str] = Field(default=None, description="Model registry URI; defaults to tracking_uri.")
    artifact_root: Optional[str] = Field(default=None, description="Artifact folder for experiments this creates.")

    def tracker(self) -> Tracker:
        return Tracker(self.tracking_uri, self.registry_uri, self.artifact_root)

    def start_stage_run(
        self,
        context: dg.AssetExecutionContext,
        recipe: Recipe,
        *,
        dataset_sha256: Optional[str] = None,
        params: Optional[Mapping[str, Any]] = None,
        upstream: Optional[Mapping[str, Optional[str]]] = None,
        parent_run_id: Optional[str] = None,
    ) -> str:
        """This asset's MLflow run, tagged for lineage; returns the run id.

        A retry of the step (same Dagster run, or a re-execution of it) reopens the run the failed attempt
        made, so a resumed trainer's curve continues in one MLflow run instead of being split over two.
        """
        asset = context.asset_key.to_user_string()
        root = context.run.root_run_id or context.run.run_id
        tracker = self.tracker()
        previous = tracker.find_runs(recipe.experiment_name(),
                                     f"tags.`{TAG_ROOT_RUN}` = '{root}' and tags.`{TAG_ASSET}` = '{asset}'")
        if previous:
            run_id = previous[0].info.run_id
            tracker.client().update_run(run_id, status="RUNNING")
            tracker.set_tags(run_id, {"tuneline.attempts": int(previous[0].data.tags.get("tuneline.attempts", 1)) + 1})
            return run_id
        tags = {
            TAG_DAGSTER_RUN: context.run.run_id,
            TAG_ROOT_RUN: root,
            TAG_ASSET: asset,
            TAG_DATASET: dataset_sha256,
            TAG_GIT: git_sha(),
            TAG_RECIPE: recipe.name,
        }
        tags.update({TAG_PARENT_PREFIX + stage: run_id for stage, run_id in (upstream or {}).items() if run_id})
        return tracker.start_run(
            recipe.experiment_name(), run_name=f"{asset}-{context.run.run_id[:8]}", tags=tags,
            params=params, parent_run_id=parent_run_id,
        )


class StudyStorage(dg.ConfigurableResource):
    """Where Optuna keeps studies: a SQLAlchemy URL (PostgreSQL in production, from the environment), or
    SQLite under the artifact store's shared folder when unset. A recipe's ``hpo.storage`` overrides it."""

    url: Optional[str] = Field(default=None, description="SQLAlchemy URL; None = SQLite in the shared folder.")

    def resolve(self, recipe_storage: Optional[str], local_dir: Any) -> str:
        from pathlib import Path

        return recipe_storage or self.url or "sqlite:///" + str(Path(local_dir) / "optuna.db")
