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
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.protect.model_file import read_model_masks
from ticketctl.protect.qr.image import render_png, zbar_decode
from ticketctl.protect.receipt import (
    load_private_key,
    load_public_key,
    load_receipt,
    save_receipt,
    write_keypair,
)
from ticketctl.protect.signature import scan, sign_ticket, verify_with_receipt


@handle_errors
def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Writes OUT.key and OUT.pub.")],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Make an Ed25519 key pair for signing receipts (and deriving trigger sets)."""
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
    model: Annotated[Path, typer.Argument(help="A ticket, a safetensors or a torch state dict.")],
    receipt: Annotated[Optional[Path], typer.Option(help="The owner's receipt.")] = None,
    public_key: Annotated[Optional[Path], typer.Option(
        help="PREFIX.pub: the receipt must be signed by this key.")] = None,
    alpha: Annotated[float, typer.Option(help="Decision level for the p-value.")] = 1e-6,
    defend: Annotated[bool, typer.Option(
        help="Prune weights below the receipt's magnitude floor first (add-on defence).")] = False,
    qr_png: Annotated[Optional[Path], typer.Option(
        help="Write the extracted code as a PNG.")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Verify a suspect model: decode the code in its mask, score it against a receipt."""
    if qr_png:
        check_output_path(qr_png, force)
    state, masks = read_model_masks(model)
    if receipt is None:
        found = scan(masks)
        result = {"verified": False, "message": found[0]["message"] if found else None,
                  "bit_match": None, "p_value": None, "trigger_accuracy": None,
                  "trigger_p_value": None, "alpha": alpha, "receipt_valid": None,
                  "found": found}
        if json_out:
            emit_json(result)
        elif not quiet:
            console.print("no receipt: " + ("; ".join(f"{f['message']!r} in {f['layer']} at "
                                                    f"({f['row']}, {f['col']})" for f in found)
                                            or "no code found"), highlight=False)
        return
    doc = load_receipt(receipt)
    verdict = verify_with_receipt(masks, doc, load_public_key(public_key) if public_key else None,
                                  alpha=alpha, floor_defence=defend, state=state)
    if qr_png:
        from ticketctl.protect.embed import Placement, extract

        r = doc["receipt"]
        matrix, _ = extract(masks, [Placement(p["layer"], p["row"], p["col"])
                                    for p in r["placements"]], r["qr_version"], r["mask_pattern"])
        render_png(matrix, qr_png)
    out = verdict.to_dict()
    if qr_png:
        try:  # an independent reading of the same picture by ZBar
            out["zbar_message"] = zbar_decode(matrix)
        except TicketctlError as e:
            out["zbar_message"] = None
            out["zbar_note"] = str(e)
    if json_out:
        emit_json(out)
    elif not quiet:
        console.print(f"[bold]{'VERIFIED' if verdict.verified else 'NOT VERIFIED'}[/]: message "
                      f"{verdict.message!r}, bit match {100 * (verdict.bit_match or 0):.1f}% of "
                      f"{out['data_modules']} modules, p = {verdict.p_value:.3g} "
                      f"(alpha {alpha:g}); receipt signature "
                      f"{'valid' if verdict.receipt_valid else 'not checked'}", highlight=False)
    if not verdict.verified:
        raise CheckFailed("not verified: the code does not match the receipt")
