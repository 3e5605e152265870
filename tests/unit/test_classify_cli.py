"""``tuneline classify``: the JSON fields on a labelled file, and exit 2 with one line for bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _minilm import minilm2  # noqa: F401 - the fixture


@pytest.fixture(scope="module")
def model_dir(minilm2: str, tmp_path_factory) -> Path:
    from tuneline.classify.data import LabelSet
    from tuneline.classify.model import load_encoder_classifier, save_classifier

    model, tokenizer = load_encoder_classifier(minilm2, LabelSet(("0", "1")))
    return save_classifier(model, tokenizer, tmp_path_factory.mktemp("clf") / "model", info={"max_length": 16})


def _run(*argv: str) -> int:
    from tuneline.classify.cli import main

    return main(list(argv))


def test_json_report(model_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "d.csv"
    data.write_text("label,sentence\n0,a dull film\n1,a joy to watch\n1,great fun\n", encoding="utf-8")
    assert _run("--model", str(model_dir), "--data", str(data), "--json", "--bootstrap", "50") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 3 and 0 <= out["accuracy"] <= 1 and 0 <= out["macro_f1"] <= 1
    assert set(out["per_class"]) == {"0", "1"} and sum(map(sum, out["confusion"])) == 3


@pytest.mark.parametrize("content,message", [
    ("label,sentence\n0,fine\n7,unknown label here\n", "labels the model does not know ('7')"),
    ("label,sentence\n0,fine\n1\n", "line 2: missing_column"),
    ("label,sentence\n0,fine\n1,   \n", "line 2: empty sentence"),
    ("", "file is empty"),
    ("words without columns\nmore words\n", "line 1: missing_field (text)"),
    ("label;sentence\n0;fine\n", "looks ';'-separated"),
])
def test_bad_data_exits_2_with_one_line(model_dir: Path, tmp_path: Path, capsys, content: str, message: str) -> None:
    data = tmp_path / "bad.csv"
    data.write_text(content, encoding="utf-8")
    assert _run("--model", str(model_dir), "--data", str(data)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tuneline classify: ") and message in err


def test_missing_file_exits_2(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert _run("--model", str(model_dir), "--data", str(tmp_path / "nope.csv")) == 2
    assert "no such file" in capsys.readouterr().err
