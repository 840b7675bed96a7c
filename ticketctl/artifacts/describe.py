"""What `inspect` shows, as plain data: the CLI renders it as a table or JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ticketctl.artifacts.ticket import (
    FORMAT_VERSION,
    Kind,
    Ticket,
    load_ticket,
)


def describe(ticket: Ticket) -> dict[str, Any]:
    meta = ticket.metadata()
    return {
        "kind": ticket.kind.value,
        "arch": ticket.arch,
        "density": ticket.density,
        "kept": ticket.mask.num_kept,
        "prunable": ticket.mask.num_total,
        "layers": ticket.mask.layer_report(),
        "metadata": {k: v for k, v in meta.items()
                     if k not in ("masks_sha256", "tensors_sha256")},
        "hashes": {"masks_sha256": meta["masks_sha256"],
                   "tensors_sha256": meta["tensors_sha256"]},
        # the version the ticket is written in (a key of a built-in in the sparse layout)
        "format_version": FORMAT_VERSION,
        "layout": "sparse" if ticket.kind == Kind.KEY and ticket.builtin else "dense",
    }


def describe_file(path: str | Path) -> dict[str, Any]:
    out = describe(load_ticket(path))
    out["file"] = str(path)
    return out
