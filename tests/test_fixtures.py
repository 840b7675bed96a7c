"""The committed format-v1 ticket keeps loading, byte for byte what it held when written."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

from make_fixtures import TICKET_V1, make_ticket_v1  # noqa: E402

from ticketctl.artifacts import load_ticket  # noqa: E402


def test_committed_v1_ticket_loads_and_verifies():
    ticket = load_ticket(TICKET_V1)
    assert ticket.kind == "ticket" and ticket.arch == "digits_cnn"
    assert ticket.extra == {"fixture": "format v1"}
    assert abs(ticket.density - 0.3) < 1e-3


def test_rebuilding_the_fixture_gives_the_same_tensors():
    assert load_ticket(TICKET_V1).tensors_sha256() == make_ticket_v1().tensors_sha256()
