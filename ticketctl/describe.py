"""What `inspect` shows of any file ticketctl writes or reads: a ticket, a file of a search's
run folder (a round's mask, the rewind point, the checkpoint, trained weights) or a Scheme V3
trigger set (`.npz`). The kind is decided from the file's structure (its name only tells
run-folder files apart); nothing is unpickled and nothing is trained or built at full size.
The CLI renders these records as tables or JSON."""

from __future__ import annotations

import json
import math
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ticketctl.artifacts.describe import describe_file
from ticketctl.artifacts.ticket import (
    FORMAT_NAME,
    PICKLE_HINT,
    file_format,
    is_npz,
    read_header,
    read_tensors,
)
from ticketctl.errors import TicketctlError, first_line

# What a ticket of each kind is, in a line.
KIND_WHAT = {
    "ticket": "a ticket: the rewind weights and the mask IMP found",
    "trained": "a trained sparse model (weights and mask)",
    "key": "the key of a Scheme V1 split: the few weights the locked part lacks",
    "locked": "the locked part of a Scheme V1 split (merge it with its key to use it)",
    "signed": "a ticket carrying a Scheme V2 signature in the mask of one layer",
}

# `inspect -` copies stdin to a temporary file first; past this it stops and refuses.
MAX_STDIN_BYTES = 1 << 30
# The labels of a trigger set are read (to count them) only up to this size uncompressed.
MAX_LABEL_BYTES = 64 << 20
# A run folder's config.json is read (for the architecture and dataset) only up to this size.
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class LayerCount:
    """One tensor's count: mask entries kept (a mask) or nonzero values (weights)."""

    name: str
    shape: list[int]
    kept: int
    total: int
    density: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": self.shape, "kept": self.kept, "total": self.total,
                "density": self.density}


@dataclass
class TicketInfo:
    """A ticketctl ticket file (any kind), in the JSON shape `inspect --json` always had."""

    doc: dict[str, Any]

    @property
    def file(self) -> str:
        return self.doc["file"]

    def to_dict(self) -> dict[str, Any]:
        return self.doc


@dataclass
class RunFileInfo:
    """A safetensors file of a search's run folder (not a ticket: no ticketctl metadata)."""

    file: str
    kind: str  # run-mask, run-rewind, run-checkpoint, run-trained, run-best
    what: str
    counted: str  # what `kept` counts: "kept" mask entries or "nonzero" weights
    layers: list[LayerCount]
    tensors: dict[str, dict[str, int]]  # per group (model, opt, rng, best, mask): count, values
    metadata: dict[str, Any]
    run_dir: str | None = None
    arch: str | None = None
    dataset: str | None = None

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.layers)

    @property
    def prunable(self) -> int:
        return sum(r.total for r in self.layers)

    @property
    def density(self) -> float | None:
        return self.kept / self.prunable if self.prunable else None

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "kind": self.kind, "what": self.what, "arch": self.arch,
                "dataset": self.dataset, "run_dir": self.run_dir, "density": self.density,
                "kept": self.kept, "prunable": self.prunable, "counted": self.counted,
                "layers": [r.to_dict() for r in self.layers], "tensors": self.tensors,
                "metadata": self.metadata}


@dataclass
class TriggerSetInfo:
    """A Scheme V3 trigger set stored as `.npz` (`images`, `labels`)."""

    file: str
    count: int
    height: int
    width: int
    channels: int
    image_dtype: str
    label_dtype: str
    classes: dict[int, int]  # label -> how many images carry it
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)  # every array: shape, dtype
    kind: str = "trigger-set"

    @property
    def what(self) -> str:
        return (f"a Scheme V3 trigger set: {self.count} images of {self.height}x{self.width}x"
                f"{self.channels} with secret labels of {len(self.classes)} classes")

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "kind": self.kind, "what": self.what,
                "images": {"count": self.count, "height": self.height, "width": self.width,
                           "channels": self.channels, "dtype": self.image_dtype},
                "labels": {"count": self.count, "dtype": self.label_dtype,
                           "classes": {str(k): v for k, v in self.classes.items()}},
                "arrays": self.arrays, "metadata": {}}


