"""Training K independent models of one architecture in one pass (see `packing`): each keeps
its own weights, mask, BatchNorm statistics, momentum, seed, data order and augmentation, and
on CPU in fp32 follows the same trajectory as when trained alone. On CUDA the CUDA-graph,
bf16, channels_last and compile options of the single trainer apply unchanged; augmentation
draws then come from the device generator, as for a single model."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from ticketctl.artifacts import Mask
from ticketctl.data import Dataset
from ticketctl.data.augment import PAD, crop_flip
from ticketctl.errors import TicketctlError
from ticketctl.train.config import TrainConfig
from ticketctl.train.engine import EpochStats, Trainer, TrainResult, _nan_to_none, summarize
from ticketctl.train.packing import pack_model, pack_states, packed_loss, stack_inputs, unpack_state
from ticketctl.train.schedule import lr_at


def pack_masks(masks: Sequence[Mask]) -> Mask:
    names = list(masks[0])
    if any(list(m) != names for m in masks):
        raise TicketctlError("packed models need masks over the same parameters")
    return Mask({n: torch.cat([m[n] for m in masks]) for n in names})


class PackedTrainer(Trainer):
    """`packs` models trained together; `seeds[k]` plays the role of model k's `cfg.seed`."""

    def __init__(self, template: nn.Module, data: Dataset, cfg: TrainConfig,
                 masks: Sequence[Mask] | None, seeds: Sequence[int]) -> None:
        self.packs = len(seeds)
        if self.packs < 1:
            raise TicketctlError("a packed trainer needs at least one model")
        if masks is not None and len(masks) != self.packs:
            raise TicketctlError("one mask per packed model")
        super().__init__(pack_model(template, self.packs), data, cfg,
                         mask=pack_masks(masks) if masks is not None else None)
        self.batch_idx = torch.zeros((self.packs, self.main_batch), dtype=torch.long,
                                     device=self.device)
        # per-model learning rates (set_schedules): each parameter's rows belong to one model
        self.model_cfgs: list[TrainConfig] | None = None
        self.lr_models = torch.zeros(self.packs, device=self.device)
        self._rows = [torch.arange(self.packs, device=self.device).repeat_interleave(
            p.shape[0] // self.packs).view(-1, *[1] * (p.dim() - 1))
            for p in self.opt.params]
        self.order_gens = [torch.Generator() for _ in seeds]
        self.aug_gens = [torch.Generator() for _ in seeds] if self.aug_gen is not None else None
        self.reseed(list(seeds))

    # ---- per-model state ------------------------------------------------------------------
    def reseed(self, seeds: Sequence[int] | int) -> None:  # type: ignore[override]
        seeds = [seeds] * self.packs if isinstance(seeds, int) else list(seeds)
        if len(seeds) != self.packs:
            raise TicketctlError("one seed per packed model")
        for g, s in zip(self.order_gens, seeds, strict=True):
            g.manual_seed(s)
        if self.aug_gens is not None:
            for g, s in zip(self.aug_gens, seeds, strict=True):
                g.manual_seed(s + 1)
        elif self.device.type == "cuda":
            torch.cuda.manual_seed(seeds[0] + 1)

    def set_schedules(self, cfgs: Sequence[TrainConfig] | None) -> None:
        """Give each model its own schedule (e.g. fine-tuning for 5, 10 and 20 epochs in one
        pass): the run lasts the longest; a model whose schedule ended trains at rate 0 and
        its result is taken at its own last epoch. None: every model follows `cfg`."""
        if cfgs is not None:
            if len(cfgs) != self.packs:
                raise TicketctlError("one schedule per packed model")
            longest = max(cfgs, key=lambda c: c.epochs)
            for c in cfgs:
                self.set_schedule(replace(c, epochs=longest.epochs, lr=longest.lr))
            self.set_schedule(longest)
        self.model_cfgs = list(cfgs) if cfgs is not None else None

    def _set_lr(self, epoch: int, b: int) -> float:
        lr = super()._set_lr(epoch, b)
        if self.model_cfgs is not None:
            step = (epoch - 1) * self.steps_per_epoch + b
            rates = [lr_at(c, step, self.steps_per_epoch) if epoch <= c.epochs else 0.0
                     for c in self.model_cfgs]
            self.lr_models.copy_(torch.tensor(rates), non_blocking=True)
        return lr

    def set_masks(self, masks: Sequence[Mask]) -> None:
        self.set_mask(pack_masks(masks))

    def load_model_states(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        if len(states) != self.packs:
            raise TicketctlError("one state per packed model")
        self.load_model_state(pack_states(list(states)))

    def load_optimizer_states(self, states: Sequence[dict[str, torch.Tensor] | None]) -> None:
        """Per-model momentum (None: zero), as `Trainer.optimizer_state` writes it."""
        if all(s is None for s in states):
            self.load_optimizer_state(None)
            return
        zero = {k: torch.zeros_like(v) for k, v in unpack_state(
            self.optimizer_state(), 0, self.packs).items()}
        self.load_optimizer_state(pack_states([s if s is not None else zero for s in states]))

    def model_states(self) -> list[dict[str, torch.Tensor]]:
        packed = self.model_state()
        return [unpack_state(packed, k, self.packs) for k in range(self.packs)]

    # ---- the step -------------------------------------------------------------------------
    def _epoch_order(self) -> torch.Tensor:
        n = len(self.data.train_y)
        return torch.stack([torch.randperm(n, generator=g) for g in self.order_gens]
                           ).to(self.device)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        if self.data.augment == "none":
            return x
        k, n = x.shape[:2]
        if self.aug_gens is not None:  # model by model, in the single trainer's order
            draws = [[torch.randint(0, hi, (n,), generator=g) for hi in
                      (2 * PAD + 1, 2 * PAD + 1, 2)] for g in self.aug_gens]
            dy, dx, flip = (torch.cat([d[i] for d in draws]) for i in range(3))
        else:
            dy = torch.randint(0, 2 * PAD + 1, (k * n,), device=self.device)
            dx = torch.randint(0, 2 * PAD + 1, (k * n,), device=self.device)
            flip = torch.randint(0, 2, (k * n,), device=self.device)
        return crop_flip(x.reshape(k * n, *x.shape[2:]), dy, dx, flip).view(x.shape)

    def _step(self) -> None:
        x = stack_inputs(self._augment(self.data.train_x[self.batch_idx]))
        y = self.data.train_y[self.batch_idx]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.forward(x)
        loss = packed_loss(out, y, self.packs, self.cfg.label_smoothing)
        loss.backward()
        if self.model_cfgs is not None:
            self.opt.step([self.lr_models[r] for r in self._rows])
        else:
            self.opt.step(self.lr_t)
        self.loss_sum += loss.detach() / self.packs

    # ---- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str = "test") -> list[float]:  # type: ignore[override]
        """Each model's top-1 accuracy in percent on `val` or `test`."""
        x = getattr(self.data, f"{split}_x")
        y = getattr(self.data, f"{split}_y")
        if len(y) == 0:
            return [float("nan")] * self.packs
        net = self.forward if self.use_compile else self.model
        bs = self.cfg.eval_batch_size
        self.model.eval()
        correct = torch.zeros(self.packs, dtype=torch.long, device=x.device)
        for i in range(0, len(y), bs):
            xb, yb = x[i:i + bs], y[i:i + bs]
            n = len(yb)
            if self.use_compile and n < bs:
                xb = torch.cat([xb, xb.new_zeros((bs - n, *xb.shape[1:]))])
            xb = xb.repeat(1, self.packs, 1, 1)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = net(xb)
            pred = out[:n].view(n, self.packs, -1).argmax(2)
            correct += (pred == yb.view(n, 1)).sum(0)
        self.model.train()
        return [100.0 * int(c) / len(y) for c in correct.tolist()]

    def fit(self, start_epoch: int = 0, end_epoch: int | None = None,  # type: ignore[override]
            on_epoch: Callable[[list[EpochStats]], None] | None = None,
            history: list[EpochStats] | None = None) -> list[TrainResult]:
        """Train every model and pick each one's best-validation epoch, as `Trainer.fit`."""
        end = self.cfg.epochs if end_epoch is None else end_epoch
        ends = [c.epochs for c in self.model_cfgs] if self.model_cfgs else [end] * self.packs
        histories: list[list[EpochStats]] = [[] for _ in range(self.packs)]
        self.final_states: list[dict[str, torch.Tensor] | None] = [None] * self.packs
        t0 = time.perf_counter()
        for epoch in range(start_epoch + 1, end + 1):
            te = time.perf_counter()
            loss = self.train_epoch(epoch)
            vals, tests = self.evaluate("val"), self.evaluate("test")
            seconds = time.perf_counter() - te
            stats = [EpochStats(epoch, self.last_lr, loss, _nan_to_none(v), t, seconds)
                     for v, t in zip(vals, tests, strict=True)]
            for k, (h, s) in enumerate(zip(histories, stats, strict=True)):
                if epoch <= ends[k]:
                    h.append(s)
                if epoch == ends[k] and self.model_cfgs is not None:
                    # later epochs run at rate 0 but would still move its BatchNorm statistics
                    self.final_states[k] = unpack_state(self.model_state(), k, self.packs)
            if on_epoch:
                on_epoch(stats)
        seconds = time.perf_counter() - t0
        return [summarize(h, seconds) for h in histories]

    def final_model_states(self) -> list[dict[str, torch.Tensor]]:
        """Each model's state at the end of its own schedule (after `fit`)."""
        now = self.model_states()
        return [f if f is not None else n
                for f, n in zip(getattr(self, "final_states", [None] * self.packs), now,
                                strict=True)]


def default_pack(device: torch.device, requested: int | None) -> int:
    """--pack: as asked, else 8 on CUDA (where one small model leaves the GPU idle), else 1."""
    if requested is not None:
        if requested < 1:
            raise TicketctlError(f"--pack must be at least 1, got {requested}")
        return requested
    return 8 if device.type == "cuda" else 1
