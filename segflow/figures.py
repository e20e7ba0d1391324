"""Small PNG charts for MLflow and the README (DVC renders its own plots from the CSVs)."""

from __future__ import annotations

from pathlib import Path


def line_chart(
    path: Path, x: list[float], series: dict[str, list[float]], xlabel: str, ylabel: str, title: str
) -> None:
    """Write a PNG with one line per series (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for name, values in series.items():
        ax.plot(x, values, marker="o", markersize=3, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
