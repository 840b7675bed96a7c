"""Rendering shared by every command, so they all look alike."""

from __future__ import annotations

import json
import textwrap
from typing import Any

from rich.console import Console
from rich.table import Table

from ticketctl.cli.common import console, plain, printable
from ticketctl.prune import Events, Round


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _dataset(d: dict[str, Any]) -> str:
    if not d.get("name"):
        return "-"
    sizes = "/".join(str(d[k]) for k in ("train_size", "val_size", "test_size") if k in d)
    text = f"{d['name']} (train/val/test {sizes})" if sizes else str(d["name"])
    rest = {k: v for k, v in d.items() if k not in ("name", "train_size", "val_size",
                                                     "test_size")}
    return text + (" " + _pretty(rest) if rest else "")


def _pretty(value: Any) -> str:
    """A metadata value for people: text as written, numbers plainly, containers as JSON (on
    one line when short and flat, else indented over several)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        flat = json.dumps(value, ensure_ascii=False)
        nested = any(isinstance(v, (dict, list, tuple))
                     for v in (value.values() if isinstance(value, dict) else value))
        return flat if len(flat) <= 72 and not nested else json.dumps(value, indent=2,
                                                                       ensure_ascii=False)
    return str(value)


def print_fields(fields: list[tuple[str, Any]], con: Console = console) -> None:
    """Name and value, one per row, values in a column: long values wrap onto the following
    lines (never cut), nested ones are indented JSON, and everything is printed literally
    (`plain`). Lines carry no padding, so a pipe gets clean text."""
    key_width = min(max((len(k) for k, _ in fields), default=0), 20)
    room = max((con.width or 80) - key_width - 1, 20)
    for key, value in fields:
        lines = []
        for line in printable(_pretty(value)).splitlines() or [""]:
            indent = line[: len(line) - len(line.lstrip(" "))]
            lines += textwrap.wrap(line, room, subsequent_indent=indent, break_on_hyphens=False,
                                   drop_whitespace=False, replace_whitespace=False) or [""]
        pad = " " * (key_width + 1)
        con.print(f"[bold]{plain(key.rjust(key_width))}[/] {plain(lines[0].rstrip())}",
                  highlight=False, soft_wrap=True)
        for line in lines[1:]:
            con.print(pad + plain(line.rstrip()), highlight=False, soft_wrap=True)


def _heading(con: Console, name: str, what: str) -> None:
    """The file a report is about, on a line of its own (a long path is never folded)."""
    con.print(f"[bold]{plain(name)}[/]  [dim]({plain(what)})[/]", highlight=False,
              soft_wrap=True)


def _layers_table(layers: list[dict[str, Any]], kept: int, total: int,
                  density: float | None, counted: str = "kept") -> Table:
    table = Table()
    table.add_column("layer", overflow="fold")
    table.add_column("shape", overflow="fold")
    table.add_column(counted, justify="right", overflow="fold")
    table.add_column("total", justify="right", overflow="fold")
    table.add_column("density", justify="right", overflow="fold")
    for row in layers:
        table.add_row(plain(row["name"]), "x".join(str(s) for s in row["shape"]),
                      f"{row['kept']:,}", f"{row['total']:,}", pct(row["density"]))
    table.add_section()
    table.add_row("[bold]total", "", f"{kept:,}", f"{total:,}", f"[bold]{pct(density)}")
    return table


def ticket_table(info: dict[str, Any], con: Console = console) -> None:
    """A ticket file: its layers' densities, then its metadata and hashes."""
    _heading(con, info.get("file", ""), f"{info['kind']}, {info['arch']}")
    con.print(_layers_table(info["layers"], info["kept"], info["prunable"], info["density"]))
    meta = info["metadata"]
    fields: list[tuple[str, Any]] = []
    if info.get("what"):
        fields.append(("what", info["what"]))
    fields += [("kind", meta["kind"]), ("arch", meta["arch"])]
    if meta.get("arch_args"):
        fields.append(("arch args", meta["arch_args"]))
    network = meta.get("network") or {}
    if network.get("factory"):  # a record of what built it: never imported from the file
        fields.append(("model factory", f"{network['factory']} (recorded, not imported)"))
    if network.get("fingerprint"):
        fields.append(("network fingerprint", network["fingerprint"]))
    if network.get("prunable"):
        fields.append(("prunable", network["prunable"]))
    fields += [("classes", meta["num_classes"])]
    if meta.get("class_names"):
        fields.append(("class names", ", ".join(str(c) for c in meta["class_names"])
                       if isinstance(meta["class_names"], list) else meta["class_names"]))
    fields += [("dataset", _dataset(meta.get("dataset") or {})),
               ("rewind epoch", meta.get("rewind_epoch")), ("seed", meta.get("seed"))]
    for key, value in (meta.get("extra") or {}).items():
        fields.append((key, value))
    fields += list(info["hashes"].items())
    print_fields(fields, con)


