"""Training K independent models of one architecture in one pass (see `packing`): each keeps
its own weights, mask, BatchNorm statistics, momentum, seed, data order and augmentation, and
on CPU follows the same trajectory as when trained alone (up to the order of float sums). On
CUDA the CUDA-graph, bf16, channels_last and compile options of the single trainer apply
unchanged; augmentation draws then come from the device generator, as for a single model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from ticketctl.artifacts import Mask
from ticketctl.data import Dataset
from ticketctl.data.augment import PAD, crop_flip
from ticketctl.errors import TicketctlError
from ticketctl.train.config import TrainConfig
from ticketctl.train.engine import Engine, EpochStats, Hooks, Layout, TrainResult
from ticketctl.train.packing import pack_model, pack_states, packed_loss, stack_inputs, unpack_state
from ticketctl.train.schedule import lr_at


def pack_masks(masks: Sequence[Mask]) -> Mask:
    names = list(masks[0])
    if any(list(m) != names for m in masks):
        raise TicketctlError("packed models need masks over the same parameters")
    return Mask({n: torch.cat([m[n] for m in masks]) for n in names})


class Packed(Layout):
    """K models stacked on the channel axis of one network; model k's seed plays the role of
    `cfg.seed` for its data order and augmentation, and it may follow its own schedule."""

    def __init__(self, packs: int) -> None:
        if packs < 1:
            raise TicketctlError("a packed trainer needs at least one model")
        self.models = packs
        self.model_cfgs: list[TrainConfig] | None = None
        self.final_states: list[dict[str, torch.Tensor] | None] = [None] * packs

    def bind(self, engine: Engine, seeds: Sequence[int]) -> None:
        self.engine = engine
        self.order_gens = [torch.Generator() for _ in range(self.models)]
        self.aug_gens = [torch.Generator() for _ in range(self.models)] \
            if engine.device.type != "cuda" else None
        # per-model learning rates: each parameter's rows belong to one model
        self.lr_models = torch.zeros(self.models, device=engine.device)
        self._rows = [torch.arange(self.models, device=engine.device).repeat_interleave(
            p.shape[0] // self.models).view(-1, *[1] * (p.dim() - 1)) for p in engine.opt.params]
        self.reseed(seeds)

    def index_shape(self, main_batch: int) -> tuple[int, ...]:
        return (self.models, main_batch)

    def aug_generators(self) -> list[torch.Generator]:
        return list(self.aug_gens or [])

    def reseed(self, seeds: Sequence[int]) -> None:
        if len(seeds) != self.models:
            raise TicketctlError("one seed per packed model")
        for g, s in zip(self.order_gens, seeds, strict=True):
            g.manual_seed(s)
        if self.aug_gens is not None:
            for g, s in zip(self.aug_gens, seeds, strict=True):
                g.manual_seed(s + 1)
        else:
            torch.cuda.manual_seed(seeds[0] + 1)

    def rng_state(self) -> dict[str, torch.Tensor]:
        raise TicketctlError("packed training is checkpointed per round, not per epoch")

    def load_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        raise TicketctlError("packed training is checkpointed per round, not per epoch")

    def epoch_order(self, n: int) -> torch.Tensor:
        return torch.stack([torch.randperm(n, generator=g) for g in self.order_gens]
                           ).to(self.engine.device)

    def draw(self, shape: torch.Size) -> tuple[torch.Tensor, ...]:
        k, n = shape[:2]
        if self.aug_gens is not None:  # model by model, in the single trainer's order
            draws = [[torch.randint(0, hi, (n,), generator=g) for hi in
                      (2 * PAD + 1, 2 * PAD + 1, 2)] for g in self.aug_gens]
            return tuple(torch.cat([d[i] for d in draws]) for i in range(3))
        dev = self.engine.device
        dy = torch.randint(0, 2 * PAD + 1, (k * n,), device=dev)
        dx = torch.randint(0, 2 * PAD + 1, (k * n,), device=dev)
        flip = torch.randint(0, 2, (k * n,), device=dev)
        return dy, dx, flip

    def crop(self, x: torch.Tensor, draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
        k, n = x.shape[:2]
        return crop_flip(x.reshape(k * n, *x.shape[2:]), *draws).view(x.shape)

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        return stack_inputs(x)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return packed_loss(out, y, self.models, self.engine.cfg.label_smoothing)

    def set_lr(self, epoch: int, step: int) -> None:
        if self.model_cfgs is not None:
            steps = self.engine.steps_per_epoch
            at = (epoch - 1) * steps + step
            rates = [lr_at(c, at, steps) if epoch <= c.epochs else 0.0 for c in self.model_cfgs]
            self.lr_models.copy_(torch.tensor(rates), non_blocking=True)

    def step_lr(self) -> torch.Tensor | list[torch.Tensor]:
        if self.model_cfgs is not None:
            return [self.lr_models[r] for r in self._rows]
        return self.engine.lr_t

    def last_epoch(self, k: int, end: int) -> int:
        return self.model_cfgs[k].epochs if self.model_cfgs is not None else end

    def after_epoch(self, epoch: int) -> None:
        if self.model_cfgs is None:
            return
        for k, c in enumerate(self.model_cfgs):
            if epoch == c.epochs:
                # later epochs run at rate 0 but would still move its BatchNorm statistics
                self.final_states[k] = unpack_state(self.engine.model_state(), k, self.models)

    def split_state(self, state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [unpack_state(state, k, self.models) for k in range(self.models)]


class PackedTrainer:
    """`packs` models trained together in one packed network (an `Engine` with the `Packed`
    layout); `seeds[k]` plays the role of model k's `cfg.seed`."""

    def __init__(self, template: nn.Module, data: Dataset, cfg: TrainConfig,
                 masks: Sequence[Mask] | None, seeds: Sequence[int]) -> None:
        self.packs = len(seeds)
        if masks is not None and len(masks) != self.packs:
            raise TicketctlError("one mask per packed model")
        self.layout = Packed(self.packs)
        self.engine = Engine(pack_model(template, self.packs), data, cfg,
                             mask=pack_masks(masks) if masks is not None else None,
                             layout=self.layout, seeds=seeds)

    @property
    def cfg(self) -> TrainConfig:
        return self.engine.cfg

    def set_schedule(self, cfg: TrainConfig) -> None:
        """Every model follows `cfg` (another schedule for the same captured step)."""
        self.engine.set_schedule(cfg)
        self.layout.model_cfgs = None

    def set_schedules(self, cfgs: Sequence[TrainConfig] | None) -> None:
        """Give each model its own schedule (e.g. fine-tuning for 5, 10 and 20 epochs in one
        pass): the run lasts the longest; a model whose schedule ended trains at rate 0 and
        its result is taken at its own last epoch. None: every model follows `cfg`."""
        if cfgs is not None:
            if len(cfgs) != self.packs:
                raise TicketctlError("one schedule per packed model")
            longest = max(cfgs, key=lambda c: c.epochs)
            for c in cfgs:
                self.engine.set_schedule(replace(c, epochs=longest.epochs, lr=longest.lr))
            self.engine.set_schedule(longest)
        self.layout.model_cfgs = list(cfgs) if cfgs is not None else None

    def restart(self, states: Sequence[dict[str, torch.Tensor]], seeds: Sequence[int], *,
                masks: Sequence[Mask] | None = None,
                optimizers: Sequence[dict[str, torch.Tensor] | None] | None = None) -> None:
        """Start another training of every model, as `Engine.restart` does for one: masks
        (if given), weights and statistics, momentum (None: zero), seeds."""
        if len(states) != self.packs:
            raise TicketctlError("one state per packed model")
        optimizers = list(optimizers) if optimizers is not None else [None] * self.packs
        if all(o is None for o in optimizers):
            optimizer = None
        else:
            zero = {k: torch.zeros_like(v) for k, v in unpack_state(
                self.engine.optimizer_state(), 0, self.packs).items()}
            optimizer = pack_states([o if o is not None else zero for o in optimizers])
        self.engine.restart(pack_states(list(states)), optimizer=optimizer, seeds=seeds,
                            mask=pack_masks(masks) if masks is not None else None)

    def fit(self, start_epoch: int = 0,
            on_epoch: Callable[[list[EpochStats]], None] | None = None) -> list[TrainResult]:
        """Train every model and pick each one's best-validation epoch, as `Trainer.fit`."""
        self.layout.final_states = [None] * self.packs
        hooks = Hooks(evaluated=(lambda _e, stats: on_epoch(stats)) if on_epoch else None)
        return self.engine.run(start_epoch, self.engine.cfg.epochs, hooks=hooks)

    def model_states(self) -> list[dict[str, torch.Tensor]]:
        packed = self.engine.model_state()
        return [unpack_state(packed, k, self.packs) for k in range(self.packs)]

    def final_model_states(self) -> list[dict[str, torch.Tensor]]:
        """Each model's state at the end of its own schedule (after `fit`)."""
        return [f if f is not None else n
                for f, n in zip(self.layout.final_states, self.model_states(), strict=True)]

    def best_model_states(self) -> list[dict[str, torch.Tensor]]:
        """Each model's state at the epoch its result reports (its best-validation epoch
        within its own schedule), after `fit`."""
        return [b if b is not None else f for b, f in
                zip(self.engine.best_states, self.final_model_states(), strict=True)]


# Packing helps only while one model leaves the GPU idle. Measured on one H200 (2026-11-30):
# eight ResNet-20s (0.27 M weights) train in little more than the time of one, while eight
# ResNet-18s (11 M) took 251-277 s against 8 x 28 s one at a time.
PACK_MAX_PARAMS = 2_000_000


def default_pack(device: torch.device, requested: int | None, params: int | None = None) -> int:
    """--pack: as asked, else 8 on CUDA for a small model (at most `PACK_MAX_PARAMS`
    weights, or size unknown), else 1."""
    if requested is not None:
        if requested < 1:
            raise TicketctlError(f"--pack must be at least 1, got {requested}")
        return requested
    if device.type != "cuda":
        return 1
    return 8 if params is None or params <= PACK_MAX_PARAMS else 1


def param_count(state: dict[str, torch.Tensor] | torch.nn.Module) -> int:
    """Floating-point weights in a model or a state dict (what packing multiplies)."""
    tensors = state.parameters() if isinstance(state, torch.nn.Module) else state.values()
    return sum(t.numel() for t in tensors if t.is_floating_point())
