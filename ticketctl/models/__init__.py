"""Model registry: architectures by name and which of their parameters are prunable."""

from ticketctl.models.registry import ARCHS, build_model, prunable_names

__all__ = ["ARCHS", "build_model", "prunable_names"]
