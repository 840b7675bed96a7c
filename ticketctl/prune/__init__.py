"""Mask operations, iterative magnitude pruning and the extreme-ticket search."""

from ticketctl.prune.imp import Events, FindResult, FindSettings, default_run_dir, find_ticket
from ticketctl.prune.magnitude import Scope, magnitude_prune
from ticketctl.prune.presets import PRESETS, Preset, resolve_settings
from ticketctl.prune.search import (
    Round,
    SearchConfig,
    SearchOverrides,
    SearchState,
    TrialResult,
    record_round,
)

__all__ = ["PRESETS", "Events", "FindResult", "FindSettings", "Preset", "Round", "Scope",
           "SearchConfig", "SearchOverrides", "SearchState", "TrialResult", "default_run_dir",
           "find_ticket", "magnitude_prune", "record_round", "resolve_settings"]
