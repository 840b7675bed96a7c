"""Rendering shared by every command, so they all look alike."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ticketctl.cli.common import console, plain
from ticketctl.prune import Events, Round


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _dataset(d: dict[str, Any]) -> str:
    if not d.get("name"):
        return "-"
    sizes = "/".join(str(d[k]) for k in ("train_size", "val_size", "test_size") if k in d)
    return f"{d['name']} (train/val/test {sizes})" if sizes else str(d["name"])


def ticket_table(info: dict[str, Any]) -> None:
    table = Table(title=f"{plain(info.get('file', ''))}  "
                        f"[dim]({plain(info['kind'])}, {plain(info['arch'])})[/]")
    table.add_column("layer", overflow="fold")
    table.add_column("shape", overflow="fold")
    table.add_column("kept", justify="right", overflow="fold")
    table.add_column("total", justify="right", overflow="fold")
    table.add_column("density", justify="right", overflow="fold")
    for row in info["layers"]:
        table.add_row(plain(row["name"]), "x".join(str(s) for s in row["shape"]),
                      f"{row['kept']:,}",
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
        console.print(f"[bold]{plain(f'{key:>13}')}[/] "
                      f"{plain(value) if value is not None else '-'}", highlight=False)
    for key, value in info["hashes"].items():
        console.print(f"[bold]{key:>13}[/] {plain(value)}", highlight=False)


class ProgressEvents(Events):
    """Draws one bar per training: round, epoch, accuracies, time left."""

    def __init__(self, progress, verbose: bool) -> None:
        self.progress = progress
        self.verbose = verbose
        self.task = None

    def training(self, label: str, first_epoch: int, last_epoch: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        name = "dense" if label == "dense" else label.replace("-trial-0", "")
        self.task = self.progress.add_task(name, total=last_epoch - first_epoch + 1, info="")

    def epoch(self, s) -> None:
        self.progress.update(self.task, advance=1,
                             info=f"ep {s.epoch} val {s.val_accuracy or 0:.2f}% "
                                  f"test {s.test_accuracy:.2f}%")

    def stage(self, what: str) -> None:
        if self.verbose:
            self.progress.console.print(f"[bold]{plain(what)}[/]", highlight=False)

    def round(self, r: Round) -> None:
        if not self.verbose:
            return
        mark = "[green]accepted" if r.accepted else "[red]reverted"
        self.progress.console.print(
            f"round {r.round}: rate {r.rate} density {pct(r.density, 3)} "
            f"accuracy {r.accuracy:.2f}% {mark}", highlight=False)


def rounds_table(rounds: list[Round], dense_accuracy: float, ticket_accuracy: float,
                 density: float) -> Table:
    table = Table(title=f"dense {dense_accuracy:.2f}% -> ticket "
                        f"{ticket_accuracy:.2f}% at {100 * density:.3f}% density")
    for col in ("round", "rate", "density", "accuracy", "accepted"):
        table.add_column(col, justify="right", overflow="fold")
    for r in rounds:
        table.add_row(str(r.round), str(r.rate), pct(r.density, 3), f"{r.accuracy:.2f}%",
                      "yes" if r.accepted else "[red]no")
    return table


def attacks_table(reports: list[dict[str, Any]]) -> Table:
    """One row per attack and strength: accuracy, the signature's p-value (plain and behind
    the magnitude-floor defence), trigger accuracy and the verdict."""
    table = Table(title="attacks on the signed, trigger-marked model")
    for col in ("attack", "strength", "accuracy", "message", "p", "p defended", "trigger",
                "verified"):
        table.add_column(col, justify="right", overflow="fold")
    for rep in reports:
        for r in rep["rows"]:
            d = r.get("details") or {}
            table.add_row(
                rep["attack"], f"{100 * r['strength']:g}%", f"{r['accuracy']:.1f}%",
                plain(r["message"]) if r["message"] else "-",
                "-" if r["p_value"] is None else f"{r['p_value']:.1e}",
                "-" if d.get("defended_p_value") is None else f"{d['defended_p_value']:.1e}",
                "-" if r["trigger_accuracy"] is None else f"{r['trigger_accuracy']:.0f}%",
                "yes" if r["verified"] else "[red]no")
    return table
