"""Matplotlib, set up once: the Agg backend (no display: workers, servers, tests), one save,
and the run's learning-curve figure.

Nothing here imports from ``zosam``: every layer may use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG, cropped to what it draws (labels and legends outside the axes
    included), and close it."""
    plt = pyplot()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def learning_curve_figure(history: list[dict[str, Any]], title: str = ""):
    """Train/test loss and accuracy per epoch, as a matplotlib figure (Agg backend)."""
    plt = pyplot()
    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], label="train")
    ev = [h for h in history if h.get("test_acc") is not None]
    if ev:
        ax_loss.plot([h["epoch"] + 1 for h in ev], [h["test_loss"] for h in ev], "o-", label="test")
        ax_acc.plot([h["epoch"] + 1 for h in ev], [h["test_acc"] for h in ev], "o-", label="test")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
