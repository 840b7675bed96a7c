"""The owner's checks, run on each attacked model: the QR signature against the receipt
(white box, as stored and, with --defend, behind the magnitude-floor defence) and the trigger
set (black box), decided by the library's one policy (`protect.verdict.decide`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ticketctl.artifacts import Ticket
from ticketctl.data import Dataset
from ticketctl.protect.suspect import Suspect
from ticketctl.protect.verdict import Verdict
from ticketctl.protect.verify import Marks, check_suspect

Checker = Callable[..., Verdict]  # (released state, runs_as=None) -> verdict


def owner_checks(ticket: Ticket, data: Dataset | None, marks: Marks) -> Checker | None:
    """A checker for attacked copies of `ticket` (their weights in), or None without marks."""
    marks.check_fits(ticket.arch, ticket.num_classes)
    if marks.empty:
        return None
    network = ticket.build_model(data.train_x.device) \
        if marks.trigger is not None and data is not None else None

    def check(state: dict[str, torch.Tensor],
              runs_as: dict[str, torch.Tensor] | None = None) -> Verdict:
        """`state`: the released weights (white box); `runs_as`: the same function in the
        ticket's own shapes, for the trigger set, when the release has other shapes."""
        if network is not None:
            network.load_state_dict(state if runs_as is None else runs_as)
        return check_suspect(Suspect.of(ticket, state, where="attacked copy"), marks, data,
                             network=network, compare_defence=True)

    return check
