"""Read and hash a large ticket file on a second core while the command is still importing
PyTorch (about 1.4 s on a small CPU): by the time `load_ticket` checks the file's hashes, the
SHA-256 of every tensor's bytes is known. Only a speed-up: a file that is not a plain
safetensors file, changes while it is read, or is never loaded is simply left to the normal
reader, which reports every problem. Imports nothing heavy (not PyTorch)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass

# A safetensors header holds the tensors' names, shapes and offsets and the metadata: a few
# kilobytes for the largest registered network. Anything near this bound was crafted.
MAX_HEADER_BYTES = 8 << 20
MIN_BYTES = 16 << 20  # smaller files are read and hashed in a few milliseconds anyway
CHUNK = 16 << 20


def _stat_key(path: str) -> tuple[int, ...]:
    """What changes when the file is replaced or written to."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class Digests:
    key: tuple[int, ...]  # the file's identity and times while it was read
    sha256: dict[str, bytes]  # tensor name -> SHA-256 of its raw bytes


def file_digests(path: str) -> Digests | None:
    """The SHA-256 of each tensor's bytes in a safetensors file, reading it once in chunks
    (hashlib and file reads release the GIL), or None for anything unexpected."""
    key = _stat_key(path)
    with open(path, "rb", buffering=0) as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(MAX_HEADER_BYTES, key[2] - 8):
            return None
        try:
            header = json.loads(f.read(n))
            spans = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1]), k)
                           for k, v in header.items() if k != "__metadata__")
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return None
        pos = 0  # tensors lie back to back from the start of the data (safetensors' rule)
        for begin, end, _ in spans:
            if begin != pos or end < begin:
                return None
            pos = end
        if 8 + n + pos != key[2]:
            return None
        buf = memoryview(bytearray(min(CHUNK, max(pos, 1))))
        out = {}
        for begin, end, name in spans:
            h, left = hashlib.sha256(), end - begin
            while left:
                got = f.readinto(buf[:min(left, len(buf))])
                if not got:
                    return None
                h.update(buf[:got])
                left -= got
            out[name] = h.digest()
    return Digests(key, out) if _stat_key(path) == key else None


class _Job:
    def __init__(self, path: str) -> None:
        self.result: Digests | None = None
        self.thread = threading.Thread(target=self._run, args=(path,), daemon=True,
                                       name="ticketctl-prefetch")
        self.thread.start()

    def _run(self, path: str) -> None:
        try:
            self.result = file_digests(path)
        except Exception:  # the normal reader reports whatever is wrong with the file
            self.result = None


_jobs: dict[str, _Job] = {}


def start(path: str | os.PathLike[str]) -> bool:
    """Begin reading and hashing `path` in the background when it is a file large enough to
    be worth it; returns whether it began."""
    real = os.path.realpath(path)
    if real in _jobs:
        return True
    try:
        if not os.path.isfile(real) or os.path.getsize(real) < MIN_BYTES:
            return False
    except OSError:
        return False
    _jobs[real] = _Job(real)
    return True


def take(path: str | os.PathLike[str]) -> dict[str, bytes] | None:
    """The tensors' digests of `path` if a prefetch of it finished and the file has not
    changed since it was read (call after reading the tensors yourself), else None. Each
    prefetch is taken once."""
    real = os.path.realpath(path)
    job = _jobs.pop(real, None)
    if job is None:
        return None
    job.thread.join()
    r = job.result
    try:
        return r.sha256 if r is not None and _stat_key(real) == r.key else None
    except OSError:
        return None


def start_for_args(args: list[str]) -> None:
    """Prefetch the first argument of a command line that names a large file (the ticket
    or suspect that commands take first); options and small files are passed over."""
    for a in args:
        if not a.startswith("-") and start(a):
            return
