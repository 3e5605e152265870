"""Small PNG charts for materialization pages and MLflow artifacts (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def plot_curves(
    series: dict[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str,
    xlabel: str = "step",
    ylabel: str = "loss",
) -> Path:
    """Draw one line per named series of (x, y) points and write a PNG to ``path``.

    Empty series are skipped; with no points at all the chart still renders (an empty axis with the
    title), so a stage never fails for want of a picture.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        drawn = 0
        for name, points in series.items():
            points = list(points)
            if not points:
                continue
            xs = [float(p[0]) for p in points]
            ys = [float(p[1]) for p in points]
            ax.plot(xs, ys, marker="." if len(points) < 40 else None, label=name)
            drawn += 1
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if drawn > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


def save_figure(fig: Any, path: str | Path, *, dpi: int = 100) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` (its folder made) without a timestamp, and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=dpi, metadata={"Software": None})
    finally:
        plt.close(fig)
    return path
