"""`keygen`, `sign` and `verify` (Scheme V2 white-box checks)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.artifacts.io import check_output_path
from ticketctl.cli.common import (
    DebugOpt,
    ForceOpt,
    JsonOpt,
    QuietOpt,
    console,
    emit_json,
    handle_errors,
)
from ticketctl.data import load_recorded_dataset
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.protect.blackbox_verify import verify_command_triggers, verify_model_triggers
from ticketctl.protect.model_file import build_suspect, read_model_masks
from ticketctl.protect.qr.image import render_png, zbar_decode
from ticketctl.protect.receipt import (
    load_private_key,
    load_public_key,
    load_receipt,
    save_receipt,
    write_keypair,
)
from ticketctl.protect.signature import scan, sign_ticket, verify_with_receipt
from ticketctl.protect.trigger import load_trigger_set


@handle_errors
def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Writes OUT.key and OUT.pub.")],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Make an Ed25519 key pair for signing receipts."""
    key, pub = write_keypair(out, force=force)
    if json_out:
        emit_json({"key": str(key), "pub": str(pub)})
    elif not quiet:
        console.print(f"wrote {key} (private, mode 600) and {pub}", highlight=False)


@handle_errors
def sign(
    ticket_path: Annotated[Path, typer.Argument(metavar="TICKET")],
    message: Annotated[str, typer.Option(help="The owner's message, written as a QR code.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The signed ticket.")],
    receipt: Annotated[Path, typer.Option(help="The receipt (JSON) to keep private.")],
    signing_key: Annotated[Optional[Path], typer.Option(
        help="PREFIX.key from `ticketctl keygen`: signs the receipt.")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Embed in this layer.")] = None,
    copies: Annotated[int, typer.Option(help="Embed in this many layers (majority vote).")] = 1,
    support: Annotated[int, typer.Option(
        help="Kept weights behind every dark module.")] = 3,
    qr_version: Annotated[Optional[int], typer.Option(
        help="QR version (default: the smallest that fits).")] = None,
    mask_pattern: Annotated[Optional[int], typer.Option(
        help="QR mask pattern 0-7 (default: the one needing the fewest changes).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for new connections.")] = 0,
    qr_png: Annotated[Optional[Path], typer.Option(help="Also write the code as a PNG.")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Scheme V2: embed a message as a QR code in the mask; write the signed ticket and a
    receipt."""
    for p in (out, receipt, qr_png):
        if p is not None:
            check_output_path(p, force)
    ticket = load_ticket(ticket_path)
    key = load_private_key(signing_key) if signing_key else None
    signed, doc, report, qr = sign_ticket(ticket, message, private_key=key, version=qr_version,
                                          mask_pattern=mask_pattern, layer=layer, copies=copies,
                                          support=support, seed=seed)
    save_ticket(signed, out, force=force)
    save_receipt(doc, receipt, force=force)
    if qr_png:
        render_png(qr.matrix, qr_png)
    first = report.placements[0]
    result = {"layer": first.layer, "offset": [first.row, first.col],
              "placements": [{"layer": p.layer, "offset": [p.row, p.col]}
                             for p in report.placements],
              "qr_version": qr.version, "mask_pattern": qr.mask_pattern,
              "density_before": report.density_before, "density_after": report.density_after,
              "modules_changed": report.modules_changed, "weights_added": report.weights_added,
              "weights_removed": report.weights_removed, "out": str(out),
              "receipt": str(receipt), "receipt_signed": key is not None}
    moved = (report.weights_added + abs(report.compensated)) / max(1, ticket.mask.num_kept)
    result["moved_fraction"] = moved
    if moved > 0.1 and not quiet:
        console.print(f"[yellow]warning:[/] signing moved {100 * moved:.0f}% of the ticket's "
                      "weights; expect an accuracy cost (sign a denser ticket, or retrain and "
                      "compare)", highlight=False)
    if json_out:
        emit_json(result)
    elif not quiet:
        console.print(f"signed: version-{qr.version} code (mask {qr.mask_pattern}) in "
                      f"{first.layer} at ({first.row}, {first.col}); {report.modules_changed} "
                      f"modules changed; density {100 * report.density_before:.4f}% -> "
                      f"{100 * report.density_after:.4f}%; wrote {out} and {receipt}",
                      highlight=False)


@handle_errors
def verify(
    model: Annotated[Optional[Path], typer.Argument(
        help="A ticket, a safetensors or a torch state dict (omit with --predict-cmd).")] = None,
    receipt: Annotated[Optional[Path], typer.Option(help="The owner's receipt.")] = None,
    public_key: Annotated[Optional[Path], typer.Option(
        help="PREFIX.pub: the receipt must be signed by this key.")] = None,
    trigger: Annotated[Optional[Path], typer.Option(
        help="Scheme V3: a trigger set; checks the model's answers (black box).")] = None,
    null_rate: Annotated[Optional[float], typer.Option(
        help="Chance agreement with the trigger labels (default 1/classes; see calibrate).")
    ] = None,
    predict_cmd: Annotated[Optional[str], typer.Option(
        help="Query a model you cannot open: CMD gets an .npz of images, prints a JSON list "
             "of labels.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds --predict-cmd may take.")] = 300.0,
    dataset: Annotated[Optional[str], typer.Option(
        help="Dataset for normalisation and decoys (default: the ticket's, else digits).")
    ] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Its folder.")] = None,
    alpha: Annotated[float, typer.Option(help="Decision level for the p-values.")] = 1e-6,
    defend: Annotated[bool, typer.Option(
        help="Prune weights below the receipt's magnitude floor first (add-on defence).")] = False,
    qr_png: Annotated[Optional[Path], typer.Option(
        help="Write the extracted code as a PNG.")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Verify a suspect model: the QR code in its mask against a receipt (white box) and its
    answers to a trigger set (black box), each with a p-value."""
    if qr_png:
        check_output_path(qr_png, force)
    if model is None and predict_cmd is None:
        raise TicketctlError("give a MODEL file, or --trigger with --predict-cmd")
    if predict_cmd is not None and trigger is None:
        raise TicketctlError("--predict-cmd needs --trigger SET")
    out: dict = {"verified": False, "message": None, "bit_match": None, "p_value": None,
                 "trigger_accuracy": None, "trigger_p_value": None, "alpha": alpha,
                 "receipt_valid": None}
    verdicts: list[bool] = []
    state = masks = None
    if model is not None:
        state, masks = read_model_masks(model)
    if masks is not None and receipt is not None:
        doc = load_receipt(receipt)
        verdict = verify_with_receipt(masks, doc,
                                      load_public_key(public_key) if public_key else None,
                                      alpha=alpha, floor_defence=defend, state=state)
        out.update(verdict.to_dict())
        verdicts.append(verdict.verified)
        if qr_png:
            from ticketctl.protect.embed import Placement, extract

            r = doc["receipt"]
            matrix, _ = extract(masks, [Placement(p["layer"], p["row"], p["col"])
                                        for p in r["placements"]], r["qr_version"],
                                r["mask_pattern"])
            render_png(matrix, qr_png)
            try:  # an independent reading of the same picture by ZBar
                out["zbar_message"] = zbar_decode(matrix)
            except TicketctlError as e:
                out["zbar_message"], out["zbar_note"] = None, str(e)
    elif masks is not None and trigger is None:
        found = scan(masks)
        out.update({"message": found[0]["message"] if found else None, "found": found})
    if trigger is not None:
        tv = _trigger_check(trigger, model, state, predict_cmd, timeout, dataset, data_dir,
                            null_rate)
        out.update(tv.to_dict())
        verdicts.append(tv.trigger_p_value < alpha)
    out["verified"] = any(verdicts)
    if json_out:
        emit_json(out)
    elif not quiet:
        if out.get("data_modules"):
            console.print(f"white box: message {out['message']!r}, bit match "
                          f"{100 * out['bit_match']:.1f}% of {out['data_modules']} modules, "
                          f"p = {out['p_value']:.3g}; receipt signature "
                          f"{'valid' if out['receipt_valid'] else 'not checked'}",
                          highlight=False)
        elif "found" in out:
            console.print("no receipt: " + ("; ".join(
                f"{f['message']!r} in {f['layer']} at ({f['row']}, {f['col']})"
                for f in out["found"]) or "no code found"), highlight=False)
        if out["trigger_p_value"] is not None:
            console.print(f"black box: {out['trigger_matches']} of {out['trigger_n']} trigger "
                          f"labels ({out['trigger_accuracy']:.1f}%), null rate "
                          f"{out['null_rate']:.3g}, p = {out['trigger_p_value']:.3g}",
                          highlight=False)
        console.print(f"[bold]{'VERIFIED' if out['verified'] else 'NOT VERIFIED'}[/] "
                      f"(alpha {alpha:g})", highlight=False)
    if receipt is None and trigger is None:
        return  # a scan reports what it finds; there is nothing to verify against
    if not out["verified"]:
        raise CheckFailed("not verified: no check passed at the chosen alpha")


def _trigger_check(trigger, model, state, predict_cmd, timeout, dataset, data_dir, null_rate):
    ts = load_trigger_set(trigger)
    recorded: dict = {}
    net = None
    if model is not None and predict_cmd is None:
        net, recorded = build_suspect(model, state)
    data = load_recorded_dataset(recorded, dataset, data_dir)
    ts.check_classes(data.num_classes)
    rate = null_rate if null_rate is not None else 1.0 / data.num_classes
    if not 0.0 < rate < 1.0:
        raise TicketctlError(f"--null-rate must be in (0, 1), got {rate}")
    if predict_cmd is not None:
        return verify_command_triggers(predict_cmd, ts, data, rate, timeout=timeout)
    return verify_model_triggers(net, ts, data, rate)
