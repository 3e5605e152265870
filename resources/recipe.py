"""The recipe a run uses, with the few knobs the Launchpad exposes."""

from __future__ import annotations

from typing import Optional

import dagster as dg
from pydantic import Field

from tuneline.params import Recipe, load_recipe
from tuneline.paths import resolve


class RecipeResource(dg.ConfigurableResource):
    """Pick a recipe (a YAML file in configs/) and override seed, max steps or sample fraction."""

    path: str = Field(default="configs/demo.yaml", description="Recipe file, relative to the checkout or absolute.")
    seed: Optional[int] = Field(default=None, description="Override the recipe's seed.")
    max_steps: Optional[int] = Field(default=None, description="Cap every training loop at this many steps.")
    sample_fraction: Optional[float] = Field(default=None, description="Keep this fraction of the data rows.")
    retrain: bool = Field(
        default=False,
        description="Retrain: add the rows in drift.incoming_dir and train on them plus a replay sample "
        "of the previous training data (drift.replay_ratio).",
    )

    def load(self) -> Recipe:
        recipe = load_recipe(resolve(self.path))
        return recipe.with_overrides(seed=self.seed, max_steps=self.max_steps, sample_fraction=self.sample_fraction)
