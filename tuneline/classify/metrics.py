"""Classifier metrics: accuracy and macro-F1 with bootstrap intervals, per-class F1, the confusion matrix,
calibration (expected calibration error and the reliability diagram's bins), latency and throughput, and the
plots. numpy only (imported inside), so the figures are the same wherever they are computed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tuneline.plots import save_figure


def confusion(y_true: Sequence[int], y_pred: Sequence[int], k: int) -> Any:
    """(k, k) counts: row = true class, column = predicted class."""
    import numpy as np

    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m


def f1_per_class(conf: Any) -> tuple[Any, Any, Any]:
    """(precision, recall, f1) per class from a confusion matrix (0 where undefined)."""
    import numpy as np

    tp = np.diag(conf).astype(np.float64)
    predicted, actual = conf.sum(axis=0), conf.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], k: int) -> float:
    """Mean F1 over the classes that occur in the true or the predicted labels (scikit-learn's macro average)."""
    conf = confusion(y_true, y_pred, k)
    present = (conf.sum(axis=0) + conf.sum(axis=1)) > 0
    return float(f1_per_class(conf)[2][present].mean()) if present.any() else 0.0


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    import numpy as np

    return float((np.asarray(y_true) == np.asarray(y_pred)).mean())


def _indices(n: int, samples: int, seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def bootstrap(y_true: Sequence[int], y_pred: Sequence[int], k: int, *, samples: int = 1000,
              confidence: float = 0.95, seed: int = 0) -> dict[str, dict[str, float]]:
    """Accuracy and macro-F1, each with a percentile-bootstrap interval over the examples."""
    import numpy as np

    y, p = np.asarray(y_true), np.asarray(y_pred)
    idx = _indices(len(y), samples, seed)
    tail = (1 - confidence) / 2 * 100
    acc = (y[idx] == p[idx]).mean(axis=1)
    f1 = np.array([macro_f1(y[row], p[row], k) for row in idx])
    return {name: {"mean": point, "low": float(np.percentile(draws, tail)),
                   "high": float(np.percentile(draws, 100 - tail))}
            for name, point, draws in (("accuracy", accuracy(y, p), acc), ("macro_f1", macro_f1(y, p, k), f1))}


def paired_macro_f1_diff(y_true: Sequence[int], pred_a: Sequence[int], pred_b: Sequence[int], k: int, *,
                         samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(macro-F1 of a minus b, low, high): both scored on the same bootstrap resamples of the examples."""
    import numpy as np

    y, a, b = np.asarray(y_true), np.asarray(pred_a), np.asarray(pred_b)
    idx = _indices(len(y), samples, seed)
    diffs = np.array([macro_f1(y[r], a[r], k) - macro_f1(y[r], b[r], k) for r in idx])
    tail = (1 - confidence) / 2 * 100
    return (macro_f1(y, a, k) - macro_f1(y, b, k), float(np.percentile(diffs, tail)),
            float(np.percentile(diffs, 100 - tail)))


def calibration(probs: Any, y_true: Sequence[int], bins: int = 15) -> dict[str, Any]:
    """Expected calibration error of the top-class confidence, and the reliability diagram's bins."""
    import numpy as np

    probs = np.asarray(probs, dtype=np.float64)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == np.asarray(y_true)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        gap = abs(correct[mask].mean() - conf[mask].mean())
        ece += mask.mean() * gap
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(mask.sum()),
                     "confidence": float(conf[mask].mean()), "accuracy": float(correct[mask].mean())})
    return {"ece": float(ece), "bins": rows}


def report(probs: Any, y_true: Sequence[int], labels: Sequence[str], *, samples: int = 1000,
           confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Everything the evaluation shows about one classifier on one labelled set."""
    import numpy as np

    probs = np.asarray(probs)
    pred = probs.argmax(axis=1)
    k = len(labels)
    conf = confusion(y_true, pred, k)
    precision, recall, f1 = f1_per_class(conf)
    support = conf.sum(axis=1)
    boot = bootstrap(y_true, pred, k, samples=samples, confidence=confidence, seed=seed)
    cal = calibration(probs, y_true)
    return {
        "n": int(len(pred)), "accuracy": boot["accuracy"]["mean"], "macro_f1": boot["macro_f1"]["mean"],
        "ci": {**boot, "confidence": confidence, "samples": samples},
        "per_class": {labels[i]: {"f1": float(f1[i]), "precision": float(precision[i]), "recall": float(recall[i]),
                                  "support": int(support[i])} for i in range(k)},
        "labels": list(labels), "confusion": conf.tolist(), "ece": cal["ece"], "reliability": cal["bins"],
        "predictions": [int(x) for x in pred],
    }


def latency(predict: Callable[[list[str]], Any], texts: Sequence[str], *, batch_sizes: Sequence[int] = (1, 32),
            repeats: int = 5) -> dict[str, dict[str, float]]:
    """Per batch size: median milliseconds per call and texts per second (after one warm-up call)."""
    import numpy as np

    out = {}
    for bs in batch_sizes:
        batch = [texts[i % len(texts)] for i in range(bs)]
        predict(batch)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            predict(batch)
            times.append(time.perf_counter() - t)
        p50 = float(np.median(times))
        out[f"batch_{bs}"] = {"p50_ms": p50 * 1000, "texts_per_second": bs / p50 if p50 > 0 else float("inf")}
    return out


def plot_confusion(conf: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path, *, title: str) -> Path:
    """The confusion matrix (rows true, columns predicted), normalized by row, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(conf, dtype=np.float64)
    m = np.divide(m, m.sum(axis=1, keepdims=True), out=np.zeros_like(m), where=m.sum(axis=1, keepdims=True) > 0)
    k = len(labels)
    size = min(16, 3 + 0.18 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    if k <= 40:
        ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(k), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return save_figure(fig, path, dpi=90)


def plot_reliability(bins: Sequence[dict[str, Any]], ece: float, path: str | Path, *, title: str) -> Path:
    """Accuracy against confidence per bin (the diagonal is perfect calibration), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["accuracy"] for b in bins],
           width=[b["high"] - b["low"] for b in bins], alpha=0.7, edgecolor="black", label="accuracy per bin")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title} (ECE {ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path, dpi=90)


def summary_line(rep: dict[str, Any], name: Optional[str] = None) -> str:
    ci = rep["ci"]["macro_f1"]
    return (f"{name + ': ' if name else ''}accuracy {rep['accuracy']:.3f}, macro-F1 {rep['macro_f1']:.3f} "
            f"[{ci['low']:.3f}, {ci['high']:.3f}], ECE {rep['ece']:.3f}, n {rep['n']}")
