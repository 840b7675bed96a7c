"""The trainer. On CUDA a whole training step (batch gather, augmentation, forward, backward,
masked SGD) is one CUDA graph replay of a `torch.compile`d model in bf16 and channels_last:
ResNet-20 at batch 128 is bound by the host launching ~300 small kernels per step, so the
fix is to launch less. With `fuse_step` (the default) the step's gather, crop and flip and
loss are compiled with the network and the masked SGD update on its own, so their small
operators become a few fused kernels too. On the CPU it is plain eager fp32 and
bit-reproducible from a seed.

Everything a graph captured is static: rewinding, re-masking and resetting momentum copy
into the existing tensors, so one capture serves every IMP round. A streamed dataset
(`data.stream`) is copied batch by batch into static input buffers that the captured step
reads; a resident one is gathered inside the step, as before.

`Engine` trains the models of one network: one model, or K models packed into it (see
`packing`); a `Layout` says which, and how batches, losses, learning rates and accuracies map
onto the models. Its one epoch loop (`Engine.run`) is what every path trains with: `Trainer`
(one model), `PackedTrainer` (K models, in `packed.py`) and IMP's checkpointed rounds."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ticketctl.artifacts import Mask
from ticketctl.data import Dataset
from ticketctl.data.augment import PAD, crop_flip
from ticketctl.data.stream import StreamedDataset
from ticketctl.distributed import (
    BucketReducer,
    DistContext,
    averaged_grads,
    broadcast_module_state,
    broadcast_parameters,
    check_same,
    fail_rank_for_tests,
    release_before_shutdown,
    sum_counts,
)
from ticketctl.errors import TicketctlError
from ticketctl.train.config import TrainConfig
from ticketctl.train.overlap import compile_units, overlap_units
from ticketctl.train.packing import loss_logits
from ticketctl.train.schedule import lr_at
from ticketctl.train.sgd import MaskedSGD

# On the CPU the trainer runs eager. Tests set this to compile there too, with `_compile`
# swapped for dynamo's "eager" backend: the step's functions must trace as one graph each.
COMPILE_ON_CPU = False


def compile_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """torch.compile's `mode`, or its `options`, for the trainer's settings: combo kernels
    are an Inductor option, and torch.compile takes options only instead of a mode, so the
    mode's own options are spelled out beside it."""
    if not cfg.combo_kernels:
        return {"mode": None if cfg.compile_mode == "default" else cfg.compile_mode}
    from torch._inductor import list_mode_options

    return {"options": {**list_mode_options(cfg.compile_mode), "combo_kernels": True}}


def _backward_as_eager() -> contextlib.AbstractContextManager[Any]:
    """While a compiled function is first called under autocast: trace its backward without
    autocast, as eager autograd runs `loss.backward()` outside the autocast block.
    AOTAutograd's default traces the backward under the autocast the forward was called in,
    which can change the backward's arithmetic: CUDA autocast runs some operations in fp32
    (a `sum`, such as a bias gradient's, among them) that eager autograd runs in bf16. A
    no-op where this torch has no such setting."""
    from torch._functorch import config

    if not hasattr(config, "backward_pass_autocast"):
        return contextlib.nullcontext()
    return config.patch(backward_pass_autocast="off")


def _compile(fn: Callable[..., Any], cfg: TrainConfig) -> Callable[..., Any]:
    """torch.compile as the trainer uses it: one static shape per function."""
    return torch.compile(fn, dynamic=False, **compile_kwargs(cfg))


@dataclass
class EpochStats:
    epoch: int
    lr: float
    train_loss: float
    val_accuracy: float | None
    test_accuracy: float | None  # None: not scored this epoch (`test_eval` "best")
    seconds: float = 0.0
    trigger_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    best_epoch: int
    val_accuracy: float | None
    test_accuracy: float  # at the best-validation epoch (the last epoch without a val split)
    history: list[EpochStats] = field(default_factory=list)
    seconds: float = 0.0
    trigger_accuracy: float | None = None  # at the best-validation epoch

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = [h.to_dict() for h in self.history]
        return d


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


@dataclass
class Hooks:
    """What a caller adds to the epoch loop; each runs after every epoch, in this order."""

    trained: Callable[[int], None] | None = None  # the epoch's weights are final (rewind point)
    checkpoint: Callable[[int, list[list[EpochStats]]], None] | None = None  # persist, resume
    evaluated: Callable[[int, list[EpochStats]], None] | None = None  # progress and logs


