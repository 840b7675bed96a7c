"""Training settings: one dataclass, so presets and CLI flags come from one place."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ticketctl.errors import TicketctlError
from ticketctl.records import Choice, Overrides


class Schedule(Choice):
    """Learning-rate schedules (see `schedule.lr_at`)."""

    MULTISTEP = "multistep"
    COSINE = "cosine"


class ScoreTest(Choice):
    """When the test split is scored: after every epoch, or only after an epoch that is the
    best on the validation split so far (all a result needs: it is the test accuracy at the
    best-validation epoch; the epoch log then has no test accuracy for the other epochs)."""

    EVERY = "every"
    BEST = "best"


# torch.compile modes the trainer can use: its own CUDA graph excludes the modes that capture
# one themselves ("reduce-overhead", "max-autotune").
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# Settings added after run folders and job caches existed: written out only when changed, so
# the settings hash of everything trained before stays the same.
_NEWER = {"compile_mode": "default", "test_eval": "every", "fuse_step": True,
          "combo_kernels": False, "reduce_bf16": False, "bucket_mb": 0.0}


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "multistep"  # multistep | cosine
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    seed: int = 0
    eval_batch_size: int = 1000
    # CUDA only (ignored on CPU, which always runs plain eager fp32):
    bf16: bool = True
    channels_last: bool = True
    compile: bool = True
    cuda_graph: bool = True
    compile_mode: str = "default"  # or "max-autotune-no-cudagraphs": kernels chosen by timing
    test_eval: str = "every"  # or "best" (see ScoreTest)
    # CUDA with compile: the step's gather, augmentation, loss and masked SGD compiled with
    # the network (False: the network alone, as before; the same arithmetic either way)
    fuse_step: bool = True
    # CUDA with compile: Inductor's combo kernels (independent small kernels launched as
    # one; the same arithmetic): 5% off a batch-128 ResNet-20 epoch on an H200
    combo_kernels: bool = False
    # Data-parallel only: the gradients averaged over the ranks in bf16 (half the bytes of
    # the all-reduce; each gradient rounded to bf16 first, as DDP's bf16 compression hook)
    reduce_bf16: bool = False
    # Data-parallel only: the gradients averaged in buckets of about this many MiB, each as
    # soon as backward has produced it, overlapping the all-reduce with the rest of
    # backward (with compile, the network is then compiled block by block); 0 (the
    # default, the faster on two H200s: docs/DISTRIBUTED.md): one all-reduce after backward
    bucket_mb: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if _NEWER.get(k, object()) != v}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> None:
        raise_all(self.problems())

    def problems(self) -> list[str]:
        """Every setting that cannot work, each with the flag that fixes it."""
        out = []
        if self.epochs < 1:
            out.append(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            out.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.lr <= 0:
            out.append(f"--lr must be positive, got {self.lr}")
        if self.schedule not in [s.value for s in Schedule]:
            out.append(f"unknown schedule {self.schedule!r}; use multistep or cosine")
        if not 0 <= self.momentum < 1:
            out.append(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            out.append(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if not 0 <= self.bucket_mb < math.inf:
            out.append(f"--bucket-mb must be 0 or more, got {self.bucket_mb}")
        if self.compile_mode not in COMPILE_MODES:
            out.append(f"unknown --compile-mode {self.compile_mode!r}; use "
                       f"{' or '.join(COMPILE_MODES)}")
        if self.test_eval not in [t.value for t in ScoreTest]:
            out.append(f"unknown --test-eval {self.test_eval!r}; use every or best")
        if self.warmup_epochs < 0 or self.warmup_epochs >= max(1, self.epochs):
            out.append(f"--warmup-epochs must be in [0, epochs={self.epochs}), got "
                       f"{self.warmup_epochs}")
        return out


def raise_all(problems: list[str]) -> None:
    """One error naming every problem at once, so a user fixes them in one go."""
    if problems:
        raise TicketctlError("; ".join(problems))


@dataclass
class TrainOverrides(Overrides):
    """Training settings given explicitly: each that is not None replaces the preset's."""

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    nesterov: bool | None = None
    schedule: str | None = None
    milestones: list[int] | None = None
    warmup_epochs: int | None = None
    seed: int | None = None
    bf16: bool | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    cuda_graph: bool | None = None
    compile_mode: str | None = None
    test_eval: str | None = None
    fuse_step: bool | None = None
    combo_kernels: bool | None = None
    reduce_bf16: bool | None = None
    bucket_mb: float | None = None
