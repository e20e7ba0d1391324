"""Small PNG charts for MLflow and the README (DVC renders its own plots from the CSVs)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def training_chart(path: Path, history: list[dict]) -> None:
    """Losses (log scale: one bad epoch must not flatten the rest) beside val Dice, per epoch."""
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in history]
    fig, (losses, dice) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    for key in ("train_loss", "val_loss"):
        losses.plot(epochs, [r[key] for r in history], marker="o", markersize=3, label=key)
    losses.set(yscale="log", xlabel="epoch", title="loss")
    losses.legend(fontsize=8)
    dice.plot(epochs, [r["val_dice"] for r in history], marker="o", markersize=3, color="tab:green")
    dice.set(xlabel="epoch", title="val Dice")
    for ax in (losses, dice):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def line_chart(
    path: Path, x: list[float], series: dict[str, list[float]], xlabel: str, ylabel: str, title: str
) -> None:
    """Write a PNG with one line per series."""
    plt = _pyplot()
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
