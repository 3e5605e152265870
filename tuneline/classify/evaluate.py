"""Evaluate a classifier (or any (n, K) probabilities) on a labelled set: the metrics report, the confusion
and reliability PNGs, latency and throughput; and the ``tuneline classify`` evaluation of a saved model on a
labelled file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from tuneline.classify.data import Examples, LabelError, LabelSet
from tuneline.classify.metrics import latency, plot_confusion, plot_reliability, report

ROWS_KEPT = ("predictions",)  # per-example fields the full report keeps (the gate's paired comparison)


def evaluate_probs(probs: Any, test: Examples, labels: LabelSet, *, name: str, out_dir: Optional[Path] = None,
                   samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """The report of ``probs`` against the test labels; with ``out_dir`` the two plots are written there."""
    y = labels.encode(test.labels, f"{name}: test split")
    rep = report(probs, y, list(labels.names), samples=samples, confidence=confidence, seed=seed)
    rep["name"] = name
    rep["y_true"] = y
    if out_dir is not None:
        out_dir = Path(out_dir)
        rep["plots"] = {
            "confusion": str(plot_confusion(rep["confusion"], labels.names, out_dir / f"{name}_confusion.png",
                                            title=f"{name}: confusion (row-normalized)")),
            "reliability": str(plot_reliability(rep["reliability"], rep["ece"], out_dir / f"{name}_reliability.png",
                                                title=f"{name}: reliability")),
        }
    return rep


def evaluate_model(model: Any, tokenizer: Any, labels: LabelSet, test: Examples, *, name: str, max_length: int,
                   out_dir: Optional[Path] = None, samples: int = 1000, confidence: float = 0.95, seed: int = 0,
                   timing: bool = True, bf16: bool = False) -> tuple[dict[str, Any], Any]:
    """(report with latency at batch 1 and 32, probabilities) of a loaded classifier on the test examples."""
    from tuneline.classify.model import predict_proba

    probs = predict_proba(model, tokenizer, test.texts, max_length=max_length, bf16=bf16)
    rep = evaluate_probs(probs, test, labels, name=name, out_dir=out_dir, samples=samples, confidence=confidence,
                         seed=seed)
    if timing:
        rep["latency"] = latency(lambda batch: predict_proba(model, tokenizer, batch, max_length=max_length,
                                                             bf16=bf16), list(test.texts))
    return rep, probs


def headline(rep: dict[str, Any]) -> dict[str, Any]:
    """The report without per-example rows and the confusion matrix: what metadata and tables carry."""
    keep = ("name", "n", "accuracy", "macro_f1", "ece", "ci", "latency", "plots")
    return {k: rep[k] for k in keep if k in rep}


def read_labelled_file(path: str | Path, *, delimiter: Optional[str] = None, text_column: Optional[str] = None,
                       label_column: Optional[str] = None) -> Examples:
    """Texts and labels of a labelled file (CSV/TSV/JSONL/...); rows ingest or validation would reject are an
    error naming the file and line (an evaluation must not silently skip rows)."""
    from tuneline.data.ingest import read_source
    from tuneline.params import DataSource

    fields = {k: v for k, v in (("text", text_column), ("label", label_column)) if v}
    result = read_source(DataSource(path=str(path), schema="classification", fields=fields, delimiter=delimiter))
    if result.rejected:
        bad = result.rejected[0]
        raise LabelError(f"{path}: line {bad.line}: {bad.reason}"
                         f"{' (' + bad.field + ')' if bad.field else ''}: {bad.detail} "
                         f"({len(result.rejected)} unreadable rows)")
    blank = [r for r in result.records if r.meta.get("blank_fields")]
    if blank:
        raise LabelError(f"{path}: line {blank[0].line}: empty {', '.join(blank[0].meta['blank_fields'])} "
                         f"({len(blank)} rows with an empty text or label)")
    return Examples(tuple(r.prompt_text() for r in result.records), tuple(r.label.strip() for r in result.records))


def classify_file(model_dir: str | Path, path: str | Path, *, samples: int = 1000, delimiter: Optional[str] = None,
                  text_column: Optional[str] = None, label_column: Optional[str] = None) -> dict[str, Any]:
    """``tuneline classify``: accuracy, macro-F1 (with CIs), n, per-class figures and the confusion matrix of a
    saved classifier on a labelled file. Labels the model does not know are a :class:`LabelError`."""
    from tuneline.classify.model import LABELS_FILE, load_classifier

    model, tokenizer, labels = load_classifier(model_dir)
    info = json.loads((Path(model_dir) / LABELS_FILE).read_text()) if (Path(model_dir) / LABELS_FILE).is_file() else {}
    data = read_labelled_file(path, delimiter=delimiter, text_column=text_column, label_column=label_column)
    known = {label.casefold(): label for label in labels.names}
    data = Examples(data.texts, tuple(known.get(label.casefold(), label) for label in data.labels))
    labels.encode(data.labels, str(path))
    rep, _ = evaluate_model(model, tokenizer, labels, data, name="classify", max_length=int(info.get("max_length", 128)),
                            samples=samples, timing=False)
    return {"accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"], "n": rep["n"], "ci": rep["ci"],
            "ece": rep["ece"], "per_class": rep["per_class"], "labels": rep["labels"], "confusion": rep["confusion"],
            "model": str(model_dir), "data": str(path)}
