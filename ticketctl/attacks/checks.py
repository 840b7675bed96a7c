"""The owner's checks, run on each attacked model: the QR signature against the receipt
(white box) and the trigger set (black box), with the magnitude-floor defence when asked."""

from __future__ import annotations

from typing import Any

import torch

from ticketctl.artifacts import Ticket
from ticketctl.attacks.removal import Checker
from ticketctl.data import Dataset
from ticketctl.errors import TicketctlError
from ticketctl.protect.blackbox_verify import verify_model_triggers
from ticketctl.protect.signature import verify_with_receipt
from ticketctl.protect.trigger import TriggerSet


def owner_checks(ticket: Ticket, data: Dataset, receipt: dict[str, Any] | None = None,
                 public_key: Any = None, trigger: TriggerSet | None = None,
                 null_rate: float | None = None, alpha: float = 1e-6,
                 defend: bool = False) -> Checker | None:
    if receipt is None and trigger is None:
        if defend:
            raise TicketctlError("--defend needs --receipt (it holds the magnitude floor)")
        return None
    if defend and receipt is None:
        raise TicketctlError("--defend needs --receipt (it holds the magnitude floor)")
    if receipt is not None and receipt["receipt"].get("arch") not in (None, ticket.arch):
        raise TicketctlError(f"the receipt is for a {receipt['receipt']['arch']} model, this "
                             f"one is a {ticket.arch}")
    if trigger is not None:
        trigger.check_classes(ticket.num_classes)
    rate = null_rate if null_rate is not None else 1.0 / ticket.num_classes
    model = ticket.build_model(data.train_x.device) if trigger is not None else None

    def check(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        verdicts = []
        if receipt is not None:
            v = verify_with_receipt(masks, receipt, public_key, alpha=alpha, state=state)
            out.update(message=v.message, p_value=v.p_value, bit_match=v.bit_match,
                       alignment=v.details.get("alignment"))
            verdicts.append(v.verified)
            if defend:
                d = verify_with_receipt(masks, receipt, public_key, alpha=alpha,
                                        floor_defence=True, state=state)
                out.update(defended_message=d.message, defended_p_value=d.p_value,
                           defended_verified=d.verified)
                verdicts.append(d.verified)
        if trigger is not None:
            model.load_state_dict(state)
            t = verify_model_triggers(model, trigger, data, rate)
            out.update(trigger_accuracy=t.trigger_accuracy, trigger_p_value=t.trigger_p_value)
            verdicts.append(t.trigger_p_value < alpha)
        out["verified"] = any(verdicts)
        return out

    return check