Described = TicketInfo | RunFileInfo | TriggerSetInfo


def describe_path(path: str | Path, label: str | None = None) -> Described:
    """What a file is and holds. `label` names a file that has no name of its own (`-`, a
    pipe's bytes in a temporary file): then run-folder files are told apart by their content
    alone."""
    p = Path(path)
    name = label if label is not None else str(p)
    if file_format(p) == "pickle":
        if is_npz(p):
            return describe_trigger_npz(p, name)
        raise TicketctlError(f"{name}: " + PICKLE_HINT.format(path=name if label is None
                                                              else "FILE"))
    header = read_header(p)
    if header.get("format") != FORMAT_NAME and set(header) == {"json"}:
        return describe_run_file(p, header, name, by_name=label is None)
    doc = describe_file(p)
    doc["file"] = name
    doc["what"] = KIND_WHAT.get(doc["kind"], doc["kind"])
    return TicketInfo(doc)


def describe_stream(stream: BinaryIO, label: str = "-", limit: int | None = None) -> Described:
    """The file a pipe brings (`inspect -`): copied to a private temporary file, at most
    `limit` bytes (a larger one is refused before it fills the disk), then described."""
    limit = MAX_STDIN_BYTES if limit is None else limit
    with tempfile.TemporaryDirectory(prefix="ticketctl-stdin-") as tmp:
        target = Path(tmp) / "stdin"
        with open(target, "wb") as f:
            copied = 0
            while chunk := stream.read(min(1 << 20, limit + 1 - copied)):
                f.write(chunk)
                copied += len(chunk)
                if copied > limit:
                    raise TicketctlError(f"{label}: stdin holds more than {limit:,} bytes, "
                                         "more than inspect reads from a pipe; save it to a "
                                         "file and inspect the file")
        if copied == 0:
            raise TicketctlError(f"{label}: stdin is empty; pipe a file in "
                                 "(ticketctl inspect - < FILE)")
        try:
            return describe_path(target, label)
        except TicketctlError as e:  # name the pipe, not the temporary file
            raise type(e)(str(e).replace(str(target), label)) from None


# ---- trigger sets -------------------------------------------------------------------------------
def _npy_header(z: zipfile.ZipFile, member: str, where: str) -> tuple[tuple[int, ...], np.dtype]:
    with z.open(member) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        except (ValueError, OSError, SyntaxError, TypeError) as e:
            raise TicketctlError(f"{where}: array {member!r} is not a readable .npy "
                                 f"({first_line(e, 100)})") from None
    return tuple(int(s) for s in shape), dtype


