"""Data-parallel training with torch.distributed: NCCL on GPUs, gloo on CPUs. A command run
with `--nproc N` starts N copies of itself through torchrun (`torch.distributed.run`); each
copy finds its rank in the environment torchrun sets. Every rank holds the whole dataset
and the same global permutation of it each epoch; rank r trains on its slice of every global
batch (batch size and learning rate keep their single-process meaning: the global batch), and
the training step averages the gradients over the ranks (one all-reduce, inside the step's CUDA
graph on GPUs), so the weights, and therefore the magnitude masks, are the same on every rank.
Only rank 0 writes files."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import weakref
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ticketctl.errors import Terminated, TicketctlError

DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int
    scratch: bool = False  # this rank already works in its private copy of the run folder

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def in_worker() -> bool:
    """True inside a process torchrun started (it sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S
                  ) -> DistContext | None:
    """Join the process group torchrun prepared; None in a plain single process."""
    if not in_worker():
        return None
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if world == 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world, local)


class GraphOwner(Protocol):
    def release_graph(self, sync: bool = True) -> None: ...


# Trainers whose captured CUDA graph holds NCCL collectives: destroying the process group
# while such a graph lives can hang (pytorch#115388), so shutdown() releases them first.
_graph_owners: weakref.WeakSet[GraphOwner] = weakref.WeakSet()


def release_before_shutdown(owner: GraphOwner) -> None:
    """Have shutdown() call `owner.release_graph()` before it destroys the process group."""
    _graph_owners.add(owner)


def shutdown() -> None:
    """Leave the group together: wait for every rank, free what still holds the group
    (captured graphs first), then destroy it. Without this a rank that finishes first can
    abort ("terminate called without an active exception")."""
    if dist.is_initialized():
        try:
            if sys.exc_info()[0] is None:  # failing: leave at once, torchrun stops the rest
                dist.barrier()
        finally:
            failing = sys.exc_info()[0] is not None
            for owner in list(_graph_owners):
                try:
                    # failing: drop the graph without waiting on a device whose collective
                    # may never complete (its peer is gone)
                    owner.release_graph(sync=not failing)
                except Exception:  # noqa: BLE001 - the group must still be destroyed
                    pass
            _graph_owners.clear()
            gc.collect()
            dist.destroy_process_group()


