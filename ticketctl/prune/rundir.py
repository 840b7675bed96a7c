"""The run folder of a search: resolved settings, metrics, the mask of every round and the
checkpoints that let `--resume` continue after a kill at any moment. Every file is written
atomically, and the search state is the single source of truth for what has finished."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ticketctl.artifacts import Mask
from ticketctl.artifacts.io import write_bytes_atomic, write_text_atomic
from ticketctl.errors import TicketctlError

MARKER = "ticketctl-run"


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} then, {b!r} now"]


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # ---- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, settings: dict[str, Any], resume: bool, force: bool) -> RunDir:
        """Start a run folder, or reopen one for --resume after checking its settings."""
        run = cls(path)
        cfg = run.path / "config.json"
        if run.path.exists() and any(run.path.iterdir()):
            if not cfg.exists():
                raise TicketctlError(f"run folder {run.path} exists and is not a ticketctl run; "
                                     "choose another --run-dir")
            if resume:
                old = json.loads(cfg.read_text())
                diffs = _diff(old.get("settings"), settings)
                if diffs:
                    raise TicketctlError(
                        f"cannot resume {run.path}: it was made with different settings "
                        f"({'; '.join(diffs[:3])}); use the same options or another --run-dir"
                    )
                return run
            if not force:
                raise TicketctlError(f"run folder {run.path} already exists; pass --resume to "
                                     "continue it or --force to start it over")
            shutil.rmtree(run.path)
        elif resume:
            raise TicketctlError(f"nothing to resume: run folder {run.path} does not exist")
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / "masks").mkdir(exist_ok=True)
        write_text_atomic(cfg, json.dumps({"kind": MARKER, "settings": settings,
                                           "settings_hash": settings_hash(settings)},
                                          indent=2, sort_keys=True), force=True)
        return run

    # ---- small JSON and tensor files ------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def read_json(self, name: str) -> Any | None:
        p = self.file(name)
        return json.loads(p.read_text()) if p.exists() else None

    def write_json(self, name: str, obj: Any) -> None:
        write_text_atomic(self.file(name), json.dumps(obj, indent=2), force=True)

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor],
                      meta: dict[str, Any] | None = None) -> None:
        header = {"json": json.dumps(meta or {})}
        data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()},
                                      metadata=header)
        write_bytes_atomic(self.file(name), data, force=True)

    def read_tensors(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        p = self.file(name)
        if not p.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("json", "{}"))
        return safetensors.torch.load_file(str(p)), meta

    def write_mask(self, round_no: int, mask: Mask, meta: dict[str, Any]) -> None:
        self.write_tensors(f"masks/round-{round_no:03d}.safetensors",
                           {k: v.to(torch.uint8) for k, v in mask.items()}, meta)

    def read_mask(self, round_no: int) -> Mask | None:
        got = self.read_tensors(f"masks/round-{round_no:03d}.safetensors")
        return Mask(got[0]) if got else None

    # ---- metrics --------------------------------------------------------------------------------
    def append_epoch(self, row: dict[str, Any]) -> None:
        with open(self.file("epochs.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    def epoch_rows(self) -> list[dict[str, Any]]:
        p = self.file("epochs.jsonl")
        if not p.exists():
            return []
        rows = []
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                break
        return rows

    def truncate_epochs(self, last_seq: int) -> None:
        """Drop epoch lines written after the point a resumed run continues from."""
        rows = [r for r in self.epoch_rows() if r["seq"] <= last_seq]
        write_text_atomic(self.file("epochs.jsonl"),
                          "".join(json.dumps(r) + "\n" for r in rows), force=True)

    def write_tables(self, rounds: list[dict[str, Any]]) -> None:
        """Rewrite rounds.jsonl and the two CSV files from the authoritative records."""
        write_text_atomic(self.file("rounds.jsonl"),
                          "".join(json.dumps(r) + "\n" for r in rounds), force=True)
        write_text_atomic(self.file("rounds.csv"), _csv(rounds), force=True)
        write_text_atomic(self.file("epochs.csv"), _csv(self.epoch_rows()), force=True)


def _csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and not isinstance(r[k], (list, dict))]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
