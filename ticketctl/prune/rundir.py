"""The run folder of a search: resolved settings, metrics, the mask of every round and the
checkpoints that let `--resume` continue after a kill at any moment. Every file is written
atomically, and the search state is the single source of truth for what has finished. The
files' names live here and nowhere else; each JSON file has its typed record."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ticketctl.artifacts import Mask
from ticketctl.artifacts.io import atomic_path, write_bytes_atomic, write_text_atomic
from ticketctl.errors import TicketctlError
from ticketctl.prune.search import Round, SearchState, TrialResult
from ticketctl.records import Record
from ticketctl.train.engine import EpochStats

MARKER = "ticketctl-run"

# Held (flock) by the process working in the folder; a second process is refused.
LOCK = "run.lock"
_HELD: dict[str, int] = {}  # real path -> descriptor holding its lock

# The files of a run folder.
CONFIG = "config.json"  # the resolved settings and their hash
DATASET = "dataset.json"  # the dataset as first loaded; a resumed run loads it the same way
DENSE = "dense.json"  # Dense: the dense training's result
STATE = "state.json"  # the search state (every finished round) and the epoch-log position
PENDING = "pending.json"  # the finished trials of the round in progress
RESULT = "result.json"  # the summary `find --json` prints
REWIND = "rewind.safetensors"  # weights and momentum at the rewind epoch
CHECKPOINT = "checkpoint.safetensors"  # the training in progress, after its last epoch
TRAINED_CURRENT = "trained-current.safetensors"  # trained under the last accepted mask
TRAINED_CANDIDATE = "trained-candidate.safetensors"  # trained under this round's candidate
# The same trainings at their best-validation epoch: the model the reported accuracy
# describes, which `find --trained` writes (pruning uses the final weights above).
BEST_CURRENT = "best-current.safetensors"
BEST_CANDIDATE = "best-candidate.safetensors"
EPOCHS = "epochs.jsonl"  # one row per trained epoch, across every training
ROUNDS = "rounds.jsonl"
ROUNDS_CSV, EPOCHS_CSV = "rounds.csv", "epochs.csv"


def mask_file(round_no: int) -> str:
    return f"masks/round-{round_no:03d}.safetensors"


@dataclass
class Dense(Record):
    """The dense training: its result and where its epochs end in the epoch log."""

    accuracy: float
    val_accuracy: float | None
    best_epoch: int
    seconds: float
    seq: int


@dataclass
class Checkpoint:
    """A training in progress, after its last finished epoch."""

    key: str
    epoch: int
    seq: int
    history: list[EpochStats]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None = None  # the best-validation epoch's weights so far
    # the training's wall time up to this checkpoint, over every process that worked on it
    # (a resumed training reports the whole, not only its last part)
    seconds: float = 0.0


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


# Settings a resumed run may change: how the step is compiled, not what it computes (a fused
# compilation that fails on another GPU or torch can go on with --no-fuse-step; a run can
# take or drop --combo-kernels), and how data-parallel ranks exchange gradients, which a
# resume may change as it may change --nproc (a run started with --reduce-bf16 on two GPUs
# can go on in one process).
RESUMABLE = frozenset({"train.fuse_step", "train.combo_kernels", "train.reduce_bf16",
                       "train.bucket_mb"})


def without_resumable(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings less those a resumed run may change (what names a run's folder, and
    what a resume compares)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in settings.items()}
    for key in RESUMABLE:
        part, name = key.split(".")
        if isinstance(out.get(part), dict):
            out[part].pop(name, None)
    return out


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    name = prefix.rstrip(".")
    return [] if a == b else [f"{name}: {a!r} then, {b!r} now"]


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # ---- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, settings: dict[str, Any], resume: bool, force: bool) -> RunDir:
        """Start a run folder, or reopen one for --resume after checking its settings. The
        folder stays locked until `unlock` (or this process ends): a second run on it (a
        second --resume, or --force) is refused instead of mixing its files with this one's."""
        run = cls(path)
        cfg = run.path / CONFIG
        if run.path.exists() and any(p.name != LOCK for p in run.path.iterdir()):
            if not cfg.exists():
                raise TicketctlError(f"run folder {run.path} exists and is not a ticketctl run; "
                                     "choose another --run-dir")
            run._lock()
            if resume:
                old = json.loads(cfg.read_text())
                before = old.get("settings")
                diffs = _diff(without_resumable(before) if isinstance(before, dict) else before,
                              without_resumable(settings))
                if diffs:
                    run.unlock()
                    raise TicketctlError(
                        f"cannot resume {run.path}: it was made with different settings "
                        f"({'; '.join(diffs[:3])}); use the same options or another --run-dir"
                    )
                return run
            if not force:
                run.unlock()
                raise TicketctlError(f"run folder {run.path} already exists; pass --resume to "
                                     "continue it or --force to start it over")
            for p in run.path.iterdir():  # start over, keeping the lock this process holds
                if p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif resume:
            raise TicketctlError(f"nothing to resume: run folder {run.path} does not exist")
        run.path.mkdir(parents=True, exist_ok=True)
        run._lock()
        (run.path / "masks").mkdir(exist_ok=True)
        write_text_atomic(cfg, json.dumps({"kind": MARKER, "settings": settings,
                                           "settings_hash": settings_hash(settings)},
                                          indent=2, sort_keys=True), force=True)
        return run

    # ---- the lock ---------------------------------------------------------------------------
    def _lock(self) -> None:
        """Take the folder's lock until `unlock` or the end of this process (the kernel drops
        it when the process dies, so a killed run leaves nothing stale behind). Within one
        process the lock is shared, so a library caller may reopen a folder it holds."""
        key = os.path.realpath(self.path)
        if key in _HELD:
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise TicketctlError(f"run folder {self.path} is in use by process {holder}; "
                                 "wait for it to finish or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD[key] = fd

    def unlock(self) -> None:
        """Let another process work in the folder (the lock file itself stays: removing it
        would let two processes lock two different files of the same name)."""
        fd = _HELD.pop(os.path.realpath(self.path), None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

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

    def copy_file(self, src: str, dst: str) -> None:
        """Replace `dst` by a byte copy of `src`, atomically: promoting an accepted round's
        weights needs no parse and no re-serialization of two 45 MB files (ResNet-18)."""
        with atomic_path(self.file(dst), True, False) as tmp:
            shutil.copyfile(self.file(src), tmp)

    def read_tensors(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        p = self.file(name)
        if not p.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("json", "{}"))
        return safetensors.torch.load_file(str(p)), meta

    def write_mask(self, round_no: int, mask: Mask, meta: dict[str, Any]) -> None:
        self.write_tensors(mask_file(round_no), {k: v.to(torch.uint8) for k, v in mask.items()},
                           meta)

    def read_mask(self, round_no: int) -> Mask | None:
        got = self.read_tensors(mask_file(round_no))
        return Mask(got[0]) if got else None

    # ---- the typed files ------------------------------------------------------------------------
    def read_dense(self) -> Dense | None:
        d = self.read_json(DENSE)
        return Dense.from_dict(d) if d is not None else None

    def write_dense(self, dense: Dense) -> None:
        self.write_json(DENSE, dense.to_dict())

    def read_state(self) -> tuple[SearchState, int] | None:
        """The search state and the epoch-log position it was written at."""
        d = self.read_json(STATE)
        return (SearchState.from_dict(d), d["seq"]) if d is not None else None

    def write_state(self, state: SearchState, seq: int) -> None:
        self.write_json(STATE, {**state.to_dict(), "seq": seq})

    def read_pending(self, round_no: int) -> tuple[list[TrialResult], int | None, float]:
        """The finished trials of round `round_no` (none if another round was pending), the
        epoch-log position after them and the round's wall time until they were recorded."""
        d = self.read_json(PENDING) or {}
        if d.get("round") != round_no or not d.get("trials"):
            return [], None, 0.0
        return [TrialResult.from_dict(t) for t in d["trials"]], d["seq"], \
            float(d.get("seconds", 0.0))

    def write_pending(self, round_no: int, trials: list[TrialResult], seq: int,
                      seconds: float = 0.0) -> None:
        self.write_json(PENDING, {"round": round_no, "trials": [t.to_dict() for t in trials],
                                  "seq": seq, "seconds": seconds})

    def read_rewind(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """The rewind point: (model state, optimizer state)."""
        got = self.read_tensors(REWIND)
        if got is None:
            return None
        return _prefixed(got[0], "model."), _prefixed(got[0], "opt.")

    def write_rewind(self, model: dict[str, torch.Tensor],
                     optimizer: dict[str, torch.Tensor]) -> None:
        self.write_tensors(REWIND, {**_with_prefix(model, "model."),
                                    **_with_prefix(optimizer, "opt.")})

    def read_checkpoint(self, key: str) -> Checkpoint | None:
        """The checkpoint of training `key`, if the last one written was of that training."""
        got = self.read_tensors(CHECKPOINT)
        if got is None or got[1].get("key") != key:
            return None
        tensors, meta = got
        history = [EpochStats(**h) for h in meta["history"]]
        # a checkpoint written before `seconds` was kept: its epochs' own times
        seconds = meta.get("seconds", sum(h.seconds for h in history))
        return Checkpoint(key, meta["epoch"], meta["seq"], history,
                          _prefixed(tensors, "model."), _prefixed(tensors, "opt."),
                          {k: v for k, v in tensors.items() if k.startswith("rng.")},
                          _prefixed(tensors, "best.") or None, float(seconds))

    def write_checkpoint(self, ck: Checkpoint) -> None:
        self.write_tensors(CHECKPOINT, {**_with_prefix(ck.model, "model."),
                                        **_with_prefix(ck.optimizer, "opt."), **ck.rng,
                                        **_with_prefix(ck.best or {}, "best.")},
                           {"key": ck.key, "epoch": ck.epoch, "seq": ck.seq,
                            "history": [h.to_dict() for h in ck.history],
                            "seconds": ck.seconds})

    # ---- metrics --------------------------------------------------------------------------------
    def append_epoch(self, seq: int, training: str, stats: EpochStats) -> None:
        with open(self.file(EPOCHS), "a") as f:
            f.write(json.dumps({"seq": seq, "training": training, **stats.to_dict()}) + "\n")

    def epoch_rows(self) -> list[dict[str, Any]]:
        p = self.file(EPOCHS)
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
        write_text_atomic(self.file(EPOCHS),
                          "".join(json.dumps(r) + "\n" for r in rows), force=True)

    def write_tables(self, rounds: list[Round]) -> None:
        """Rewrite rounds.jsonl and the two CSV files from the authoritative records."""
        rows = [r.to_dict() for r in rounds]
        write_text_atomic(self.file(ROUNDS), "".join(json.dumps(r) + "\n" for r in rows),
                          force=True)
        write_text_atomic(self.file(ROUNDS_CSV), _csv(rows), force=True)
        write_text_atomic(self.file(EPOCHS_CSV), _csv(self.epoch_rows()), force=True)


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


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