def check_same(ctx: DistContext | None, digest: str, what: str) -> None:
    """All ranks must hold the same `digest` (e.g. a mask's SHA-256); raises otherwise."""
    if ctx is None:
        return
    mine = torch.tensor([int(digest[:15], 16)], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    seen = [torch.zeros_like(mine) for _ in range(ctx.world)]
    dist.all_gather(seen, mine)
    if len({int(t.item()) for t in seen}) != 1:
        raise TicketctlError(f"ranks disagree on {what}: distributed training diverged")


def broadcast_module_state(ctx: DistContext | None, module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank; parameters are already equal."""
    if ctx is None:
        return
    with torch.no_grad():
        for b in module.buffers():
            dist.broadcast(b, 0)


def broadcast_parameters(ctx: DistContext | None, module: torch.nn.Module) -> None:
    """Rank 0's parameters on every rank (the start DistributedDataParallel would make)."""
    if ctx is None:
        return
    with torch.no_grad():
        for p in module.parameters():
            dist.broadcast(p.data, 0)


def average_(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    """`t` replaced in place by its mean over the ranks (a sum, then a division, since gloo
    has no average)."""
    dist.all_reduce(t)
    return t.div_(ctx.world)


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """`t` with its dimensions permuted into the order its elements lie in memory: a
    contiguous view (no copy) of any dense tensor, channels_last included, so it flattens
    and is written back without a strided copy. A tensor with gaps or overlaps comes back
    as it is (not contiguous: the caller copies)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # stable: ties keep order
    view = t.permute(order)
    return view if view.is_contiguous() else t


def average_grads_(ctx: DistContext, grads: list[torch.Tensor],
                   wire: torch.dtype | None = None) -> None:
    """Each gradient replaced in place by its mean over the ranks: one flat all-reduce per
    dtype, in the same order on every rank. `wire` (bf16) sends half the bytes of fp32:
    every gradient is rounded to it first and the sum is taken in it, so the mean is off
    by at most about 2**-8 times the sum of the ranks' magnitudes, and the same on every rank.
    Each gradient goes in and out in its memory order (`memory_order`): a channels_last 3x3
    convolution's gradient flattened in logical order was a strided copy each way (17 of
    them, 45 MB, a step for ResNet-50); every rank has the same layouts, so the flat buffers
    line up element for element."""
    for dtype in sorted({g.dtype for g in grads}, key=str):
        group = [g for g in grads if g.dtype == dtype]
        views = [memory_order(g) for g in group]
        flat = torch.cat([v.reshape(-1) for v in views])  # a view where v is contiguous
        if wire is not None and wire != dtype:
            flat = flat.to(wire)
        average_(ctx, flat)
        flat = flat.to(dtype)  # one conversion, so the copy back takes the same-dtype path
        # back in one multi-tensor copy: a copy per gradient was 161 kernels a step for
        # ResNet-50, each a few microseconds inside the step's CUDA graph
        parts = [part.view(v.shape) for v, part in
                 zip(views, flat.split([v.numel() for v in views]), strict=True)]
        torch._foreach_copy_(views, parts)


def sum_counts(ctx: DistContext, counts: list[int]) -> list[int]:
    """Integer counts summed over the ranks, the total on every rank."""
    t = torch.tensor(counts, dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def fail_rank_for_tests() -> int | None:
    """TICKETCTL_FAIL_RANK=r makes rank r raise after its first epoch: the test of a failing
    rank shutting every rank down cleanly."""
    v = os.environ.get("TICKETCTL_FAIL_RANK")
    return int(v) if v else None


# torchrun, without the traceback it prints when a rank fails (the rank has said why), and
# exiting with the first failed rank's own exit status (2 for bad input) instead of 1.
_TORCHRUN = """import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main()
except ChildFailedError as e:
    code = e.get_first_failure()[1].exitcode
    sys.exit(code if 0 < code < 128 else 1)
"""

def launch(module_args: list[str], nproc: int, nnodes: int = 1,
           rdzv_endpoint: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
           env: dict[str, str] | None = None) -> int:
    """Run `python -m ticketctl MODULE_ARGS` as nproc ranks through torchrun (with `env`
    added to their environment); returns the exit code. Past `timeout_s` without finishing,
    every rank is killed and 2 returned."""
    if nproc < 1 or nnodes < 1:
        raise TicketctlError("--nproc and --nnodes must be at least 1")
    cmd = [sys.executable, "-c", _TORCHRUN, f"--nproc-per-node={nproc}",
           f"--nnodes={nnodes}", "--max-restarts=0"]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        if nnodes > 1:
            raise TicketctlError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT")
        cmd += ["--standalone"]
    cmd += ["-m", "ticketctl", *module_args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           **(env or {})}
    # The ranks run in their own session (so a failing one can be stopped with the rest):
    # a SIGTERM to this process (`timeout`, a batch scheduler, `kill`) must stop them too,
    # or they would keep the GPUs after it is gone.
    previous = _on_sigterm_raise()
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_tree(proc, previous is not _NOT_INSTALLED)
            raise TicketctlError(f"distributed run did not finish within {timeout_s:g} s "
                                 "(--dist-timeout); every rank was stopped") from None
        except (KeyboardInterrupt, Terminated):
            _stop_tree(proc, previous is not _NOT_INSTALLED)
            raise
    finally:
        if previous is not _NOT_INSTALLED:  # (None: it was set outside Python; the default)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


_NOT_INSTALLED = object()


def _on_sigterm_raise() -> Any:
    """Make SIGTERM raise `Terminated` in the main thread; the handler it replaced, or
    `_NOT_INSTALLED` outside the main thread (where signals cannot be handled)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _NOT_INSTALLED

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stop_tree(proc: subprocess.Popen, ignore_sigterm: bool = False) -> None:
    """torchrun stops its ranks on SIGTERM; whatever is left after 10 s is killed.
    `ignore_sigterm`: a second SIGTERM to this process meanwhile must not cut this short
    (the launch's handler would raise in the middle of it)."""
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ranks = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *ranks]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


LAUNCH_OPTIONS = {"--nproc": 1, "--nnodes": 1, "--rdzv-endpoint": 1}


def relaunch_args(argv: list[str]) -> list[str]:
    """The command's own arguments for the ranks: the launch options removed (each rank is
    one process)."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCH_OPTIONS:
            skip = 0 if "=" in a else LAUNCH_OPTIONS[name]
            continue
        out.append(a)
    return out
