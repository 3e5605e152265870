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
        upstream: Optional[Mapping[str, str]] = None,
        parent_run_id: Optional[str] = None,
    ) -> str:
        """Create this asset's MLflow run, tagged for lineage; returns the run id."""
        asset = context.asset_key.to_user_string()
        tags = {
            TAG_DAGSTER_RUN: context.run.run_id,
            TAG_ASSET: asset,
            TAG_DATASET: dataset_sha256,
            TAG_GIT: git_sha(),
            TAG_RECIPE: recipe.name,
        }
        tags.update({TAG_PARENT_PREFIX + stage: run_id for stage, run_id in (upstream or {}).items()})
        return self.tracker().start_run(
            recipe.experiment_name(), run_name=f"{asset}-{context.run.run_id[:8]}", tags=tags,
            params=params, parent_run_id=parent_run_id,
        )
