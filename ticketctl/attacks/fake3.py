"""fake3: an insider who knows the encoder and where the code sits overwrites the signed
region with his own code and fresh weights, then claims the model. What refutes him is time:
the owner's receipt commits to the released ticket's hash before release; the forger's
receipt can only commit to his altered copy, after it."""

from __future__ import annotations

from ticketctl.artifacts import Kind, Ticket
from ticketctl.attacks.runner import AttackReport, compare, scored_row
from ticketctl.data import Dataset
from ticketctl.errors import TicketctlError
from ticketctl.protect.embed import embed
from ticketctl.protect.qr import encode
from ticketctl.protect.receipt import Receipt
from ticketctl.protect.signature import make_receipt
from ticketctl.protect.suspect import Suspect
from ticketctl.protect.verify import Marks, check_suspect
from ticketctl.train import evaluate


def forge(signed: Ticket, owner_receipt: Receipt, message: str, seed: int = 1
          ) -> tuple[Ticket, Receipt]:
    """Overwrite the owner's region with the forger's code (same version, place and module
    grid); returns the forged model and the forger's (unsigned) receipt, made now."""
    if not owner_receipt.has_code:
        raise TicketctlError("fake3 needs the owner's receipt of a signature (a QR code)")
    placements = owner_receipt.placements
    support = int(owner_receipt.support or 3)
    qr = encode(message, version=int(owner_receipt.qr_version),
                mask_pattern=(int(owner_receipt.mask_pattern) + 1) % 8)
    forged, _ = embed(signed, qr, placements, support=support, seed=seed)
    # the forger's own receipt for his copy (he cannot date it before the release)
    return forged, make_receipt(forged, message, qr, list(placements), support)


def fake3(signed: Ticket, owner_receipt: Receipt, message: str, data: Dataset | None,
          seed: int = 1) -> AttackReport:
    """One row (the whole region overwritten): the forged model's accuracy and what the
    owner's receipt still reads in it; the facts say whose receipt predates the release."""
    if signed.kind not in (Kind.SIGNED, Kind.TRAINED):
        raise TicketctlError(f"fake3 takes the released signed model, not a '{signed.kind}' "
                             "file")
    owner_valid = owner_receipt.check(None)
    forged, forger_receipt = forge(signed, owner_receipt, message, seed)
    before = after = None  # not measured without a network and a dataset
    if data is not None:
        model = signed.build_model(data.train_x.device)
        before = evaluate(model, data.test_x, data.test_y)
        model.load_state_dict(forged.state)
        after = evaluate(model, data.test_x, data.test_y)
    suspect = Suspect.of(forged, where="the forged model")
    owner_on_forged = check_suspect(suspect, Marks(receipt=owner_receipt))
    forger_on_forged = check_suspect(suspect, Marks(receipt=forger_receipt))
    # retraining after signing changes the weights, never the mask: the mask hash identifies
    # the released ticket
    released = signed.mask.sha256()
    row = scored_row(1.0, after, owner_on_forged, forger_message=forger_on_forged.message)
    compare([row], before)
    return AttackReport("fake3", before, "the released model", [row], {"seed": seed}, {
        "accuracy_before": before, "accuracy_after": after,
        "delta": None if after is None or before is None else after - before,
        "owner_receipt_signed": owner_valid,
        "owner_receipt_created": owner_receipt.created,
        "owner_receipt_matches_release": owner_receipt.signed_masks_sha256 == released,
        "owner_on_forged": {"verified": owner_on_forged.verified,
                            "message": owner_on_forged.message,
                            "p_value": owner_on_forged.p_value},
        "forger_on_forged": {"verified": forger_on_forged.verified,
                             "message": forger_on_forged.message},
        "forger_receipt_created": forger_receipt.created,
        "forger_receipt_matches_release": forger_receipt.signed_masks_sha256 == released,
    })