def describe_trigger_npz(p: Path, name: str) -> TriggerSetInfo:
    """Shapes from the arrays' headers (the images are never decompressed); labels read and
    counted, within a bound."""
    try:
        z = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as e:
        raise TicketctlError(f"{name}: not a readable .npz ({e})") from None
    with z:
        arrays = {m[:-4]: _npy_header(z, m, name) for m in z.namelist()}
        missing = [k for k in ("images", "labels") if k not in arrays]
        if missing:
            raise TicketctlError(
                f"{name} is a NumPy .npz archive (arrays {', '.join(sorted(arrays)) or 'none'}) "
                f"but not a trigger set: it lacks {' and '.join(missing)}")
        shape, dtype = arrays["images"]
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
            raise TicketctlError(f"{name}: trigger images must be N x H x W or N x H x W x C "
                                 f"(C 1, 3 or 4), got shape {list(shape)}")
        lshape, ldtype = arrays["labels"]
        if ldtype.kind not in "iu":
            raise TicketctlError(f"{name}: trigger labels must be integers, got {ldtype}")
        count = math.prod(lshape)
        if shape[0] == 0:
            raise TicketctlError(f"{name}: the trigger set holds no images")
        if count != shape[0]:
            raise TicketctlError(f"{name}: {shape[0]} trigger images but {count} labels")
        info = z.getinfo("labels.npy")
        if info.file_size > MAX_LABEL_BYTES or count * ldtype.itemsize > MAX_LABEL_BYTES:
            raise TicketctlError(f"{name}: the labels array is larger than "
                                 f"{MAX_LABEL_BYTES:,} bytes; this is not a trigger set")
        with z.open("labels.npy") as f:
            try:
                labels = np.lib.format.read_array(f, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise TicketctlError(f"{name}: cannot read the labels ({e})") from None
    values, counts = np.unique(labels.reshape(-1), return_counts=True)
    if len(values) and int(values[0]) < 0:
        raise TicketctlError(f"{name}: trigger labels must be 0 or more, got {int(values[0])}")
    return TriggerSetInfo(
        file=name, count=shape[0], height=shape[1], width=shape[2],
        channels=shape[3] if len(shape) == 4 else 1, image_dtype=str(dtype),
        label_dtype=str(ldtype), classes={int(v): int(c) for v, c in zip(values, counts,
                                                                        strict=True)},
        arrays={k: {"shape": list(s), "dtype": str(d)} for k, (s, d) in arrays.items()})


# ---- run-folder files ---------------------------------------------------------------------------
def _meta_json(header: dict[str, str], where: str) -> dict[str, Any]:
    try:
        meta = json.loads(header.get("json") or "{}")
    except (ValueError, RecursionError):
        raise TicketctlError(f"{where}: its metadata (`json`) is not valid JSON") from None
    if not isinstance(meta, dict):
        raise TicketctlError(f"{where}: its metadata (`json`) must be a JSON object")
    return meta


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _number(v: Any) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _run_folder(p: Path) -> tuple[Path | None, dict[str, Any]]:
    """The run folder a file sits in (its own folder, or the one above for `masks/`) and its
    settings, when its config.json says it is one; else (None, {})."""
    from ticketctl.prune.rundir import CONFIG, MARKER

    for folder in (p.parent, p.parent.parent):
        cfg = folder / CONFIG
        try:
            if not cfg.is_file() or cfg.stat().st_size > MAX_CONFIG_BYTES:
                continue
            doc = json.loads(cfg.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(doc, dict) and doc.get("kind") == MARKER:
            settings = doc.get("settings")
            return folder, settings if isinstance(settings, dict) else {}
    return None, {}


def _role(p: Path, names: set[str], meta: dict[str, Any], by_name: bool) -> str:
    """Which run-folder file this is: from its name when it has its run-folder name, else
    (renamed, or read from stdin) from its tensors and metadata."""
    from ticketctl.prune import rundir

    if by_name:
        m = re.fullmatch(r"round-(\d+)\.safetensors", p.name)
        if m and f"{p.parent.name}/{p.name}" == rundir.mask_file(int(m.group(1))):
            return "mask"
        by_file = {rundir.REWIND: "rewind", rundir.CHECKPOINT: "checkpoint",
                   rundir.TRAINED_CURRENT: "trained-current",
                   rundir.TRAINED_CANDIDATE: "trained-candidate",
                   rundir.BEST_CURRENT: "best-current", rundir.BEST_CANDIDATE: "best-candidate"}
        if p.name in by_file:
            return by_file[p.name]
    prefixes = {n.split(".", 1)[0] for n in names}
    if "round" in meta:
        return "mask"
    if "key" in meta and "epoch" in meta:
        return "checkpoint"
    if names and prefixes <= {"model", "opt"} and "model" in prefixes:
        return "rewind"
    return "weights"


_ROLE_KIND = {"mask": "run-mask", "rewind": "run-rewind", "checkpoint": "run-checkpoint",
              "trained-current": "run-trained", "trained-candidate": "run-trained",
              "best-current": "run-best", "best-candidate": "run-best", "weights": "run-trained"}


def _what(role: str, meta: dict[str, Any], settings: dict[str, Any]) -> str:
    search = settings.get("search") if isinstance(settings.get("search"), dict) else {}
    if role == "mask":
        r, rate = _int(meta.get("round")), _number(meta.get("rate"))
        if r == 0:
            return "the mask a search starts from (round 0: nothing pruned)"
        return (f"the mask of search round {r if r is not None else '?'}"
                + (f" (pruning rate {rate:g})" if rate is not None else ""))
    if role == "rewind":
        epoch = _int(search.get("rewind_epoch"))
        return ("the rewind point of a search: weights and optimizer state"
                + (f" after epoch {epoch}" if epoch is not None else "")
                + "; every round's training starts here")
    if role == "checkpoint":
        key, epoch = meta.get("key"), _int(meta.get("epoch"))
        return (f"the training in progress ({key if isinstance(key, str) else '?'}) after epoch "
                f"{epoch if epoch is not None else '?'}: what `find --resume` continues from")
    return {
        "trained-current": "the weights trained under the last accepted mask (final epoch); "
                           "the next round prunes these",
        "trained-candidate": "the weights trained under this round's candidate mask "
                             "(final epoch)",
        "best-current": "the weights of the last accepted mask's training at its "
                        "best-validation epoch (what `find --trained` saves)",
        "best-candidate": "the weights of the candidate mask's training at its best-validation "
                          "epoch",
        "weights": "weights from a search's run folder (trained under a mask)",
    }[role]


def _counts(tensors: dict[str, Any], keep: Callable[[str, Any], bool]) -> list[LayerCount]:
    import torch

    rows = []
    for name, t in tensors.items():
        if keep(name, t):
            kept, total = int(torch.count_nonzero(t)), t.numel()
            rows.append(LayerCount(name, list(t.shape), kept, total,
                                   kept / total if total else 1.0))
    return rows


def describe_run_file(p: Path, header: dict[str, str], name: str,
                      by_name: bool = True) -> RunFileInfo:
    """A mask per round, the rewind point, the checkpoint or trained weights: what it is, its
    per-layer counts (mask entries kept, or nonzero values of each weight of two or more
    dimensions) and its tensors by group."""
    meta = _meta_json(header, name)
    tensors = read_tensors(p)
    role = _role(p, set(tensors), meta, by_name)
    folder, settings = _run_folder(p) if by_name else (None, {})
    groups: dict[str, dict[str, int]] = {}
    for k, t in tensors.items():
        g = k.split(".", 1)[0] if role in ("rewind", "checkpoint") else \
            "mask" if role == "mask" else "model"
        entry = groups.setdefault(g, {"tensors": 0, "values": 0})
        entry["tensors"] += 1
        entry["values"] += t.numel()
    if role == "mask":
        layers = _counts(tensors, lambda n, t: True)
    else:
        model_prefix = "model." if role in ("rewind", "checkpoint") else ""
        layers = _counts({k[len(model_prefix):]: v for k, v in tensors.items()
                          if k.startswith(model_prefix)},
                         lambda n, t: t.dim() >= 2 and t.is_floating_point())
    arch, dataset = settings.get("arch"), settings.get("dataset")
    return RunFileInfo(
        file=name, kind=_ROLE_KIND[role], what=_what(role, meta, settings),
        counted="kept" if role == "mask" else "nonzero", layers=layers, tensors=groups,
        metadata=meta, run_dir=str(folder) if folder is not None else None,
        arch=arch if isinstance(arch, str) else None,
        dataset=dataset if isinstance(dataset, str) else None)


__all__ = ["KIND_WHAT", "MAX_STDIN_BYTES", "Described", "LayerCount", "RunFileInfo",
           "TicketInfo", "TriggerSetInfo", "describe_path", "describe_stream"]
