"""Files in and out: outputs are written atomically (a half-written ticket must never be
mistaken for a whole one), and a command with several outputs (a key and its locked ticket, a
signed ticket and its receipt) leaves all of them or none; small inputs are read bounded, with
one line for what is wrong."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from ticketctl.errors import TicketctlError


def check_output_path(path: str | Path, force: bool = False) -> Path:
    """Refuse an output in a missing folder, or over an existing file without force."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise TicketctlError(f"cannot write {p}: folder {parent} does not exist; create it first")
    if p.is_dir():
        raise TicketctlError(f"cannot write {p}: it is a folder; give a file name")
    if _exists(p) and not force:
        raise TicketctlError(f"{p} already exists; pass --force to overwrite it")
    return p


def _exists(p: Path) -> bool:
    return p.exists() or p.is_symlink()  # a dangling link is a file too


def _default_mode(p: Path) -> int:
    if p.exists():
        return p.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


@dataclass
class _Staged:
    tmp: Path
    dest: Path
    force: bool


@dataclass
class _Batch:
    """The outputs written so far inside `all_or_nothing`, each a finished temporary file."""

    staged: list[_Staged] = field(default_factory=list)


_BATCH: ContextVar[_Batch | None] = ContextVar("ticketctl_output_batch", default=None)