class Layout:
    """How the models of an engine sit in its network: one model (this class) or K packed
    ones (`packed.Packed`). The engine asks it for each step's batch, loss, learning rate and
    per-model accuracy, and for the seeds of data order and augmentation."""

    models = 1

    def bind(self, engine: Engine, seeds: Sequence[int]) -> None:
        self.engine = engine
        self.order_gen = torch.Generator()
        # CPU: a private generator makes runs reproducible and resumable. CUDA graphs need the
        # device's default generator, seeded in `reseed`.
        self.aug_gen = torch.Generator() if engine.device.type != "cuda" else None
        self.reseed(seeds)

    def index_shape(self, main_batch: int) -> tuple[int, ...]:
        return (main_batch,)

    def aug_generators(self) -> list[torch.Generator]:
        """The CPU generators crops and flips are drawn from (none on CUDA, which draws from
        the device's default generator)."""
        return [self.aug_gen] if self.aug_gen is not None else []

    def aug_seed(self, seed: int) -> int:
        """Every rank crops its own images differently; one process keeps seed + 1."""
        return seed + 1 + 1_000_003 * self.engine.rank

    def reseed(self, seeds: Sequence[int]) -> None:
        (seed,) = seeds
        self.seed = seed  # a streamed dataset's order and crops come from (seed, epoch)
        self.order_gen.manual_seed(seed)
        if self.aug_gen is not None:
            self.aug_gen.manual_seed(self.aug_seed(seed))
        else:
            torch.cuda.manual_seed(self.aug_seed(seed))

    def rng_state(self) -> dict[str, torch.Tensor]:
        out = {"rng.order": self.order_gen.get_state()}
        if self.aug_gen is not None:
            out["rng.aug"] = self.aug_gen.get_state()
        return out

    def load_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        self.order_gen.set_state(state["rng.order"])
        if self.aug_gen is not None and "rng.aug" in state:
            self.aug_gen.set_state(state["rng.aug"])

    def epoch_order(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.order_gen).to(self.engine.device)

    def draw(self, shape: torch.Size) -> tuple[torch.Tensor, ...]:
        """The random crops and flips of a batch of this index shape (drawn apart from
        `crop`, so a compiled step can take them as inputs: see `Engine._batch_loss`)."""
        gen = self.aug_gen
        dev = self.engine.device if gen is None else "cpu"
        n = shape[0]
        dy = torch.randint(0, 2 * PAD + 1, (n,), generator=gen, device=dev)
        dx = torch.randint(0, 2 * PAD + 1, (n,), generator=gen, device=dev)
        flip = torch.randint(0, 2, (n,), generator=gen, device=dev)
        return dy, dx, flip

    def crop(self, x: torch.Tensor, draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The batch cropped and flipped as `draw` said (no randomness here: traceable)."""
        return crop_flip(x, *draws)

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(loss_logits(out), y,
                               label_smoothing=self.engine.cfg.label_smoothing)

    def set_lr(self, epoch: int, step: int) -> None:
        """Per-model rates beside the engine's one (packed models with their own schedules)."""

    def step_lr(self) -> torch.Tensor | list[torch.Tensor]:
        return self.engine.lr_t

    def last_epoch(self, k: int, end: int) -> int:
        """Model k's last epoch of a run that ends at `end`."""
        return end

    def after_epoch(self, epoch: int) -> None:
        """Called by the loop after each epoch's evaluation."""

    def split_state(self, state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The network's state as each model's."""
        return [state]


class Engine:
    """Trains the models of one network on one dataset under a (changeable) mask."""

    def __init__(
        self,
        model: nn.Module,
        data: Dataset | StreamedDataset,
        cfg: TrainConfig,
        mask: Mask | None = None,
        trigger: tuple[torch.Tensor, torch.Tensor] | None = None,
        trigger_per_batch: int = 1,
        dist: DistContext | None = None,
        layout: Layout | None = None,
        seeds: Sequence[int] | None = None,
    ) -> None:
        """trigger: (normalised images, labels) mixed into every batch, `trigger_per_batch`
        at a time, cycling through the set (Scheme V3; the paper adds one per batch).
        dist: train data-parallel over the ranks of a torch.distributed group (see
        `ticketctl.distributed`); `cfg.batch_size` is the global batch.
        layout: one model (default) or K packed ones; seeds: one per model (default
        `cfg.seed`) for data order and augmentation."""
        cfg.validate()
        self.layout = layout or Layout()
        if self.layout.models > 1 and (dist is not None or trigger is not None):
            raise TicketctlError("packed training runs in one process and without triggers")
        self.streamed = data.streamed
        if self.layout.models > 1:
            data.require_resident("training models packed together (--pack)")
        self.dist = dist
        self.rank = dist.rank if dist else 0
        self.cfg = cfg
        self.data = data
        self.device = data.device
        cuda = self.device.type == "cuda"
        self.bf16 = cfg.bf16 and cuda
        self.channels_last = cfg.channels_last and cuda
        self.use_compile = cfg.compile and (cuda or COMPILE_ON_CPU)
        # Data-parallel too: the gradients' all-reduce is part of the captured step.
        self.use_graph = cfg.cuda_graph and cuda
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        self.model = model
        # Data-parallel with buckets: the network compiled in pieces, so that the gradients'
        # all-reduce overlaps the backward (`overlap`); the step around them is not compiled
        # with them (one compiled step would be one backward again).
        self.bucket_bytes = math.ceil(cfg.bucket_mb * 2**20) if dist is not None else 0
        self.units: list[str] = []
        if self.use_compile and self.bucket_bytes:
            units = overlap_units(model, self.bucket_bytes)
            compile_units(units, lambda f: _compile(f, cfg))
            self.units = [name for name, _ in units]
            self.forward = model
        else:
            # dynamic=False: training and evaluation batches each get their own static graph.
            self.forward = _compile(model, cfg) if self.use_compile else model
        # The whole step compiled (see `_batch_loss`), not the network alone; the compiled
        # network above still scores the splits.
        self.fused = self.use_compile and cfg.fuse_step
        self._loss = _compile(self._batch_loss, cfg) if self.fused and not self.units \
            else self._batch_loss
        self._update = _compile(self._sgd_update, cfg) if self.fused else self._sgd_update
        if dist is not None:
            if trigger is not None:
                raise TicketctlError("trigger retraining does not run distributed yet")
            if cfg.batch_size % dist.world:
                raise TicketctlError(f"--batch-size {cfg.batch_size} (the global batch) must "
                                     f"divide evenly among {dist.world} processes")
            # No DistributedDataParallel wrapper: its per-bucket hooks and Python work each
            # step kept two H200s slower than one GPU's CUDA graph (20-31% scaling
            # efficiency, docs/DISTRIBUTED.md). The step averages the gradients itself, in one
            # all-reduce that a CUDA graph captures with the rest of the step.
            broadcast_parameters(dist, model)  # rank 0's weights everywhere, as DDP starts

        named = dict(model.named_parameters())
        self.param_names = list(named)
        self.mask_names = list(mask) if mask is not None else []
        self.mask_bufs: dict[str, torch.Tensor] = {}
        for name in self.mask_names:
            buf = torch.empty_like(named[name])  # same strides as the weight (channels_last)
            buf.copy_(mask[name].to(self.device))
            self.mask_bufs[name] = buf
        self.opt = MaskedSGD(
            [named[n] for n in self.param_names],
            [self.mask_bufs.get(n) for n in self.param_names],
            momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
        )
        self.apply_mask_()
        # data-parallel: the dtype the gradients are averaged in (None: their own)
        self.wire = torch.bfloat16 if cfg.reduce_bf16 else None
        self.reducer: BucketReducer | None = None
        if dist is not None and self.bucket_bytes:
            self.reducer = BucketReducer(
                dist, [p for p in self.opt.params if p.requires_grad], self.bucket_bytes,
                self.wire)

        self.trigger_x = self.trigger_y = None
        self.k = 0
        if trigger is not None:
            if not 1 <= trigger_per_batch < cfg.batch_size:
                raise TicketctlError(f"--trigger-per-batch must be in [1, batch size), got "
                                     f"{trigger_per_batch}")
            self.trigger_x = trigger[0].to(self.device)
            self.trigger_y = trigger[1].to(self.device, torch.long)
            self.k = trigger_per_batch
        self.main_batch = cfg.batch_size - self.k
        self.global_batch = self.main_batch  # the stride between batches in the permutation
        if dist is not None:
            self.main_batch = cfg.batch_size // dist.world  # this rank's slice of every batch
            self.global_batch = cfg.batch_size
        n = len(data.train_y)
        if self.global_batch > n:
            raise TicketctlError(f"--batch-size {cfg.batch_size} is more than the {n} training "
                                 f"images; pass --batch-size {n} or less")
        self.steps_per_epoch = n // self.global_batch  # the last partial one is dropped
        self.lr_t = torch.zeros((), device=self.device)
        self.batch_idx = torch.zeros(self.layout.index_shape(self.main_batch), dtype=torch.long,
                                     device=self.device)
        self.trig_idx = torch.zeros(max(1, self.k), dtype=torch.long, device=self.device)
        if self.streamed:  # what the step reads: the stream copies each batch in
            _, h, w = data.input_shape
            self.x_in = torch.zeros((self.main_batch, h, w, 3), dtype=torch.uint8,
                                    device=self.device)
            self.y_in = torch.zeros(self.main_batch, dtype=torch.long, device=self.device)
        if dist is not None:  # (an image folder's choice to stream depends on free memory)
            check_same(dist, hashlib.sha256(json.dumps(
                [self.streamed, list(data.input_shape), len(data.train_y)]).encode()
            ).hexdigest(), "the dataset (streamed or in memory, its size)")
        self.loss_sum = torch.zeros((), device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.compile_seconds = 0.0
        self.last_lr = 0.0
        self.layout.bind(self, list(seeds) if seeds is not None else [cfg.seed])

    # ---- state that IMP rewinds, always in place -------------------------------------------
    @torch.no_grad()
    def apply_mask_(self) -> None:
        named = dict(self.model.named_parameters())
        for name, buf in self.mask_bufs.items():
            named[name].mul_(buf)

    @torch.no_grad()
    def set_mask(self, mask: Mask) -> None:
        if set(mask) != set(self.mask_names):  # (a mask read from a file is in name order)
            raise ValueError("a trainer's mask covers a fixed set of parameters")
        for name, buf in self.mask_bufs.items():
            buf.copy_(mask[name].to(self.device))
        self.apply_mask_()

    def set_schedule(self, cfg: TrainConfig) -> None:
        """Another learning-rate schedule (epochs, lr, warm-up) for the same captured step;
        what the step captured (batch, optimizer constants, precision) must not change."""
        fixed = ("batch_size", "momentum", "weight_decay", "nesterov", "bf16", "channels_last",
                 "compile", "cuda_graph", "label_smoothing", "compile_mode", "fuse_step",
                 "combo_kernels", "reduce_bf16", "bucket_mb")
        changed = [f for f in fixed if getattr(cfg, f) != getattr(self.cfg, f)]
        if changed:
            raise ValueError(f"a trainer's {', '.join(changed)} cannot change")
        cfg.validate()
        self.cfg = cfg

    def model_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the model's state dict (weights and BatchNorm statistics)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        for k, t in self.model.state_dict().items():
            t.copy_(state[k])
        self.apply_mask_()

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        return {f"momentum.{n}": b.detach().to("cpu", copy=True)
                for n, b in zip(self.param_names, self.opt.bufs, strict=True)}

    @torch.no_grad()
    def load_optimizer_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is None:
            self.opt.reset_()
            return
        for n, b in zip(self.param_names, self.opt.bufs, strict=True):
            b.copy_(state[f"momentum.{n}"])

    def rng_state(self) -> dict[str, torch.Tensor]:
        return self.layout.rng_state()

    def load_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        self.layout.load_rng_state(state)

    def reseed(self, seeds: Sequence[int] | int) -> None:
        """Fresh data order and augmentation (one seed per model) for another training."""
        self.layout.reseed([seeds] * self.layout.models if isinstance(seeds, int)
                           else list(seeds))

    def restart(self, state: dict[str, torch.Tensor], *, mask: Mask | None = None,
                optimizer: dict[str, torch.Tensor] | None = None,
                seeds: Sequence[int] | int | None = None) -> None:
        """Start another training in the same network (and captured step): the mask if one is
        given, these weights and statistics, this momentum (None: zero), and the data order
        and augmentation of `seeds` (default: the configuration's seed)."""
        if mask is not None:
            self.set_mask(mask)
        self.load_model_state(state)
        self.load_optimizer_state(optimizer)
        self.reseed(self.cfg.seed if seeds is None else seeds)

    # ---- the step -----------------------------------------------------------------------------
    def _step(self) -> None:
        draws = None
        if not self.streamed and self.data.augment != "none":
            # drawn outside the compiled part, from the same generator in the same order
            draws = self.layout.draw(self.batch_idx.shape)
        # bf16 autocast around the whole step's loss, not inside it: a compiled function that
        # enters autocast itself is not kept in AOTAutograd's on-disk cache, so every process
        # traced and partitioned the step's forward and backward again. Outside the network
        # autocast leaves the step's operations as they are (indexing, padding, a gather; a
        # cat of fp32 inputs; a cross-entropy of logits already in fp32), and the backward
        # is traced without autocast, as eager autograd runs it (`_backward_as_eager`).
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16), \
                (_backward_as_eager() if self.use_compile else contextlib.nullcontext()):
            loss = self._loss(draws)
        if self.reducer is not None:
            self.reducer.arm()
        loss.backward()
        # data-parallel: the update reads the ranks' mean gradients where the all-reduce
        # left them (or, with buckets, from `.grad`, where each bucket copied them back)
        self._update(self._average_grads() if self.dist is not None else None)
        self.loss_sum += loss.detach() if self.layout.models == 1 else \
            loss.detach() / self.layout.models

    def _batch_loss(self, draws: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """The step's loss from its inputs: batch gather, crop and flip, triggers, forward and
        loss. With `fuse_step` this is compiled as one function, so its small kernels are
        fused with the network's (ResNet-20 at batch 128 is bound by their number)."""
        if self.streamed:  # already augmented by the stream
            x = self.layout.network_input(self.data.to_input(self.x_in, self.channels_last))
            y = self.y_in
        else:
            x = self.data.train_x[self.batch_idx]
            if draws is not None:
                x = self.layout.crop(x, draws)
            x = self.layout.network_input(x)
            y = self.data.train_y[self.batch_idx]
        if self.trigger_x is not None:  # triggers go in as they are, unaugmented
            x = torch.cat([x, self.trigger_x[self.trig_idx]])
            y = torch.cat([y, self.trigger_y[self.trig_idx]])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # the compiled network (bf16 autocast is on around this whole function, see
        # `_step`), which a compiled step traces into: should Dynamo ever give up on the
        # step (its recompile limit), the network is still compiled
        out = self.forward(x)
        return self.layout.loss(out, y)

    def _sgd_update(self, grads: list[torch.Tensor | None] | None = None) -> None:
        """Masked SGD at the step's learning rate(s), from `grads` (default: `.grad`)
        (compiled with `fuse_step`: its foreach operations over every parameter become a
        few fused kernels)."""
        self.opt.step(self.layout.step_lr(), grads)

    def _average_grads(self) -> list[torch.Tensor | None] | None:
        """The ranks' mean gradients (what DDP computes), in the optimizer's parameter
        order; None where they are already in `.grad` (buckets copied them back)."""
        assert self.dist is not None
        if self.reducer is not None:  # the buckets' all-reduces, started during backward
            self.reducer.finish()
            return None
        # a parameter without a gradient (frozen, unused) stays None: the update leaves it
        return averaged_grads(self.dist, [p.grad for p in self.opt.params], self.wire)

    def _eager_step(self) -> None:
        for p in self.opt.params:
            p.grad = None
        self._step()

    def _capture(self) -> None:
        """Warm up (compiles), restore the state the warm-up touched, then capture one step."""
        t0 = time.perf_counter()
        saved = (self.model_state(), self.optimizer_state())
        self.batch_idx.copy_(torch.arange(self.main_batch, device=self.device)
                             % len(self.data.train_y))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._eager_step()
        torch.cuda.current_stream().wait_stream(side)
        for p in self.opt.params:
            p.grad = None
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        # Data-parallel: the capture is thread-local, so the NCCL watchdog thread may still
        # query the events of collectives issued before it (as nccl-tests captures), and the
        # graph is released before the process group is destroyed (pytorch#115388).
        mode = "thread_local" if self.dist is not None else "global"
        with torch.cuda.graph(self.graph, capture_error_mode=mode):
            self._step()
        torch.cuda.synchronize()
        if self.dist is not None:
            release_before_shutdown(self)
        self.load_model_state(saved[0])
        self.load_optimizer_state(saved[1])
        self.loss_sum.zero_()
        self.compile_seconds += time.perf_counter() - t0

    def train_epoch(self, epoch: int, steps: int | None = None) -> float:
        """One epoch (numbered from 1) over a fresh permutation; returns the mean loss.
        `steps`: only the epoch's first steps (benchmarks)."""
        self._prepare()
        self.model.train()
        if steps is not None and steps < 1:
            raise TicketctlError(f"an epoch of {steps} steps trains nothing; give at least 1")
        steps = self.steps_per_epoch if steps is None else min(steps, self.steps_per_epoch)
        if self.streamed:
            batches = self.data.train_batches(self.layout.seed, epoch, steps, self.global_batch,
                                              self.rank, self.main_batch)
        else:
            order = self.layout.epoch_order(len(self.data.train_y))
        self.loss_sum.zero_()
        bs = self.main_batch
        lr = 0.0
        if self.trigger_x is not None:  # cycle through the set across steps and epochs
            first = (epoch - 1) * self.steps_per_epoch * self.k
            cycle = (torch.arange(self.steps_per_epoch * self.k, device=self.device) + first) \
                % len(self.trigger_y)
            cycle = cycle.view(self.steps_per_epoch, self.k)
        for b in range(steps):
            lr = self._set_lr(epoch, b)
            if self.streamed:
                self._feed(*next(batches))
            else:
                start = b * self.global_batch + self.rank * bs
                self.batch_idx.copy_(order[..., start:start + bs])
            if self.trigger_x is not None:
                self.trig_idx.copy_(cycle[b])
            self._run_step()
        self.last_lr = lr
        if self.dist is not None:
            broadcast_module_state(self.dist, self.model)
            if fail_rank_for_tests() == self.rank:
                raise RuntimeError(f"TICKETCTL_FAIL_RANK: rank {self.rank} fails on purpose")
        return float(self.loss_sum) / steps

    def _prepare(self) -> None:
        """Capture the step's graph, or compile, once, before the first step."""
        if self.use_graph and self.graph is None:
            self._capture()
        elif self.use_compile and not self.compile_seconds:
            t0 = time.perf_counter()
            self._warm_compile()
            self.compile_seconds = time.perf_counter() - t0

    def _feed(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """A streamed batch into the buffers the step reads (from pinned memory the copy
        overlaps the step before)."""
        self.x_in.copy_(x, non_blocking=True)
        self.y_in.copy_(y, non_blocking=True)

    def release_graph(self, sync: bool = True) -> None:
        """Drop the captured step (it is captured again on the next epoch); `sync`: first
        wait for the device to finish what it runs."""
        if self.graph is not None:
            if sync:
                torch.cuda.synchronize()
            self.graph = None

    def _run_step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._eager_step()

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int = 1, step: int = 0
                   ) -> None:
        """One training step on a batch shaped as a streamed dataset's (uint8 N x H x W x 3
        and labels, on any device), at the learning rate of (epoch, step): what
        `train_epoch` does with each batch it reads, for batches from elsewhere (a benchmark
        compares loaders through it)."""
        if not self.streamed:
            raise TicketctlError("train_step takes batches for a streamed dataset's trainer")
        self._prepare()
        self.model.train()
        self._set_lr(epoch, step)
        self._feed(x, y)
        self._run_step()

    def _set_lr(self, epoch: int, b: int) -> float:
        lr = lr_at(self.cfg, (epoch - 1) * self.steps_per_epoch + b, self.steps_per_epoch)
        self.lr_t.fill_(lr)
        self.layout.set_lr(epoch, b)
        return lr

    def _warm_compile(self) -> None:
        """Compile outside the timed epochs (compile without graphs): one step, then undo it."""
        saved = (self.model_state(), self.optimizer_state())
        gens = self.layout.aug_generators()  # the warm step's crops are undone too
        rng = [g.get_state() for g in gens]
        self.batch_idx.copy_(torch.arange(self.main_batch, device=self.device)
                             % len(self.data.train_y))
        self._eager_step()
        self.load_model_state(saved[0])
        self.load_optimizer_state(saved[1])
        for g, state in zip(gens, rng, strict=True):
            g.set_state(state)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_models(self, split: str = "test") -> list[float]:
        """Each model's top-1 accuracy in percent on `val`, `test` or `trigger` (NaN for an
        empty split or no trigger set)."""
        if split == "trigger":
            if self.trigger_x is None:
                return [float("nan")] * self.layout.models
            x, y = self.trigger_x, self.trigger_y
        elif self.streamed:
            n = len(self.data.split(split))
            if n == 0:
                return [float("nan")]
            # each rank decodes and scores its share of the files; the counts add up
            w, r = (self.dist.world, self.dist.rank) if self.dist is not None else (1, 0)
            compiled = self.use_compile
            mine = streamed_correct(self.forward if compiled else self.model, self.data, split,
                                    self.cfg.eval_batch_size, bf16=self.bf16,
                                    channels_last=self.channels_last, fixed_batch=compiled,
                                    module=self.model, part=(n * r // w, n * (r + 1) // w))
            total = sum_counts(self.dist, [mine])[0] if self.dist is not None else mine
            return [100.0 * total / n]
        else:
            x = getattr(self.data, f"{split}_x")
            y = getattr(self.data, f"{split}_y")
        compiled = self.use_compile
        if self.dist is not None and len(y):  # each rank scores its share; the counts add up
            n, w, r = len(y), self.dist.world, self.dist.rank
            lo, hi = n * r // w, n * (r + 1) // w
            mine = correct_counts(self.forward if compiled else self.model, x[lo:hi],
                                  y[lo:hi], self.cfg.eval_batch_size, bf16=self.bf16,
                                  channels_last=self.channels_last, fixed_batch=compiled,
                                  module=self.model, packs=self.layout.models)
            return [100.0 * c / n for c in sum_counts(self.dist, mine)]
        return accuracies(self.forward if compiled else self.model, x, y,
                          self.cfg.eval_batch_size, bf16=self.bf16,
                          channels_last=self.channels_last, fixed_batch=compiled,
                          module=self.model, packs=self.layout.models)

    def epoch_stats(self, epoch: int, loss: float, started: float,
                    histories: list[list[EpochStats]] | None = None) -> list[EpochStats]:
        """Evaluate every model after an epoch: validation, test, and the trigger set. With
        `test_eval` "best" and the `histories` so far, the test split only when some model's
        validation accuracy is a new best (the epochs a result can be taken at)."""
        vals = self.evaluate_models("val")
        if self.cfg.test_eval == "best" and histories is not None and \
                not any(_new_best(v, h) for v, h in zip(vals, histories, strict=True)):
            tests: list[float | None] = [None] * self.layout.models
        else:
            tests = list(self.evaluate_models("test"))
        trigs: list[float | None] = list(self.evaluate_models("trigger")) \
            if self.trigger_x is not None else [None] * self.layout.models
        seconds = time.perf_counter() - started
        return [EpochStats(epoch, self.last_lr, loss, _nan_to_none(v), t, seconds, g)
                for v, t, g in zip(vals, tests, trigs, strict=True)]

    # ---- the epoch loop -----------------------------------------------------------------------
    def run(self, start_epoch: int, end_epoch: int,
            histories: list[list[EpochStats]] | None = None,
            hooks: Hooks | None = None,
            best: list[dict[str, torch.Tensor] | None] | None = None) -> list[TrainResult]:
        """The one epoch loop: train epochs start_epoch+1 .. end_epoch, evaluate every model
        after each, then the caller's hooks. Each model's result is taken at its
        best-validation epoch (the paper's rule), and that epoch's weights are kept in
        `best_states`, so what is saved is the model the numbers describe. `histories` and
        `best` continue a resumed run."""
        hooks = hooks or Hooks()
        histories = histories if histories is not None else \
            [[] for _ in range(self.layout.models)]
        self.best_states = list(best) if best is not None else [None] * self.layout.models
        t0 = time.perf_counter()
        for epoch in range(start_epoch + 1, end_epoch + 1):
            te = time.perf_counter()
            loss = self.train_epoch(epoch)
            stats = self.epoch_stats(epoch, loss, te, histories)
            for k, (h, s) in enumerate(zip(histories, stats, strict=True)):
                if epoch <= self.layout.last_epoch(k, end_epoch):
                    h.append(s)
            self._keep_best(epoch, histories)
            self.layout.after_epoch(epoch)
            if hooks.trained:
                hooks.trained(epoch)
            if hooks.checkpoint:
                hooks.checkpoint(epoch, histories)
            if hooks.evaluated:
                hooks.evaluated(epoch, stats)
        seconds = time.perf_counter() - t0
        return [summarize(h, seconds) for h in histories]


    def _keep_best(self, epoch: int, histories: list[list[EpochStats]]) -> None:
        """Copy the weights of every model for which this epoch is now the best (by the same
        rule as `summarize`)."""
        new = [k for k, h in enumerate(histories)
               if h and h[-1].epoch == epoch and summarize(h).best_epoch == epoch]
        if new:
            states = self.layout.split_state(self.model_state())
            for k in new:
                self.best_states[k] = states[k]


class Trainer(Engine):
    """Trains one model (see `Engine`)."""

    def fit(
        self,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        on_epoch: Callable[[EpochStats], None] | None = None,
        history: list[EpochStats] | None = None,
    ) -> TrainResult:
        """Train epochs start_epoch+1 .. end_epoch (default: the schedule's last) and evaluate
        after each; the result's test accuracy is taken at the best-validation epoch."""
        end = self.cfg.epochs if end_epoch is None else end_epoch
        hooks = Hooks(evaluated=(lambda _e, stats: on_epoch(stats[0])) if on_epoch else None)
        return self.run(start_epoch, end, [list(history or [])], hooks)[0]

    def best_state(self) -> dict[str, torch.Tensor]:
        """The weights of the epoch the last `fit` reports (its best-validation epoch)."""
        best = getattr(self, "best_states", [None])[0]
        return best if best is not None else self.model_state()

    def evaluate(self, split: str = "test") -> float:
        """Top-1 accuracy in percent on `val`, `test` or `trigger` (NaN for an empty split)."""
        return self.evaluate_models(split)[0]


def _new_best(val: float, history: list[EpochStats]) -> bool:
    """Would an epoch with validation accuracy `val` be `summarize`'s pick after `history`?
    Without a validation split (NaN) every epoch may be: the last one is taken."""
    if val != val:
        return True
    seen = [h.val_accuracy for h in history if h.val_accuracy is not None]
    return not seen or (val or -1.0) > max(v or -1.0 for v in seen)


def summarize(history: list[EpochStats], seconds: float = 0.0) -> TrainResult:
    """Pick the best-validation epoch (ties: the earlier one)."""
    if not history:
        return TrainResult(0, None, float("nan"), [], seconds)
    if all(h.val_accuracy is None for h in history):
        best = history[-1]
    else:
        best = max(history, key=lambda h: (h.val_accuracy or -1.0, -h.epoch))
    return TrainResult(best.epoch, best.val_accuracy, best.test_accuracy, history, seconds,
                       best.trigger_accuracy)


def _correct(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, batch_size: int,
             bf16: bool, channels_last: bool, fixed_batch: bool, packs: int) -> torch.Tensor:
    """Each of the `packs` models' correct answers on one batch."""
    n = len(yb)
    if fixed_batch and n < batch_size:
        xb = torch.cat([xb, xb.new_zeros((batch_size - n, *xb.shape[1:]))])
    if packs > 1:
        xb = xb.repeat(1, packs, 1, 1)
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(xb)
    pred = out[:n].view(n, packs, -1).argmax(2)
    return (pred == yb.view(n, 1)).sum(0)


@torch.no_grad()
def accuracies(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1000,
    bf16: bool = False,
    channels_last: bool = False,
    fixed_batch: bool = False,
    module: nn.Module | None = None,
    packs: int = 1,
) -> list[float]:
    """Top-1 accuracy in percent of each of the `packs` models of a (packed) network; every
    model sees the same images. With `fixed_batch` the last chunk is padded so a compiled
    model sees one shape only."""
    if len(y) == 0:
        return [float("nan")] * packs
    counts = correct_counts(model, x, y, batch_size, bf16, channels_last, fixed_batch, module,
                            packs)
    return [100.0 * c / len(y) for c in counts]


@torch.no_grad()
def correct_counts(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1000,
    bf16: bool = False,
    channels_last: bool = False,
    fixed_batch: bool = False,
    module: nn.Module | None = None,
    packs: int = 1,
) -> list[int]:
    """How many of the images each of the `packs` models classifies right (`accuracies`
    before the division: counts from several ranks add up exactly)."""
    chunks = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size))
    return _count(model, chunks, x.device, batch_size, bf16, channels_last, fixed_batch,
                  module, packs)


@torch.no_grad()
def streamed_correct(
    model: nn.Module,
    data: StreamedDataset,
    split: str,
    batch_size: int = 1000,
    bf16: bool = False,
    channels_last: bool = False,
    fixed_batch: bool = False,
    module: nn.Module | None = None,
    part: tuple[int, int] | None = None,
) -> int:
    """How many images of a streamed split (of its files [lo, hi) when `part` is given) one
    model classifies right, read batch by batch."""
    dev = data.device
    chunks = ((data.to_input(xb.to(dev, non_blocking=True), channels_last), yb.to(dev))
              for xb, yb in data.eval_batches(split, batch_size, part))
    return _count(model, chunks, dev, batch_size, bf16, channels_last, fixed_batch, module,
                  1)[0]


def _count(model: nn.Module, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
           device: torch.device, batch_size: int, bf16: bool, channels_last: bool,
           fixed_batch: bool, module: nn.Module | None, packs: int) -> list[int]:
    """Each model's correct answers over `chunks` of (images, labels), in eval mode."""
    mod = module or model
    was_training = mod.training
    mod.eval()
    correct = torch.zeros(packs, dtype=torch.long, device=device)
    for xb, yb in chunks:
        correct += _correct(model, xb, yb, batch_size, bf16, channels_last, fixed_batch, packs)
    mod.train(was_training)
    return [int(c) for c in correct.tolist()]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             bf16: bool = False, channels_last: bool = False) -> float:
    """Top-1 accuracy in percent of one model (NaN for no images)."""
    return accuracies(model, x, y, batch_size, bf16=bf16, channels_last=channels_last)[0]
