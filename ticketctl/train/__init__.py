"""The trainer and evaluation."""

from ticketctl.train.config import TrainConfig
from ticketctl.train.loop import EpochStats, TrainResult, evaluate, train

__all__ = ["EpochStats", "TrainConfig", "TrainResult", "evaluate", "train"]
