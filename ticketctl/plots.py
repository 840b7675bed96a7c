"""PNG plots (matplotlib, headless), written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ticketctl.artifacts.io import atomic_path
from ticketctl.prune.search import Round, SearchConfig


def search_title(arch: str, dataset: str, search: SearchConfig) -> str:
    """What the plot shows: the extreme-ticket search, or fixed-rate IMP with its rounds and
    rate."""
    if search.mode == "fixed":
        rounds = f"{search.rounds} rounds" if search.rounds is not None else "rounds"
        return f"{arch} on {dataset}: fixed-rate IMP, {rounds} at rate {search.rates[0]:g}"
    return f"{arch} on {dataset}: extreme-ticket search"


def density_ticks(lowest: float, highest: float = 100.0) -> list[float]:
    """Ticks for a log axis of density in percent, labelled as plain numbers: 1-2-5 steps
    (100, 50, 20, 10, 5, 2, 1, ...) between the lowest and highest density; finer when that
    leaves fewer than three, decades only when it would crowd the axis."""
    lo, hi = min(lowest, highest), max(lowest, highest)
    first, last = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    ticks: list[float] = []
    for steps in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5,
                                                              6, 7, 8, 9)):
        ticks = sorted({float(f"{m * 10.0 ** e:.6g}") for e in range(first, last + 1)
                        for m in steps if lo * (1 - 1e-9) <= m * 10.0 ** e <= hi * (1 + 1e-9)})
        if len(ticks) > 10 and steps == (1, 2, 5):
            return [t for t in ticks if math.log10(t).is_integer()] or ticks
        if len(ticks) >= 3:
            return ticks
    return ticks if len(ticks) >= 2 else sorted({float(f"{lo:.3g}"), float(f"{hi:.3g}")})


def _percent(value: float, _pos: Any = None) -> str:
    return f"{value:g}"


def search_figure(rounds: list[Round], dense_accuracy: float, title: str = "",
                  tolerance: float | None = None) -> Any:
    """The search plot as a Matplotlib figure: accuracy against density (log axis, plain
    percent labels) for every round, accepted and reverted, beside the dense line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.axhline(dense_accuracy, color="0.3", ls="--", lw=1, label=f"dense {dense_accuracy:.2f}%")
    shown = [r for r in rounds if r.density is not None and r.density > 0]  # a log axis
    acc = [r for r in shown if r.accepted]
    rej = [r for r in shown if not r.accepted]
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
    densities = [100.0] + [100 * r.density for r in shown]
    ticks = density_ticks(min(densities), max(densities))
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_percent))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.invert_xaxis()
    ax.set_xlabel("density (% of prunable weights kept, log scale)")
    ax.set_ylabel("test accuracy at best validation (%)")
    ax.set_title(title or "extreme-ticket search")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def plot_search(rounds: list[Round], dense_accuracy: float, path: str | Path,
                title: str = "", force: bool = False, tolerance: float | None = None) -> Path:
    """The search plot (`search_figure`) written as a PNG, atomically."""
    import matplotlib.pyplot as plt

    fig = search_figure(rounds, dense_accuracy, title, tolerance)
    try:
        with atomic_path(path, force) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def plot_attack(rows: list[dict[str, Any]], reference: float | None, path: str | Path,
                title: str = "", force: bool = False) -> Path:
    """Accuracy and -log10 p-value against attack strength."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = all(isinstance(r["strength"], (int, float)) for r in rows)
    # rates and sigmas in percent; named strengths (quantization formats) one tick each
    xs = [100 * float(r["strength"]) for r in rows] if numeric else list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if not numeric:
        ax.set_xticks(xs, [str(r["strength"]) for r in rows])
    ax.plot(xs, [float("nan") if r["accuracy"] is None else r["accuracy"] for r in rows], "o-",
            color="tab:blue", label="test accuracy" if any(r["accuracy"] is not None
                                                           for r in rows) else
            "test accuracy (not measured)")
    if reference is not None:
        ax.axhline(reference - 1.0, color="0.5", ls="--", lw=1, label="matching line (-1 point)")
    ax.set_xlabel("attack strength (%)" if numeric else "attack")
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
