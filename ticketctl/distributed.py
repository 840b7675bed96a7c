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
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ticketctl.errors import Terminated, TicketctlError

DEFAULT_TIMEOUT_S = 600
# an environment variable naming the processes of one launch (see `launch`)
LAUNCH_MARK = "TICKETCTL_LAUNCH"


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
    """Rank 0's buffers (BatchNorm statistics) on every rank; parameters are already equal.
    One broadcast per dtype through a flat buffer: a broadcast per buffer was 161 collectives
    an epoch for ResNet-50, each a few tens of microseconds of latency."""
    if ctx is None:
        return
    with torch.no_grad():
        for _, views, flat in _flat_by_dtype(list(module.buffers())):
            dist.broadcast(flat, 0)
            _copy_back(views, flat)


def broadcast_parameters(ctx: DistContext | None, module: torch.nn.Module) -> None:
    """Rank 0's parameters on every rank (the start DistributedDataParallel would make)."""
    if ctx is None:
        return
    with torch.no_grad():
        for p in module.parameters():
            dist.broadcast(p.data, 0)


def average_(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    """`t` replaced in place by its mean over the ranks: NCCL's own average (no pass of its
    own over the tensor), or a sum and a division where the backend has none (gloo)."""
    if dist.get_backend() == "nccl":
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
        return t
    dist.all_reduce(t)
    return t.div_(ctx.world)


def _memory_perm(t: torch.Tensor) -> list[int]:
    """`t`'s dimensions from the largest stride down (stable: ties keep their order)."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """`t` with its dimensions permuted into the order its elements lie in memory: a
    contiguous view (no copy) of any dense tensor, channels_last included, so it flattens
    and is written back without a strided copy. A tensor with gaps or overlaps comes back
    as it is (not contiguous: the caller copies)."""
    view = t.permute(_memory_perm(t))
    return view if view.is_contiguous() else t


def _flat_by_dtype(tensors: list[torch.Tensor | None]
                   ) -> list[tuple[list[int], list[torch.Tensor], torch.Tensor]]:
    """Per dtype (in one order on every rank): the positions of its tensors in `tensors`
    (None entries skipped), their memory-order views and one flat copy of them, the buffer
    a single collective sends."""
    out = []
    for dtype in sorted({t.dtype for t in tensors if t is not None}, key=str):
        where = [i for i, t in enumerate(tensors) if t is not None and t.dtype == dtype]
        views = [memory_order(tensors[i]) for i in where]
        out.append((where, views, torch.cat([v.reshape(-1) for v in views])))
    return out


def averaged_grads(ctx: DistContext, grads: list[torch.Tensor | None],
                   wire: torch.dtype | None = None) -> list[torch.Tensor | None]:
    """The gradients' means over the ranks, each a view, in the gradient's own shape (and
    strides, for every gradient without gaps), of one flat buffer per dtype (one
    all-reduce each, in the same order on every rank): what the update reads, so nothing
    is copied back (`average_grads_` copies).
    `wire` (bf16) sends half the bytes of fp32: every gradient is rounded to it first and
    the sum is taken in it, so the mean is off by at most about 2**-8 times the sum of the
    ranks' magnitudes, and the same on every rank. Each gradient goes in in its memory
    order (`memory_order`): a channels_last 3x3 convolution's gradient flattened in logical
    order was a strided copy (17 of them, 45 MB, a step for ResNet-50); every rank has the
    same layouts, so the flat buffers line up element for element. A None (a parameter
    without a gradient: the same on every rank) stays None."""
    out = list(grads)
    for where, views, flat in _flat_by_dtype(grads):
        dtype = flat.dtype
        if wire is not None and wire != dtype:
            flat = flat.to(wire)
        average_(ctx, flat)
        flat = flat.to(dtype)  # one conversion, where the wire differs
        for i, v, part in zip(where, views, flat.split([v.numel() for v in views]),
                              strict=True):
            out[i] = _as_layout(part.view(v.shape), grads[i], v)
    return out


def _as_layout(part: torch.Tensor, grad: torch.Tensor | None, view: torch.Tensor
               ) -> torch.Tensor:
    """`part` (the flat buffer's piece, shaped as `view`) seen in `grad`'s shape: permuted
    back where `view` was `grad` permuted into memory order (the same strides as `grad`)."""
    assert grad is not None
    if view is grad:
        return part.view(grad.shape)  # (a tensor with gaps went in logical order)
    order = _memory_perm(grad)
    return part.permute([order.index(d) for d in range(grad.dim())])


def average_grads_(ctx: DistContext, grads: list[torch.Tensor],
                   wire: torch.dtype | None = None) -> None:
    """Each gradient replaced in place by its mean over the ranks (`averaged_grads`, then
    one multi-tensor copy back)."""
    means = averaged_grads(ctx, grads, wire)
    torch._foreach_copy_(grads, means)


def _copy_back(views: list[torch.Tensor], flat: torch.Tensor) -> None:
    """`flat`'s consecutive pieces into `views`, in one multi-tensor copy (a copy per
    tensor was 161 kernels for ResNet-50, each a few microseconds)."""
    parts = [part.view(v.shape) for v, part in
             zip(views, flat.split([v.numel() for v in views]), strict=True)]
    torch._foreach_copy_(views, parts)


def plan_buckets(params: list[torch.Tensor], cap_bytes: int) -> list[list[int]]:
    """The parameters' indices in buckets of at least `cap_bytes` each (the last may be
    smaller), in reverse order: backward produces the last layers' gradients first, so the
    first bucket is ready first (DistributedDataParallel's order). The same on every rank,
    so the ranks' collectives line up."""
    buckets: list[list[int]] = []
    size = cap_bytes
    for i in reversed(range(len(params))):
        if size >= cap_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += params[i].numel() * params[i].element_size()
    return buckets


class BucketReducer:
    """The gradients averaged over the ranks a bucket at a time while backward still runs,
    as DistributedDataParallel's reducer does: a bucket's all-reduce starts once backward
    has accumulated every gradient in it, on a stream of its own, so it overlaps the
    backward of the layers before. Buckets are launched strictly in order (a bucket that is
    ready early waits for those before it), so every rank issues the same collectives in the
    same order. Each bucket is averaged as `average_grads_` does, so the mean is the same
    as one all-reduce of every gradient.

    The overlap needs a backward in pieces: a network compiled whole has one backward
    function, after which every gradient is ready at once (see `overlap_units`). Under a
    CUDA graph capture the hooks run once and their kernels, on the side stream, become a
    branch of the graph."""

    def __init__(self, ctx: DistContext, params: list[torch.Tensor], cap_bytes: int,
                 wire: torch.dtype | None = None) -> None:
        self.ctx = ctx
        self.wire = wire
        self.params = params
        self.buckets = plan_buckets(params, cap_bytes)
        self.bucket_of = {i: k for k, b in enumerate(self.buckets) for i in b}
        cuda = bool(params) and params[0].device.type == "cuda"
        self.stream = torch.cuda.Stream(params[0].device) if cuda else None
        self.armed = False
        self.launched = 0
        self.left: list[int] = []
        self.seen: set[int] = set()
        me = weakref.ref(self)  # the parameters' hooks must not keep the reducer alive

        def hook(i: int) -> Callable[[torch.Tensor], None]:
            def ready(_param: torch.Tensor) -> None:
                reducer = me()
                if reducer is not None:
                    reducer._ready(i)
            return ready

        self.handles = [p.register_post_accumulate_grad_hook(hook(i))
                        for i, p in enumerate(params)]

    def arm(self) -> None:
        """Before a step's backward: its gradients start the buckets' all-reduces."""
        self.left = [len(b) for b in self.buckets]
        self.seen = set()
        self.launched = 0
        self.armed = True

    def _ready(self, i: int) -> None:
        if not self.armed or i in self.seen:
            return
        self.seen.add(i)
        self.left[self.bucket_of[i]] -= 1
        while self.launched < len(self.buckets) and self.left[self.launched] == 0:
            self._launch(self.launched)
            self.launched += 1

    def _launch(self, k: int) -> None:
        grads = [self.params[i].grad for i in self.buckets[k]]
        grads = [g for g in grads if g is not None]
        if not grads:
            return
        if self.stream is None:
            average_grads_(self.ctx, grads, self.wire)
            return
        # the side stream starts after what the backward has queued so far (these gradients)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            average_grads_(self.ctx, grads, self.wire)

    def finish(self) -> None:
        """After backward: the buckets not yet launched (parameters that got no gradient
        keep theirs from starting), then the calling stream waits for every all-reduce."""
        while self.launched < len(self.buckets):
            self._launch(self.launched)
            self.launched += 1
        self.armed = False
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)

    def close(self) -> None:
        """Remove the hooks from the parameters."""
        for h in self.handles:
            h.remove()
        self.handles = []


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
    # LAUNCH_MARK names this launch's processes: a rank that torchrun started just as it was
    # stopped is no longer its child when the stop looks for it (pytorch's ranks run in
    # their own sessions and go to init), but it still carries the mark
    mark = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           **(env or {}), LAUNCH_MARK: mark}
    # The ranks run in their own session (so a failing one can be stopped with the rest):
    # a SIGTERM to this process (`timeout`, a batch scheduler, `kill`) must stop them too,
    # or they would keep the GPUs after it is gone.
    previous = _on_sigterm_raise()
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_tree(proc, mark, previous is not _NOT_INSTALLED)
            raise TicketctlError(f"distributed run did not finish within {timeout_s:g} s "
                                 "(--dist-timeout); every rank was stopped") from None
        except (KeyboardInterrupt, Terminated):
            _stop_tree(proc, mark, previous is not _NOT_INSTALLED)
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


def marked(mark: str) -> list[int]:
    """The processes whose environment holds LAUNCH_MARK=`mark` (Linux /proc; empty
    elsewhere)."""
    needle = f"{LAUNCH_MARK}={mark}".encode()
    out = []
    for entry in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in entry.read_bytes().split(b"\0"):
                out.append(int(entry.parent.name))
        except (OSError, ValueError):
            continue
    return out


def _stop_tree(proc: subprocess.Popen, mark: str, ignore_sigterm: bool = False) -> None:
    """torchrun stops its ranks on SIGTERM; whatever is left after 10 s is killed: torchrun
    first (so it starts no more), then every process of the launch, found as its children
    were before the SIGTERM and by `mark` after (a rank started during the stop).
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
    proc.kill()
    proc.wait()
    for pid in {*ranks, *marked(mark)}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
