from __future__ import annotations

from pathlib import Path

import pytest

from tuneline.params import Recipe, RecipeError, build, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))

MINIMAL = {"name": "t", "model": {"build": "tiny"}, "data": {"demo": {}}}


def test_there_are_recipes() -> None:
    assert any(p.name == "demo.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.flat()  # flattens for MLflow params


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"sedd": 1}, "unknown key sedd"),
        ({"data": {"demo": {}, "sources": [{"path": "x", "formt": "csv"}]}}, "data.sources[0].formt"),
        ({"seed": "1"}, "seed: expected an integer"),
        ({"seed": True}, "seed: expected an integer"),
        ({"pretrain": {"learning_rate": "fast"}}, "pretrain.learning_rate: expected a number"),
        ({"sft": {"method": "magic"}}, "sft.method"),
        ({"sft": {"lora": {"r": 0}}}, "lora"),
        ({"split": {"stratify_by": "colour"}}, "split.stratify_by"),
        ({"model": {"build": "tiny", "name_or_path": "x"}}, "exactly one"),
        ({"model": {"build": "tiny", "tiny": {"hidden_size": 250}}}, "hidden_size"),
        ({"data": {"demo": {}, "sample_fraction": 0}}, "sample_fraction"),
        ({"name": None}, "name: expected a string"),
    ],
)
def test_bad_recipes_name_the_key(patch: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build(Recipe, {**MINIMAL, **patch})


def test_missing_required_key() -> None:
    with pytest.raises(RecipeError, match="missing key model"):
        build(Recipe, {"name": "x", "data": {"demo": {}}})


def test_load_recipe_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {build: tiny}\ndata: {demo: {}}\npretrain: {stepz: 3}\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: unknown key pretrain.stepz"):
        load_recipe(bad)


def test_overrides_and_step_cap() -> None:
    recipe = build(Recipe, MINIMAL).with_overrides(seed=5, max_steps=10, sample_fraction=0.5)
    assert (recipe.seed, recipe.max_steps, recipe.data.sample_fraction) == (5, 10, 0.5)
    assert recipe.steps(300) == 10 and recipe.steps(4) == 4
    assert build(Recipe, MINIMAL).steps(300) == 300
