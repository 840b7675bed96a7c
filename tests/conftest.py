"""Fixtures; the helpers every test module imports live in `helpers.py`."""

from __future__ import annotations

import pytest
import torch
from helpers import make_ticket

from ticketctl.artifacts import Ticket


@pytest.fixture
def ticket() -> Ticket:
    return make_ticket()


@pytest.fixture
def float64():
    """Run a test in float64: models, datasets and trigger tensors made inside it follow
    torch's default dtype. Equivalence tests (packed against alone, permuted against original)
    compare two orders of the same arithmetic; in float64 their rounding differences sit some
    nine orders of magnitude below any bound a test states, on any CPU."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)
