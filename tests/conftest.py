"""Fixtures; the helpers every test module imports live in `helpers.py`."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import make_ticket

from ticketctl.artifacts import Ticket
from ticketctl.models.sources import use_factory

# One CPU thread per operation, here and in every subprocess a test starts: the networks
# under test are tiny, so more threads only add synchronisation, and on a machine whose other
# core is busy OpenMP's threads wait on each other (a demo that takes 33 s on one thread did
# not finish its first stage in 17 minutes on two with a busy core). Results do not depend on
# it: every float bound in the suite holds for any summation order.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_factory_left_behind():
    """--model-factory sets the process's network factory; tests run commands in-process, so
    each starts without one."""
    yield
    use_factory(None)


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
