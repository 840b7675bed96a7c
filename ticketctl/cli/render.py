"""Rendering shared by every command, so they all look alike."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ticketctl.cli.common import console


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _dataset(d: dict[str, Any]) -> str:
    if not d.get("name"):
        return "-"
    sizes = "/".join(str(d[k]) for k in ("train_size", "val_size", "test_size") if k in d)
    return f"{d['name']} (train/val/test {sizes})" if sizes else str(d["name"])


def ticket_table(info: dict[str, Any]) -> None:
    table = Table(title=f"{info.get('file', '')}  [dim]({info['kind']}, {info['arch']})[/]")
    table.add_column("layer")
    table.add_column("shape")
    table.add_column("kept", justify="right")
    table.add_column("total", justify="right")
    table.add_column("density", justify="right")
    for row in info["layers"]:
        table.add_row(row["name"], "x".join(str(s) for s in row["shape"]), f"{row['kept']:,}",
                      f"{row['total']:,}", pct(row["density"]))
    table.add_section()
    table.add_row("[bold]total", "", f"{info['kept']:,}", f"{info['prunable']:,}",
                  f"[bold]{pct(info['density'])}")
    console.print(table)
    meta = info["metadata"]
    fields = [("kind", meta["kind"]), ("arch", f"{meta['arch']} {meta.get('arch_args') or ''}"),
              ("classes", meta["num_classes"]), ("dataset", _dataset(meta.get("dataset") or {})),
              ("rewind epoch", meta.get("rewind_epoch")), ("seed", meta.get("seed"))]
    for key, value in (meta.get("extra") or {}).items():
        fields.append((key, value))
    for key, value in fields:
        console.print(f"[bold]{key:>13}[/] {value if value is not None else '-'}", highlight=False)
    for key, value in info["hashes"].items():
        console.print(f"[bold]{key:>13}[/] {value}", highlight=False)
