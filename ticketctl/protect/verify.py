"""Checking a suspect against the owner's marks: the QR code against the receipt (white box)
and the trigger set (black box, on the model itself or through a prediction command), each
read into evidence and decided by `verdict.decide`. `verify`, every attack's checks and the
demo call these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ticketctl.data import Dataset, load_recorded_dataset
from ticketctl.errors import TicketctlError
from ticketctl.protect.blackbox_verify import verify_command_triggers, verify_model_triggers
from ticketctl.protect.qr.image import render_png, zbar_decode
from ticketctl.protect.receipt import Receipt
from ticketctl.protect.signature import read_code, read_signature, scan, shrunk_layers
from ticketctl.protect.suspect import Suspect, open_suspect
from ticketctl.protect.trigger import TriggerSet
from ticketctl.protect.verdict import (
    ALPHA,
    ReceiptStatus,
    Verdict,
    decide,
    null_rate_for,
    receipt_status,
)


@dataclass
class Marks:
    """The owner's marks to check a suspect against, and how strictly."""

    receipt: Receipt | None = None  # Scheme V2: where the code is and what it says
    public_key: Any = None  # the receipt must be signed by this key's owner
    trigger: TriggerSet | None = None  # Scheme V3
    null_rate: float | None = None  # chance agreement with the trigger labels (1/classes)
    alpha: float = ALPHA
    defend: bool = False  # read the code behind the owner's add-on defence

    @property
    def empty(self) -> bool:
        return self.receipt is None and self.trigger is None

    def receipt_status(self) -> ReceiptStatus | None:
        """The receipt's own check (None without a receipt); see `verdict.receipt_status`."""
        if self.receipt is None:
            return None
        return receipt_status(self.receipt, self.public_key,
                              self.trigger.sha256() if self.trigger is not None else None)

    def check_fits(self, arch: str, num_classes: int) -> None:
        """Refuse marks made for another kind of model before any work is done."""
        if self.defend and self.receipt is None:
            raise TicketctlError("--defend needs --receipt (it holds the magnitude floor)")
        if self.receipt is not None and self.receipt.arch not in (None, arch):
            raise TicketctlError(f"the receipt is for a {self.receipt.arch} model, this one is "
                                 f"a {arch}")
        if self.trigger is not None:
            self.trigger.check_classes(num_classes)


def check_suspect(suspect: Suspect, marks: Marks, data: Dataset | None = None,
                  network: nn.Module | None = None, compare_defence: bool = False) -> Verdict:
    """Every check the marks allow on one suspect. `data` (for the trigger images'
    normalisation) is needed with a trigger set; `network`, a model already holding the
    suspect's weights, saves building one. `compare_defence` reads the code both as stored
    and behind the defence (an attack sweep shows both); otherwise `marks.defend` picks one."""
    signature = defended = trigger = None
    if marks.receipt is not None and not marks.receipt.has_code and marks.trigger is None:
        raise TicketctlError("the receipt commits no QR code (only a trigger set): check the "
                             "model with --trigger")
    if marks.receipt is not None and marks.receipt.has_code:
        signature = read_signature(suspect.masks, marks.receipt, marks.public_key,
                                   floor_defence=marks.defend and not compare_defence,
                                   state=suspect.state)
        if marks.defend and compare_defence:
            defended = read_signature(suspect.masks, marks.receipt, marks.public_key,
                                      floor_defence=True, state=suspect.state)
    if marks.trigger is not None:
        if data is None:
            raise ValueError("a trigger check needs the dataset")
        marks.trigger.check_classes(data.num_classes)
        net = network if network is not None else suspect.network(data.device)
        trigger = verify_model_triggers(net, marks.trigger, data,
                                        null_rate_for(marks.null_rate, data.num_classes))
    verdict = decide(marks.alpha, signature=signature, trigger=trigger, defended=defended)
    verdict.findings = list(suspect.findings)
    if signature is not None:
        for layer, (have, want) in shrunk_layers(suspect.masks, marks.receipt).items():
            verdict.findings.append(
                f"layer {layer} has {have[0]}x{have[1]} channels, the receipt records "
                f"{want[0]}x{want[1]}: read as a channel-pruned copy, missing channels not "
                "observed")
    _add_receipt(verdict, marks)
    return verdict


def _add_receipt(verdict: Verdict, marks: Marks) -> None:
    verdict.receipt = marks.receipt_status()
    if verdict.receipt is not None and verdict.receipt.trigger_committed is False:
        verdict.findings.append("the trigger set is not the one the receipt commits: the "
                                "receipt does not date this set")


def verify(model: str | Path | None, marks: Marks, *, predict_cmd: str | None = None,
           timeout: float = 300.0, dataset: str | None = None,
           data_dir: str | Path | None = None, qr_png: str | Path | None = None,
           force: bool = False, stream: bool | None = None,
           image_size: int | None = None) -> Verdict:
    """`ticketctl verify`: open a suspect file once and check it against the marks, or query
    a model that cannot be opened through `predict_cmd` (the trigger images shuffled among as
    many ordinary test images). With no marks, scan the mask for any code (nothing to verify
    against). `qr_png`: also draw the code where the receipt says, with an independent
    reading of the picture by ZBar in the verdict's notes."""
    if model is None and predict_cmd is None:
        raise TicketctlError("give a MODEL file, or --trigger with --predict-cmd")
    if predict_cmd is not None and marks.trigger is None:
        raise TicketctlError("--predict-cmd needs --trigger SET")
    suspect = open_suspect(model) if model is not None else None
    if suspect is not None and marks.empty:
        return Verdict(marks.alpha, False, found=scan(suspect.masks),
                       findings=list(suspect.findings))
    if predict_cmd is None:
        data = None
        if marks.trigger is not None:
            data = load_recorded_dataset(suspect.recorded_dataset, dataset, data_dir,
                                         stream=stream, image_size=image_size)
        verdict = check_suspect(suspect, marks, data)
    else:
        data = load_recorded_dataset({}, dataset, data_dir, stream=stream,
                                     image_size=image_size)
        data.require_resident("--predict-cmd")  # the decoys are test images, sent as files
        marks.trigger.check_classes(data.num_classes)
        signature = None
        if suspect is not None and marks.receipt is not None and marks.receipt.has_code:
            signature = read_signature(suspect.masks, marks.receipt, marks.public_key,
                                       floor_defence=marks.defend, state=suspect.state)
        reading = verify_command_triggers(predict_cmd, marks.trigger, data,
                                          null_rate_for(marks.null_rate, data.num_classes),
                                          timeout=timeout)
        verdict = decide(marks.alpha, signature=signature, trigger=reading)
        verdict.findings = list(suspect.findings) if suspect is not None else []
        _add_receipt(verdict, marks)
    if qr_png is not None and suspect is not None and marks.receipt is not None:
        verdict.notes.update(draw_code(suspect, marks.receipt, qr_png, force))
    return verdict


def draw_code(suspect: Suspect, receipt: Receipt, path: str | Path,
              force: bool = False) -> dict[str, Any]:
    """A PNG of the module matrix where the receipt placed the code, and what ZBar reads."""
    matrix = read_code(suspect.masks, receipt)
    render_png(matrix, path, force=force)
    try:  # an independent reading of the same picture
        return {"zbar_message": zbar_decode(matrix)}
    except TicketctlError as e:
        return {"zbar_message": None, "zbar_note": str(e)}
