"""Black-box ownership verification (Scheme V3): query a suspect model that may only be reachable
through a prediction command, with the secret triggers hidden among ordinary test images so the
service cannot single them out by position."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ticketctl.errors import TicketctlError

_MAX_CMD_SHOWN = 120
_MAX_DETAIL = 200


@dataclass
class QueryPlan:
    """The shuffled query batch and where each trigger and decoy ended up in it."""

    images: np.ndarray  # uint8 [M, H, W, C]: triggers and decoys, shuffled
    trigger_positions: np.ndarray  # int64 [n_triggers]: where trigger i sits in `images`
    decoy_positions: np.ndarray  # int64 [n_decoys]: where decoy j sits in `images`


def _check_images(name: str, images: np.ndarray) -> None:
    """Queries travel as uint8 NHWC, so anything else is a caller mistake caught early."""
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        shape = getattr(images, "shape", None)
        raise TicketctlError(
            f"{name} must be a 4-d uint8 array [N, H, W, C], got shape {shape}; "
            "pass images in NHWC layout"
        )
    if images.dtype != np.uint8:
        raise TicketctlError(
            f"{name} must have dtype uint8, got {images.dtype}; convert pixels to 0..255 uint8"
        )


def plan_queries(triggers: np.ndarray, decoys: np.ndarray, seed: int) -> QueryPlan:
    """Shuffle trigger images (uint8 NHWC) among decoys (same H, W, C; same count is typical)
    with a seeded permutation, so the plan can be reproduced from the seed."""
    _check_images("trigger images", triggers)
    _check_images("decoy images", decoys)
    if len(triggers) == 0:
        raise TicketctlError("the trigger set is empty; give at least one trigger image")
    if triggers.shape[1:] != decoys.shape[1:]:
        raise TicketctlError(
            f"trigger images are {tuple(triggers.shape[1:])} (H, W, C) but decoys are "
            f"{tuple(decoys.shape[1:])}; use decoys from the same dataset as the triggers"
        )
    n_triggers = len(triggers)
    combined = np.concatenate([triggers, decoys], axis=0)
    order = np.random.default_rng(seed).permutation(len(combined))
    # order[k] is the original index placed at slot k; invert it to find each original's slot.
    slot_of = np.empty(len(combined), dtype=np.int64)
    slot_of[order] = np.arange(len(combined), dtype=np.int64)
    return QueryPlan(
        images=np.ascontiguousarray(combined[order]),
        trigger_positions=slot_of[:n_triggers].copy(),
        decoy_positions=slot_of[n_triggers:].copy(),
    )


def _one_line(text: str, limit: int = _MAX_DETAIL) -> str:
    """Error messages are one line: flatten whitespace and cut long text."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _last_line(text: str) -> str:
    """The last non-empty line of a stream, usually the actual error of a failing script."""
    lines = [line for line in text.splitlines() if line.strip()]
    return _one_line(lines[-1]) if lines else ""


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the shell and everything it started (its process group, and any descendant that
    moved to another group), then reap it. The pipes are closed rather than drained, so a
    straggler that escaped cannot hang us."""
    from ticketctl.distributed import _descendants

    stragglers = _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in stragglers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class _TooMuch(Exception):
    pass


_GRACE_S = 2.0  # after the command exits, how long a child may hold its pipes open
_STDERR_KEPT = 64 * 1024


def _communicate(proc: subprocess.Popen, timeout: float, limit: int) -> tuple[bytes, bytes]:
    """Read the command's stdout (at most `limit` bytes: raises _TooMuch beyond) and the last
    64 kB of its stderr until both end, or until `_GRACE_S` after it exited (a child it left
    behind may hold them open: its answer is complete). Raises TimeoutExpired at `timeout`."""
    out, err = bytearray(), bytearray()
    sel = selectors.DefaultSelector()
    for stream in (proc.stdout, proc.stderr):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    exited_at = None
    try:
        while True:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and (not sel.get_map() or now - exited_at > _GRACE_S):
                break
            if now >= deadline:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            if not sel.get_map():  # pipes closed, command still running: wait for it
                time.sleep(min(deadline - now, 0.05))
                continue
            for key, _ in sel.select(min(deadline - now, 0.2)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.fileobj is proc.stdout:
                    out += chunk
                    if len(out) > limit:
                        raise _TooMuch
                else:
                    err += chunk
                    del err[:-_STDERR_KEPT]
    finally:
        sel.close()
    return bytes(out), bytes(err)


def _parse_labels(stdout: str, expected: int, shown: str) -> list[int]:
    """Accept exactly a JSON list of `expected` ints; bools and floats are not labels."""
    try:
        value = json.loads(stdout)
    except json.JSONDecodeError:
        got = _one_line(stdout, 60) or "nothing"
        raise TicketctlError(
            f"prediction command {shown} printed {got!r}, not JSON; it must print a JSON list "
            "of integer labels on stdout"
        ) from None
    if not isinstance(value, list):
        raise TicketctlError(
            f"prediction command {shown} printed a JSON {type(value).__name__}, not a list; "
            "it must print a JSON list of integer labels"
        )
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int):
            raise TicketctlError(
                f"prediction command {shown} printed {item!r} at position {i}, not an integer "
                "label; print class indices, not scores or names"
            )
    if len(value) != expected:
        raise TicketctlError(
            f"prediction command {shown} printed {len(value)} labels, expected {expected} "
            "(one per query image)"
        )
    return value


def run_predict_cmd(
    cmd: str,
    images: np.ndarray,
    timeout: float = 300.0,
    workdir: str | Path | None = None,
) -> list[int]:
    """Run `cmd` through the shell with the path of a temporary `.npz` (key `images`, uint8
    NHWC) appended, and return the one label per image it prints as a JSON list. The command
    is the only contact with a model we cannot open; `workdir` is where the `.npz` is written
    (default: the system temp dir). Every failure is a one-line TicketctlError."""
    _check_images("query images", images)
    shown = repr(_one_line(cmd, _MAX_CMD_SHOWN))
    if workdir is not None and not Path(workdir).is_dir():
        raise TicketctlError(f"work directory {workdir} does not exist; create it or omit it")
    fd, tmp_name = tempfile.mkstemp(prefix="ticketctl-query-", suffix=".npz", dir=workdir)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, images=np.ascontiguousarray(images))
        full_cmd = f"{cmd} {shlex.quote(tmp_name)}"
        try:
            proc = subprocess.Popen(
                full_cmd,
                shell=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise TicketctlError(
                f"could not start prediction command {shown}: {_one_line(str(exc))}"
            ) from None
        # a JSON list of labels: a few characters per image (anything far beyond is not an
        # answer, and a command printing without end must not fill the memory)
        limit = 4096 + 32 * len(images)
        try:
            out_bytes, err_bytes = _communicate(proc, timeout, limit)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise TicketctlError(
                f"prediction command {shown} did not finish within {timeout:g} seconds and was "
                "killed; check the service or raise the timeout"
            ) from None
        except _TooMuch:
            _kill_group(proc)
            raise TicketctlError(
                f"prediction command {shown} printed more than {limit:,} bytes for "
                f"{len(images)} images and was stopped; it must print one JSON list of labels"
            ) from None
        except BaseException:
            _kill_group(proc)
            raise
        _kill_group(proc)  # reap it, and end any child it left running
        stdout = out_bytes.decode("utf-8", errors="replace")
        stderr = err_bytes.decode("utf-8", errors="replace")
        if proc.returncode != 0:
            if proc.returncode < 0:
                status = f"was killed by signal {-proc.returncode}"
            else:
                status = f"exited with status {proc.returncode}"
            detail = _last_line(stderr)
            raise TicketctlError(
                f"prediction command {shown} {status}: {detail or 'no message on stderr'}"
            )
        return _parse_labels(stdout, len(images), shown)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def split_answers(labels: list[int], plan: QueryPlan) -> tuple[np.ndarray, np.ndarray]:
    """(labels for the triggers in trigger order, labels for the decoys in decoy order), undoing
    the shuffle so answers line up with the owner's trigger labels."""
    if len(labels) != len(plan.images):
        raise TicketctlError(
            f"got {len(labels)} answers for a plan of {len(plan.images)} queries; "
            "answer every query image exactly once"
        )
    answers = np.asarray(labels, dtype=np.int64)
    return answers[plan.trigger_positions], answers[plan.decoy_positions]
