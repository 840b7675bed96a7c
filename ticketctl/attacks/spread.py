"""Spreading a sweep's independent trainings over several devices: one worker process per
device (spawned: CUDA cannot be forked), each loading the dataset itself and taking packs of
jobs from a shared queue until it is told to stop. A worker trains a pack as the one-device
runner trains one (same trainer, same seeds; packs cut so every device gets one,
`spread_width`) and writes each result into the sweep's job store, which is how the results
come back: the parent then finds every job cached. So resume, the cache and the results are
those of one device (equal on CPU; on a GPU a pack's width changes only float rounding); the
wall time is what changes."""

from __future__ import annotations

import os
import queue
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ticketctl.device import CudaSwitches
from ticketctl.errors import TicketctlError, first_line


@dataclass
class DataSpec:
    """How a worker loads the same dataset as the parent (its job keys include its info)."""

    name: str
    data_dir: str | None
    val_size: int
    split_seed: int
    normalized: bool
    synthetic_size: int
    image_size: int | None = None  # an image folder resized when it was loaded

    @classmethod
    def of(cls, data: Any) -> DataSpec:
        data.require_resident("spreading trainings over devices")  # workers hold it whole
        return cls(data.name, data.data_dir, int(data.val_size), int(data.split_seed),
                   bool(data.normalized),
                   int(data.train_x.shape[0]) + int(data.val_size),
                   data.info().get("image_size"))

    def load(self, device: torch.device) -> Any:
        """The parent's dataset, on `device`: held in memory as the parent holds it (a worker
        never decides to stream on its own, whatever its device's free memory)."""
        from ticketctl.data import load_dataset

        return load_dataset(self.name, self.data_dir, device=device, val_size=self.val_size,
                            split_seed=self.split_seed, normalize=self.normalized,
                            synthetic_size=self.synthetic_size, stream=False,
                            image_size=self.image_size)


@dataclass
class Job:
    """One pack's worth of work: `retrain` tickets, `finetune` one ticket on schedules,
    a `calibrate` chunk, or `trials` of one round of `find` (its payload a TrialJob)."""

    kind: str  # "retrain" | "finetune" | "calibrate" | "trials"
    tickets: list[Any]
    labels: list[str]
    cfgs: list[dict[str, Any]] | None = None
    dense: bool = False
    payload: Any = None  # calibrate: index, arch, seeds, trigger, seed; trials: a TrialJob
    id: int = -1  # its place in the batch `SpreadPool.run` was given


