"""The extreme-ticket search as a pure state machine: given the accuracy of each round it
says whether the round is accepted, which rate comes next and when to stop. No I/O, so its
control flow is testable on a stub accuracy sequence and resumable from its JSON state."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ticketctl.prune.magnitude import Scope
from ticketctl.records import Overrides, Record
from ticketctl.train.config import raise_all

PAPER_RATES = (0.2, 0.1, 0.05, 0.01)


@dataclass
class SearchConfig:
    rates: list[float] = field(default_factory=lambda: list(PAPER_RATES))
    tolerance: float = 1.0  # accuracy points below dense a ticket may lose and still match
    rewind_epoch: int = 3
    mode: str = "extreme"  # extreme | fixed
    rounds: int | None = None  # fixed mode: how many rounds at rates[0]
    scope: str = "global"  # global | layer
    trials: int = 1  # accept a round on the mean of this many retrainings
    max_rounds: int = 200
    prune_linear: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, epochs: int) -> None:
        raise_all(self.problems(epochs))

    def problems(self, epochs: int) -> list[str]:
        """Every setting that cannot work, each with the flag that fixes it."""
        out = []
        if not self.rates:
            out.append("--rates needs at least one rate")
        bad = [r for r in self.rates if not 0.0 < r < 1.0]
        if bad:
            out.append(f"pruning rates must be in (0, 1), got {bad[0]}")
        if any(b >= a for a, b in zip(self.rates, self.rates[1:], strict=False)):
            out.append(f"--rates must be strictly decreasing, got "
                       f"{','.join(str(r) for r in self.rates)}")
        if self.tolerance < 0:
            out.append(f"--tolerance must be 0 or more, got {self.tolerance}")
        if not 0 <= self.rewind_epoch < epochs:
            out.append(f"--rewind-epoch {self.rewind_epoch} must be below the number of epochs "
                       f"({epochs}); 0 rewinds to the initialisation")
        if self.mode not in ("extreme", "fixed"):
            out.append(f"unknown search mode {self.mode!r}")
        if self.mode == "fixed" and (self.rounds is None or self.rounds < 1):
            out.append("fixed-rate IMP needs --rounds N (at least 1)")
        if self.scope not in [s.value for s in Scope]:
            out.append(f"--scope must be global or layer, got {self.scope!r}")
        if self.max_rounds < 0:
            out.append(f"--max-rounds must be 0 (dense only) or more, got {self.max_rounds}")
        if self.trials < 1:
            out.append(f"--trials must be at least 1, got {self.trials}")
        return out


@dataclass
class SearchOverrides(Overrides):
    """Search settings given explicitly: each that is not None replaces the preset's."""

    rates: list[float] | None = None
    tolerance: float | None = None
    rewind_epoch: int | None = None
    mode: str | None = None
    rounds: int | None = None
    scope: str | None = None
    trials: int | None = None
    max_rounds: int | None = None
    prune_linear: bool | None = None


@dataclass
class TrialResult(Record):
    """One retraining of a round's candidate mask (or the dense training)."""

    accuracy: float  # test accuracy at the best-validation epoch
    val_accuracy: float | None
    best_epoch: int
    seconds: float
    packed: int | None = None  # trained in a packed network of this many models


@dataclass
class Round(Record):
    """One round of the search: its rate, what the candidate mask kept, and the verdict."""

    round: int
    rate: float
    accuracy: float  # mean test accuracy of its trials
    accepted: bool
    density: float | None = None
    kept: int | None = None
    accuracies: list[float] = field(default_factory=list)  # one per trial
    val_accuracy: float | None = None  # of the first trial
    best_epoch: int | None = None  # of the first trial
    prune_seconds: float | None = None
    seconds: float | None = None


@dataclass
class SearchState:
    rate_index: int = 0
    rounds: list[Round] = field(default_factory=list)
    done: bool = False

    @property
    def accepted_rounds(self) -> int:
        return sum(1 for r in self.rounds if r.accepted)

    @property
    def last_accepted(self) -> Round | None:
        accepted = [r for r in self.rounds if r.accepted]
        return accepted[-1] if accepted else None

    def spec(self, cfg: SearchConfig) -> list[int]:
        """Accepted rounds per rate, as the paper's Table 1 reports them."""
        return [sum(1 for r in self.rounds if r.accepted and r.rate == rate)
                for rate in cfg.rates]

    def to_dict(self) -> dict[str, Any]:
        return {"rate_index": self.rate_index, "rounds": [r.to_dict() for r in self.rounds],
                "done": self.done}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchState:
        return cls(rate_index=d["rate_index"], rounds=[Round.from_dict(r) for r in d["rounds"]],
                   done=d["done"])


def current_rate(state: SearchState, cfg: SearchConfig) -> float | None:
    return None if state.done else cfg.rates[state.rate_index]


def record_round(
    state: SearchState,
    cfg: SearchConfig,
    dense_accuracy: float,
    accuracy: float | None = None,
    *,
    trials: Sequence[TrialResult] = (),
    density: float | None = None,
    kept: int | None = None,
    prune_seconds: float | None = None,
    seconds: float | None = None,
) -> bool:
    """Record one finished round and advance the search; returns whether it was accepted.
    Its accuracy is the mean of its trials' (or `accuracy`, given alone).

    Extreme search: a round matches when its accuracy is at most `tolerance` points below
    dense; a failed round is reverted (its mask is dropped) and the next smaller rate tried;
    the search stops when the smallest rate fails. Fixed-rate IMP accepts every round."""
    if state.done:
        raise RuntimeError("the search has already finished")
    if accuracy is None:
        accuracy = statistics.fmean(t.accuracy for t in trials)
    rate = cfg.rates[state.rate_index]
    if cfg.mode == "fixed":
        accepted = True
    else:
        accepted = accuracy >= dense_accuracy - cfg.tolerance
    first = trials[0] if trials else None
    state.rounds.append(Round(
        round=len(state.rounds) + 1, rate=rate, accuracy=accuracy, accepted=accepted,
        density=density, kept=kept, accuracies=[t.accuracy for t in trials],
        val_accuracy=first.val_accuracy if first else None,
        best_epoch=first.best_epoch if first else None,
        prune_seconds=prune_seconds, seconds=seconds))
    if cfg.mode == "fixed":
        state.done = state.accepted_rounds >= (cfg.rounds or 0)
    elif not accepted:
        state.rate_index += 1
        state.done = state.rate_index >= len(cfg.rates)
    if len(state.rounds) >= cfg.max_rounds:
        state.done = True
    return accepted
