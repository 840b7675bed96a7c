"""Files in and out: outputs are written atomically (a half-written ticket must never be
mistaken for a whole one); small inputs are read bounded, with one line for what is wrong."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
    if (p.exists() or p.is_symlink()) and not force:  # a dangling link is a file too
        raise TicketctlError(f"{p} already exists; pass --force to overwrite it")
    return p


def _default_mode(p: Path) -> int:
    if p.exists():
        return p.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path, force: bool = False, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.
    `private` files (keys, receipts) keep the owner-only mode they are created with, so they
    are never readable by others, not even for a moment."""
    p = check_output_path(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or ".")
    os.close(fd)
    try:
        yield Path(tmp)
        if (p.exists() or p.is_symlink()) and not force:  # appeared while we were writing
            raise TicketctlError(f"{p} already exists; pass --force to overwrite it")
        # mkstemp makes 0600: keep it for private files, else give the file a normal mode
        os.chmod(tmp, 0o600 if private else _default_mode(p))
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
