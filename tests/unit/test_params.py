from __future__ import annotations

import re
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


def test_extends_takes_the_parent_and_overrides_key_by_key(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "parent.yaml").write_text(yaml.safe_dump(
        {**MINIMAL, "sft": {"method": "lora", "learning_rate": 0.01, "lora": {"r": 8, "alpha": 16}}}))
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": "../parent.yaml", "name": "c", "sft": {"lora": {"r": 4}}}))
    recipe = load_recipe(child)
    assert recipe.name == "c" and recipe.sft.method == "lora" and recipe.sft.learning_rate == 0.01
    assert (recipe.sft.lora.r, recipe.sft.lora.alpha) == (4, 16)  # merged inside sections, not replaced
    assert recipe.data.demo is not None  # untouched sections come from the parent


def test_the_demo_variants_differ_from_the_demo_only_where_they_say() -> None:
    demo = load_recipe(ROOT / "configs" / "demo.yaml").flat()
    expected = {
        "demo-rl.yaml": {"name", "alignment.method"},
        "demo-adapter.yaml": {"name", "sft.method", "sft.learning_rate", "sft.adapter.reduction_factor",
                              "hpo.space.learning_rate", "sft.max_steps"},
    }
    for name, keys in expected.items():
        variant = load_recipe(ROOT / "configs" / name).flat()
        assert {k for k in demo if demo[k] != variant.get(k)} == keys, name


@pytest.mark.parametrize("text, message", [
    ("extends: missing.yaml\nname: x\n", "missing.yaml does not exist"),
    ("extends: self.yaml\nname: x\n", "makes a cycle"),
    ("extends: [a.yaml]\n", "extends: is the path of one recipe file"),
])
def test_bad_extends_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "self.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=re.escape(message)) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_overrides_and_step_cap() -> None:
    recipe = build(Recipe, MINIMAL).with_overrides(seed=5, max_steps=10, sample_fraction=0.5)
    assert (recipe.seed, recipe.max_steps, recipe.data.sample_fraction) == (5, 10, 0.5)
    assert recipe.steps(300) == 10 and recipe.steps(4) == 4
    assert build(Recipe, MINIMAL).steps(300) == 300


@pytest.mark.parametrize("changes, needle", [
    ({"sft": {"method": "prefix"}, "compute": {"gradient_checkpointing": True}},
     "sft.method: prefix with compute.gradient_checkpointing: true cannot continue the prefix"),
    ({"gate": {"candidate": "student"}, "distill": {"enabled": False}}, "gate.candidate: student needs distill"),
    ({"dpo": {"enabled": False}, "distill": {"enabled": False}}, "gate.candidate: teacher (the DPO model) needs"),
    ({"data": {"sources": [{"path": "x.jsonl"}]}}, "task_accuracy needs an answer checker"),
    ({"sft": {"max_steps": 10, "eval_steps": 20, "save_steps": 20}}, "sft.eval_steps (20) > sft.max_steps (10)"),
    ({"hpo": {"trial_max_steps": 5, "eval_steps": 10}}, "1 <= eval_steps <= trial_max_steps"),
    ({"sft": {"early_stopping": {"patience": 0}}}, "early_stopping: need patience >= 1"),
    ({"dpo": {"beta": 0}}, "dpo: beta, learning_rate and epochs must be > 0"),
    ({"alignment": {"method": "rloo"}, "rl": {"enabled": False}}, "alignment.method: rloo needs rl.enabled: true"),
    ({"alignment": {"method": "grpo"}, "rl": {"algorithm": "rloo"}}, "alignment.method: grpo but rl.algorithm: rloo"),
    ({"reward": {"enabled": False}}, "rl.enabled: true needs reward.enabled: true"),
    ({"alignment": {"method": "ppo"}}, "alignment.method: 'ppo' is not one of 'dpo', 'rloo', 'grpo'"),
    ({"rl": {"batch_size": 6, "num_generations": 4}}, "rl.batch_size (6) must be a multiple of rl.num_generations"),
])
def test_impossible_combinations_fail_at_load_naming_the_keys(changes: dict, needle: str) -> None:
    from tuneline.params import Recipe, RecipeError, build

    data = {"name": "x", "model": {"build": "tiny"}, "data": {"demo": {}}}
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if key != "data" else value
    with pytest.raises(RecipeError, match=re.escape(needle)):
        build(Recipe, data)


@pytest.mark.parametrize("method", ["adapter", "multitask_prompt", "prompt", "lora", "ia3"])
def test_the_demo_recipe_takes_every_adapter_sft_method_with_every_later_stage_on(method: str) -> None:
    """Bottleneck adapters are bundled with their base for DPO, the reward model, RL and distillation (not merged);
    prompt-learning adapters are continued by DPO and RL; so switching only sft.method keeps every stage."""
    data = load_recipe(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml").to_dict()
    data["sft"]["method"] = method
    switched = build(Recipe, data)
    assert switched.sft.method == method and switched.dpo.enabled and switched.rl.enabled and switched.distill.enabled


def test_a_bad_recipe_is_one_line_on_stderr_and_exit_2(tmp_path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {build: tiny}\ndata: {demo: {}}\nsft: {lerning_rate: 0.1}\n")
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--recipe", str(bad)], capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "TUNELINE_HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "unknown key sft.lerning_rate" in proc.stderr and str(bad) in proc.stderr
    missing = subprocess.run([sys.executable, "-m", "pipelines.cli", "lineage", "nope@champion"],
                             capture_output=True, text=True, timeout=120,
                             env={**__import__("os").environ, "TUNELINE_HOME": str(tmp_path)})
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope" in missing.stderr


def test_alignment_method_picks_the_rl_algorithm() -> None:
    from tuneline.params import Recipe, build

    base = {"name": "x", "model": {"build": "tiny"}, "data": {"demo": {}}}
    assert build(Recipe, base).rl_algorithm() == "rloo"  # dpo is the candidate; the RL row still runs RLOO
    assert build(Recipe, {**base, "alignment": {"method": "grpo"}}).rl_algorithm() == "grpo"
    assert build(Recipe, {**base, "rl": {"algorithm": "grpo"}}).rl_algorithm() == "grpo"
