"""Mask operations and iterative magnitude pruning."""

from ticketctl.prune.magnitude import magnitude_prune

__all__ = ["magnitude_prune"]