def run_file_table(info: Any, con: Console = console) -> None:
    """A run-folder file (`describe.RunFileInfo`): what it is, its per-layer counts, its
    tensors by group and its metadata."""
    _heading(con, info.file, info.kind)
    con.print(_layers_table([r.to_dict() for r in info.layers], info.kept, info.prunable,
                            info.density, info.counted))
    fields: list[tuple[str, Any]] = [("what", info.what)]
    if info.run_dir:
        fields.append(("run folder", info.run_dir))
    if info.arch or info.dataset:
        fields.append(("search", f"{info.arch or '?'} on {info.dataset or '?'}"))
    fields.append(("tensors", "; ".join(
        f"{g}: {c['tensors']:,} tensor{'s' * (c['tensors'] != 1)}, {c['values']:,} values"
        for g, c in info.tensors.items()) or "none"))
    for key, value in info.metadata.items():
        if key == "history" and isinstance(value, list):
            last = value[-1] if value else None
            value = f"{len(value)} epoch(s)" + (f"; last {_pretty(last)}" if last else "")
        fields.append((key, value))
    print_fields(fields, con)


def trigger_set_table(info: Any, con: Console = console) -> None:
    """A trigger set (`describe.TriggerSetInfo`): its images and how many carry each label."""
    _heading(con, info.file, "trigger set")
    table = Table()
    table.add_column("label", justify="right")
    table.add_column("images", justify="right")
    for label, n in info.classes.items():
        table.add_row(str(label), f"{n:,}")
    table.add_section()
    table.add_row("[bold]total", f"[bold]{info.count:,}")
    con.print(table)
    print_fields([
        ("what", info.what),
        ("images", f"{info.count:,} x {info.height}x{info.width}x{info.channels} "
                   f"({info.image_dtype})"),
        ("labels", f"{info.count:,} ({info.label_dtype}), {len(info.classes)} distinct"),
        ("arrays", ", ".join(f"{k} {'x'.join(map(str, a['shape']))} {a['dtype']}"
                             for k, a in info.arrays.items())),
    ], con)


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
                             info=f"ep {s.epoch} val {s.val_accuracy or 0:.2f}%" +
                                  (f" test {s.test_accuracy:.2f}%"
                                   if s.test_accuracy is not None else ""))

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
                rep["attack"], f"{100 * r['strength']:g}%" if isinstance(
                    r["strength"], (int, float)) else plain(str(r["strength"])),
                f"{r['accuracy']:.1f}%",
                plain(r["message"]) if r["message"] else "-",
                "-" if r["p_value"] is None else f"{r['p_value']:.1e}",
                "-" if d.get("defended_p_value") is None else f"{d['defended_p_value']:.1e}",
                "-" if r["trigger_accuracy"] is None else f"{r['trigger_accuracy']:.0f}%",
                "yes" if r["verified"] else "[red]no")
    return table
