"""Imports flow one way: tuneline <- resources, assets <- pipelines. tuneline never imports dagster."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n.split(".")[0] for n in names}


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", package_files("tuneline"), ids=lambda p: str(p.relative_to(ROOT)))
def test_tuneline_never_imports_dagster_or_upper_layers(path: Path) -> None:
    mods = imported_modules(path)
    allowed_pipes = path.relative_to(ROOT).parts[:2] == ("tuneline", "recipes")
    dagster_mods = {m for m in mods if m == "dagster" or (m.startswith("dagster_") and m != "dagster_pipes")}
    assert not dagster_mods, f"{path} imports {dagster_mods}: tuneline/ is pure logic"
    if not allowed_pipes:
        assert "dagster_pipes" not in mods, f"{path}: only tuneline/recipes may speak Dagster Pipes"
    assert not mods & {"assets", "resources", "pipelines"}, f"{path} imports an upper layer: {mods}"


@pytest.mark.parametrize("package", ["resources", "assets"])
def test_resources_and_assets_do_not_import_pipelines(package: str) -> None:
    for path in package_files(package):
        assert "pipelines" not in imported_modules(path), f"{path} imports pipelines"


def test_resources_do_not_import_assets() -> None:
    for path in package_files("resources"):
        assert "assets" not in imported_modules(path), f"{path} imports assets"


def test_the_check_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom dagster import asset\n")
    assert "dagster" in imported_modules(bad)


def asset_modules() -> list[Path]:
    return [p for p in sorted((ROOT / "assets").glob("*.py")) if not p.name.startswith("_")]


@pytest.mark.parametrize("path", asset_modules(), ids=lambda p: p.stem)
def test_each_asset_module_is_one_stage_named_like_its_tuneline_twin(path: Path) -> None:
    """assets/<stage>.py has a tuneline module or package of the same name: any stage is found in one hop."""
    twins = [p for p in (ROOT / "tuneline").rglob(path.stem + "*") if p.stem == path.stem]
    assert twins, f"{path.name}: no tuneline/**/{path.stem}.py or tuneline/{path.stem}/ beside it"


@pytest.mark.parametrize("path", asset_modules(), ids=lambda p: p.stem)
def test_asset_bodies_stay_short(path: Path) -> None:
    """An asset body resolves config, takes its inputs, calls tuneline, persists and returns metadata; logic that
    grows beyond a screen belongs in a named tuneline function with its own tests."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.decorator_list:
            docstring = isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
            first = node.body[1] if docstring and len(node.body) > 1 else node.body[0]
            lines = node.end_lineno - first.lineno + 1  # the body below the signature and docstring
            assert lines <= 40, f"{path.name}:{node.name} has a {lines}-line body (a screen is about 40)"