def spread_width(width: int, jobs: int, devices: int) -> int:
    """How many jobs share one packed network when `jobs` are spread over `devices`: at most
    what one device packs (`width`), and few enough that every device gets a pack (eight
    trials that one GPU packs together would otherwise leave a second GPU idle). On a GPU
    packing changes the arithmetic only at float rounding (packed and alone are close, not
    bit-equal), so the grouping is free to follow the devices."""
    if devices < 2 or jobs < 2:
        return max(1, width)
    return max(1, min(width, -(-jobs // devices)))


def parse_devices(text: str | None, data_device: torch.device | None = None
                  ) -> list[torch.device] | None:
    """`--devices`: a comma list (`cuda:0,cuda:1`, `cpu,cpu`) or `all` (every visible GPU).
    Not given: every visible GPU when the data are on a GPU and more than one is visible (a
    sweep's trainings are independent, so each GPU left idle is time lost), else None (one
    device: the one the data are on). CUDA_VISIBLE_DEVICES or a list restricts it."""
    gpus = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    if text is None or not text.strip():
        spread = data_device is not None and data_device.type == "cuda" and len(gpus) > 1
        return gpus if spread else None
    if text.strip() == "all":
        if not gpus:
            raise TicketctlError("--devices all: no CUDA device is visible")
        return gpus
    out = []
    for part in text.split(","):
        try:
            dev = torch.device(part.strip())
        except RuntimeError as exc:
            raise TicketctlError(f"--devices: {part.strip()!r} is not a device "
                                 "(cuda:N or cpu)") from exc
        if dev.type == "cuda":
            index = dev.index if dev.index is not None else 0
            if index >= torch.cuda.device_count():
                raise TicketctlError(f"--devices: {dev} is not visible "
                                     f"({torch.cuda.device_count()} CUDA devices)")
            dev = torch.device(f"cuda:{index}")
        elif dev.type != "cpu":
            raise TicketctlError(f"--devices: {dev.type} devices are not supported")
        out.append(dev)
    return out


def worker_threads(devices: list[torch.device], threads: int) -> list[int]:
    """The CPU threads each worker may use, given the parent's `threads`. A CPU worker does
    its arithmetic on them, so it keeps the parent's count (the same reduction order, the
    same results). A GPU worker's CPU work is launching and small host-side tensors (an
    epoch's order), whose values do not depend on the thread count: GPU workers share the
    cores rather than each starting an OpenMP thread per core. (Two GPU workers' epochs ran
    5% slower than one worker's alone; threads spinning on each other's cores were the
    suspect, docs/DISTRIBUTED.md has what this measured.)"""
    gpus = sum(d.type == "cuda" for d in devices)
    share = max(1, threads // max(1, gpus))
    return [share if d.type == "cuda" else threads for d in devices]


def worker_visible_devices(device: torch.device) -> str | None:
    """The CUDA_VISIBLE_DEVICES a worker for `device` starts with (None: leave it as it is):
    the one entry of the parent's own list (or the bare index) that its `cuda:N` names. Not
    on ROCm, where HIP's own variables can take precedence."""
    if device.type != "cuda" or torch.version.hip is not None:
        return None
    index = device.index if device.index is not None else 0
    count = torch.cuda.device_count()
    if index >= count:  # also what CUDA makes of a list with an invalid entry before N
        raise TicketctlError(f"{device} is not visible ({count} CUDA devices)")
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    if parent is None:
        return str(index)
    return parent.split(",")[index].strip()


@contextmanager
def environment(name: str, value: str | None) -> Iterator[None]:
    """`name` set to `value` while a child process starts (spawned children copy the
    environment they start with); None leaves it alone. Restored afterwards, unset if it
    was unset."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


class SpreadPool:
    """One worker process per device (spawned: CUDA cannot be forked), kept for as many
    batches of jobs as the caller sends (`find` sends each round's trials), then closed."""

    def __init__(self, devices: list[torch.device], spec: DataSpec, cfg: dict[str, Any],
                 out_dir: Path | None, pack: int | None, on_epoch: Any = None) -> None:
        # an earlier sweep's workers (left without waiting) are gone before these start:
        # two of them on one GPU would hold two copies of the dataset there
        join_leaving()
        ctx = torch.multiprocessing.get_context("spawn")
        self.todo, self.events = ctx.Queue(), ctx.Queue()
        self.devices, self.on_epoch = devices, on_epoch
        # the parent's CUDA switches (cuDNN's timed choice of convolutions and TF32, as in
        # one process) and CPU threads (a CPU worker all of them, for the parent's CPU
        # arithmetic; GPU workers a share each, `worker_threads`)
        switches = CudaSwitches.current()
        shares = worker_threads(devices, switches.threads)
        from ticketctl.models.sources import current_factory

        factory = current_factory()  # the network the user named, imported again by each
        # A GPU worker sees its GPU alone, as its cuda:0: the code it compiles is then the
        # code every other worker and the parent compile (Inductor's on-disk cache is keyed
        # by device index, so a worker on cuda:1 would otherwise compile everything anew
        # while the others load it), and it opens no CUDA context on another GPU.
        visible = [worker_visible_devices(d) for d in devices]
        self.remapped = any(v is not None for v in visible)
        self.workers = [ctx.Process(target=_worker,
                                    args=("cuda:0" if v is not None else str(d), spec, cfg,
                                          out_dir, pack, self.todo, self.events,
                                          replace(switches, threads=n),
                                          factory.spec if factory else None, os.getpid()),
                                    daemon=True)
                        for d, v, n in zip(devices, visible, shares, strict=True)]
        for w, v in zip(self.workers, visible, strict=True):
            with environment("CUDA_VISIBLE_DEVICES", v):
                w.start()
        self.closed = False

    def run(self, jobs: list[Job]) -> dict[int, Any]:
        """Every job done by some worker; what jobs send back (calibration chunks by their
        index, trials by the job's place in `jobs`). A worker's failure closes the pool and
        raises its error (jobs finished before it stay cached)."""
        for i, job in enumerate(jobs):
            job.id = i
            self.todo.put(job)
        results: dict[int, Any] = {}
        done, errors = 0, []
        while done < len(jobs) and not errors:
            try:
                event = self.events.get(timeout=0.5)
            except queue.Empty:
                if all(w.is_alive() for w in self.workers):
                    continue
                try:  # a worker that died may have said why just before
                    event = self.events.get(timeout=2)
                except queue.Empty:
                    break
            if event[0] == "epoch" and self.on_epoch is not None:
                self.on_epoch(event[1], event[2])
            elif event[0] == "result":
                results[event[1]] = event[2]
            elif event[0] == "done":
                done += 1
            elif event[0] == "error":
                errors.append(event[1])
        if errors or done < len(jobs):
            self.close()
            failed = [d for d, w in zip(self.devices, self.workers, strict=True)
                      if w.exitcode not in (0, None)]
            # a GPU worker names its GPU cuda:0 in its own messages
            remapped = " (each GPU worker calls its GPU cuda:0)" if self.remapped else ""
            raise TicketctlError("a sweep worker failed" +
                                 (f" on {', '.join(map(str, failed))}" if failed else "") +
                                 remapped +
                                 (f": {errors[0]}" if errors else "") +
                                 "; its finished jobs are kept, rerun to continue")
        return results

    def close(self, wait: bool = True) -> None:
        """Tell every worker to leave (idempotent). `wait`: also wait until they have left,
        ending those that do not within 5 s (after a failure). After a batch that finished,
        nothing is left to wait for (every result is in): waiting for the workers' exit
        took 1.9 s of an 81.5 s two-GPU sweep, so they leave on their own; they are
        daemons, which multiprocessing ends and reaps at this process's exit; `join` waits
        for them, as the next pool does before it starts."""
        if not self.closed:
            self.closed = True
            for _ in self.workers:
                self.todo.put(None)
        if wait:
            self.join()
        else:
            _LEAVING.append(self)

    def join(self, timeout: float = 5) -> None:
        """Wait for every worker to leave, ending any still there after `timeout` s."""
        for w in self.workers:
            w.join(timeout=timeout)
            if w.is_alive():
                w.terminate()
                w.join(timeout=timeout)


_LEAVING: list[SpreadPool] = []  # pools closed without waiting for their workers' exit


def join_leaving() -> None:
    """Wait for the workers of pools closed without waiting (at most 5 s each, then end
    them): what a new pool does first, and what a timing does before it starts."""
    while _LEAVING:
        _LEAVING.pop().join()


def run_spread(jobs: list[Job], devices: list[torch.device], spec: DataSpec,
               cfg: dict[str, Any], out_dir: Path | None, pack: int | None,
               on_epoch: Any = None) -> dict[int, Any]:
    """Train every job on a pool of workers made for them. Retrainings and fine-tunings land
    in `out_dir`'s job store; a calibration chunk's measurements come back, by chunk index, in
    the returned dict. A worker's failure stops the sweep with its error (finished jobs stay
    cached)."""
    pool = SpreadPool(devices, spec, cfg, out_dir, pack, on_epoch)
    try:
        results = pool.run(jobs)
    except BaseException:
        pool.close()
        raise
    pool.close(wait=False)  # all done: the workers' exit is not waited for
    return results


def _next_job(todo: Any, parent: int) -> Job | None:
    """The next job, or None once told to stop or once the parent is gone (killed: its
    workers must not hold their GPUs, or write into a run folder, after it)."""
    while True:
        try:
            return todo.get(timeout=5)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _worker(device: str, spec: DataSpec, cfg: dict[str, Any], out_dir: Path | None,
            pack: int | None, todo: Any, events: Any, switches: CudaSwitches,
            factory: str | None, parent: int) -> None:
    try:
        switches.apply()
        if factory is not None:
            from ticketctl.models.sources import load_factory, use_factory

            use_factory(load_factory(factory))
        from ticketctl.attacks.runner import AttackRunner
        from ticketctl.protect.calibrate import NullModels
        from ticketctl.train.config import TrainConfig

        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        data = spec.load(dev)
        train = TrainConfig.from_dict(cfg)

        def progress(label: str, s: Any) -> None:  # an EpochStats: it pickles as it is
            events.put(("epoch", label, s))

        runner = AttackRunner(data, train, out_dir=out_dir, on_epoch=progress, pack=pack) \
            if out_dir is not None else None
        null: NullModels | None = None
        trainers: dict[int, Any] = {}  # find's trials: one trainer per pack width, reused
        while (job := _next_job(todo, parent)) is not None:
            if job.kind == "calibrate":
                p = job.payload
                null = null or NullModels(p["arch"], data, p["trigger"], train, p["seed"],
                                          p["arch_args"])
                events.put(("result", p["index"], null.chunk(p["seeds"])))
            elif job.kind == "trials":
                from ticketctl.prune.imp import train_trials

                events.put(("result", job.id, train_trials(job.payload, data, train,
                                                           trainers, progress)))
            elif runner is None:
                raise ValueError(f"a {job.kind} job needs the sweep's job store")
            elif job.kind == "retrain":
                runner.retrain_many(job.tickets, job.labels)
            else:
                runner.finetune_many(job.tickets[0], [TrainConfig.from_dict(c)
                                                      for c in job.cfgs or []],
                                     job.dense, job.labels)
            events.put(("done", job.id))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit 1
        # one line: it ends up in the command's one-line error
        events.put(("error", first_line(exc) if isinstance(exc, TicketctlError) else
                    f"{type(exc).__name__}: {first_line(exc)}"))
        traceback.print_exc()
        raise SystemExit(1) from None
