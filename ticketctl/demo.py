"""The demo pipeline on the embedded digits dataset, runnable on any CPU in about a minute."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ticketctl.artifacts import save_ticket
from ticketctl.artifacts.describe import describe_file
from ticketctl.errors import TicketctlError
from ticketctl.plots import plot_search
from ticketctl.prune import Events, find_ticket, resolve_settings


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")


def run_demo(
    out_dir: Path,
    force: bool = False,
    device: str = "cpu",
    events: Events | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Find an extreme ticket for the digits CNN (dense training, IMP with rewinding, the
    extreme search), save the ticket, the trained model and a plot, and describe the ticket."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise TicketctlError(f"{out_dir} exists and is not empty; pass --force or another "
                             "--out-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    settings = resolve_settings("demo", train={"seed": seed})
    result = find_ticket(settings, out_dir / "run", force=True, device=device, events=events)
    ticket = save_ticket(result.ticket, out_dir / "digits.ticket.safetensors", force=force)
    trained = save_ticket(result.trained, out_dir / "digits.trained.safetensors", force=force)
    plot = plot_search(result.rounds, result.dense_accuracy, out_dir / "search.png",
                       title="digits_cnn on digits: extreme-ticket search", force=force,
                       tolerance=settings.search.tolerance)
    return {
        "out_dir": str(out_dir),
        "find": result.summary(),
        "files": [str(ticket), str(trained), str(plot)],
        "inspect": describe_file(ticket),
        "seconds": time.perf_counter() - t0,
    }