@contextmanager
def atomic_path(path: str | Path, force: bool = False, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds
    (inside `all_or_nothing`, when that block ends). `private` files (keys, receipts) keep the
    owner-only mode they are created with, so they are never readable by others, not even for
    a moment. A write that fails (a full disk) is one line naming the file."""
    p = check_output_path(path, force)
    batch = _BATCH.get()
    fd, name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or ".")
    os.close(fd)
    tmp, handed_over = Path(name), False
    try:
        yield tmp
        # mkstemp makes 0600: keep it for private files, else give the file a normal mode
        os.chmod(tmp, 0o600 if private else _default_mode(p))
        if batch is not None:
            batch.staged.append(_Staged(tmp, p, force))
            handed_over = True
        else:
            if _exists(p) and not force:  # appeared while we were writing
                raise TicketctlError(f"{p} already exists; pass --force to overwrite it")
            os.replace(tmp, p)
    except OSError as e:
        done = "; none of the outputs was written" if batch is not None else ""
        raise TicketctlError(f"cannot write {p}: {_reason(e)}{done}") from None
    finally:
        if not handed_over:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


@contextmanager
def all_or_nothing(*paths: str | Path | None, force: bool = False) -> Iterator[None]:
    """Commit a command's outputs together: every file written inside the block (by
    `atomic_path` and the writers built on it: `save_ticket`, `save_receipt`, plots, ...) is
    staged as a temporary file in its destination's folder and renamed into place only when
    the block ends without error. If a write or a rename fails, the files already renamed are
    put back as they were (a file replaced under --force is restored, a new one removed) and
    no temporary file is left, so the user sees all the outputs or none.

    `paths` (None is skipped) are checked before anything is written: none may exist without
    `force`, and no two may be the same file. Inside an enclosing block, the outer one
    commits."""
    wanted = [Path(p) for p in paths if p is not None]
    seen: dict[Path, Path] = {}
    for p in wanted:
        check_output_path(p, force)
        same = seen.setdefault(p.resolve(), p)
        if same is not p:
            raise TicketctlError(f"{same} and {p} are the same file: give each output its own "
                                 "file")
    if _BATCH.get() is not None:
        yield
        return
    batch = _Batch()
    token = _BATCH.set(batch)
    try:
        yield
        _BATCH.reset(token)
        token = None
        _commit(batch.staged)
    finally:
        if token is not None:
            _BATCH.reset(token)
        for s in batch.staged:
            with contextlib.suppress(FileNotFoundError):
                s.tmp.unlink()


def _commit(staged: list[_Staged]) -> None:
    """Rename every staged file over its destination, or none (see `all_or_nothing`)."""
    for s in staged:  # nothing renamed yet: an output that appeared meanwhile stops them all
        if _exists(s.dest) and not s.force:
            raise TicketctlError(f"{s.dest} already exists; pass --force to overwrite it")
    done: list[tuple[_Staged, _Backup | None]] = []
    try:
        for s in staged:
            backup = _Backup.of(s.dest)
            try:
                os.replace(s.tmp, s.dest)
            except BaseException:
                if backup is not None:
                    backup.discard()
                raise
            done.append((s, backup))
    except BaseException as e:
        lost = _roll_back(done)
        if isinstance(e, OSError):
            if lost:
                raise TicketctlError(f"cannot write {s.dest}: {_reason(e)}; and could not put "
                                     f"back {', '.join(map(str, lost))}") from None
            raise TicketctlError(f"cannot write {s.dest}: {_reason(e)}; none of the outputs "
                                 "was written") from None
        raise
    for _, backup in done:
        if backup is not None:
            backup.discard()


def _roll_back(done: list[tuple[_Staged, _Backup | None]]) -> list[Path]:
    """Undo the renames, last first; the destinations that could not be put back."""
    lost = []
    for s, backup in reversed(done):
        try:
            if backup is not None:
                backup.restore()
            else:
                s.dest.unlink()
        except OSError:
            lost.append(s.dest)
    return lost


@dataclass
class _Backup:
    """What a destination held before it was replaced: a hard link to the old file (a copy
    where links are not supported), or the target of a symbolic link."""

    dest: Path
    saved: Path | None = None
    link_target: str | None = None

    @classmethod
    def of(cls, dest: Path) -> _Backup | None:
        if dest.is_symlink():
            return cls(dest, link_target=os.readlink(dest))
        if not dest.exists():
            return None
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent)
        os.close(fd)
        saved = Path(name)
        try:
            saved.unlink()
            try:
                os.link(dest, saved)
            except OSError:  # no hard links here (some network or FAT file systems)
                shutil.copy2(dest, saved)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                saved.unlink()
            raise
        return cls(dest, saved=saved)

    def restore(self) -> None:
        if self.saved is not None:
            os.replace(self.saved, self.dest)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.dest.unlink()
            os.symlink(self.link_target or "", self.dest)

    def discard(self) -> None:
        if self.saved is not None:
            with contextlib.suppress(FileNotFoundError):
                self.saved.unlink()


def write_bytes_atomic(path: str | Path, data: bytes, force: bool = False,
                       private: bool = False) -> Path:
    with atomic_path(path, force, private) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str, force: bool = False,
                      private: bool = False) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), force, private)


def read_input(path: str | Path, what: str, max_bytes: int, hint: str = "") -> bytes:
    """The bytes of a small input file (a key, a receipt, a calibration), refused with one
    line when it is missing, a folder, unreadable or larger than `max_bytes`."""
    p = Path(path)
    try:
        if p.is_dir():
            raise TicketctlError(f"{p} is a folder, not a {what} file")
        size = p.stat().st_size
        if size > max_bytes:
            raise TicketctlError(f"{p} is {size:,} bytes: too large for a {what} file (at "
                                 f"most {max_bytes:,})")
        with open(p, "rb") as f:
            return f.read(max_bytes + 1)[:max_bytes]
    except FileNotFoundError:
        raise TicketctlError(f"{p}: no such {what} file{hint}") from None
    except OSError as e:
        raise TicketctlError(f"cannot read {what} file {p}: {e.strerror or e}") from None


def readable_json(obj: object, indent: int = 2) -> str:
    """JSON for people: objects indented, keys sorted, a list of plain values on one line.
    (json.dumps with `indent` switches to its pure-Python encoder, a quarter second for a
    receipt's channel fingerprints; here every leaf and flat list goes through the C one.)"""
    def enc(o: object, level: int) -> str:
        pad, end = " " * (indent * (level + 1)), " " * (indent * level)
        if isinstance(o, dict) and o:
            items = sorted(o.items(), key=lambda kv: str(kv[0]))
            return "{\n" + ",\n".join(f"{pad}{json.dumps(str(k))}: {enc(v, level + 1)}"
                                       for k, v in items) + f"\n{end}}}"
        if isinstance(o, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in o):
            if all(isinstance(v, (list, tuple)) and v and all(
                    isinstance(x, (int, float)) for x in v) for v in o):
                # rows of numbers (a receipt's fingerprints): one C call, a row a line
                return "[\n" + pad + json.dumps(o)[1:-1].replace("], [", f"],\n{pad}[") + \
                    f"\n{end}]"
            return "[\n" + ",\n".join(pad + enc(v, level + 1) for v in o) + f"\n{end}]"
        return json.dumps(o, sort_keys=True)
    return enc(obj, 0)
