"""The trainer and evaluation."""

from ticketctl.train.config import TrainConfig
from ticketctl.train.engine import EpochStats, Trainer, TrainResult, evaluate, summarize
from ticketctl.train.schedule import lr_at

__all__ = ["EpochStats", "TrainConfig", "TrainResult", "Trainer", "evaluate", "lr_at",
           "summarize"]
