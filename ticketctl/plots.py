"""PNG plots (matplotlib, headless), written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ticketctl.artifacts.io import atomic_path
from ticketctl.prune.search import Round


def plot_search(rounds: list[Round], dense_accuracy: float, path: str | Path,
                title: str = "", force: bool = False, tolerance: float | None = None) -> Path:
    """Accuracy against density for every round, accepted and reverted, beside the dense line."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.axhline(dense_accuracy, color="0.3", ls="--", lw=1, label=f"dense {dense_accuracy:.2f}%")
    acc = [r for r in rounds if r.accepted]
    rej = [r for r in rounds if not r.accepted]
    if tolerance is not None:
        ax.axhspan(dense_accuracy - tolerance, dense_accuracy, color="0.85", alpha=0.5,
                   label=f"matches dense (within {tolerance:g} point)")
    ax.plot([100.0] + [100 * r.density for r in acc],
            [dense_accuracy] + [r.accuracy for r in acc], "o-", color="tab:blue",
            label="dense, then accepted rounds")
    if rej:
        ax.plot([100 * r.density for r in rej], [r.accuracy for r in rej], "x",
                color="tab:red", ms=8, label="reverted rounds")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.invert_xaxis()
    ax.set_xlabel("density (% of prunable weights kept, log scale)")
    ax.set_ylabel("test accuracy at best validation (%)")
    ax.set_title(title or "extreme-ticket search")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, force) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def plot_attack(rows: list[dict[str, Any]], reference: float | None, path: str | Path,
                title: str = "", force: bool = False) -> Path:
    """Accuracy and -log10 p-value against attack strength."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [100 * float(r["strength"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(xs, [r["accuracy"] for r in rows], "o-", color="tab:blue", label="test accuracy")
    if reference is not None:
        ax.axhline(reference - 1.0, color="0.5", ls="--", lw=1, label="matching line (-1 point)")
    ax.set_xlabel("attack strength (%)")
    ax.set_ylabel("test accuracy (%)")
    ps = [r.get("p_value") for r in rows]
    if any(p is not None for p in ps):
        ax2 = ax.twinx()
        ax2.plot(xs, [-math.log10(max(p, 1e-300)) if p is not None else float("nan")
                      for p in ps], "s--", color="tab:red", label="-log10 p (signature)")
        ax2.axhline(6, color="tab:red", lw=0.8, alpha=0.5)
        ax2.set_ylabel("-log10 p-value")
        ax2.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, force) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
