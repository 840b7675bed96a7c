"""Training settings: one dataclass, so presets and CLI flags come from one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    seed: int = 0
    eval_batch_size: int = 1024

    def to_dict(self) -> dict:
        return asdict(self)
