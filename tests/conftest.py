"""Shared test helpers: tiny tickets and raw safetensors writers for crafting bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ticketctl.artifacts import Mask, Ticket
from ticketctl.artifacts.ticket import FORMAT_NAME, FORMAT_VERSION
from ticketctl.models import build_model, prunable_names
from ticketctl.prune import magnitude_prune


def make_ticket(seed: int = 0, density_rate: float = 0.5, width: int = 8) -> Ticket:
    torch.manual_seed(seed)
    model = build_model("digits_cnn", 10, width=width)
    names = prunable_names(model)
    mask = magnitude_prune(dict(model.named_parameters()), Mask.ones(model, names), density_rate)
    return Ticket.from_model(model, mask, kind="ticket", arch="digits_cnn",
                             arch_args={"width": width}, num_classes=10,
                             dataset={"name": "digits"}, rewind_epoch=0, seed=seed)


def write_raw(path: Path, tensors: dict, meta: dict | None, version: int = FORMAT_VERSION,
              header: dict | None = None) -> Path:
    """Write a safetensors file with arbitrary (possibly wrong) content and ticket metadata."""
    if header is None:
        header = {}
        if meta is not None:
            header = {"format": FORMAT_NAME, "format_version": str(version),
                      "ticket": json.dumps(meta)}
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                                metadata=header or None)
    return path


@pytest.fixture
def ticket() -> Ticket:
    return make_ticket()
