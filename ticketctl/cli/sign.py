"""`keygen`, `sign` and `verify` (Scheme V2 white-box checks, Scheme V3 black-box ones)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.artifacts.io import all_or_nothing
from ticketctl.cli.common import console, plain
from ticketctl.cli.options import DataOptions, NetworkSource, Output, OwnerMarks, command
from ticketctl.errors import CheckFailed
from ticketctl.protect.qr.image import render_png
from ticketctl.protect.receipt import load_private_key, save_receipt, write_keypair
from ticketctl.protect.signature import sign_ticket
from ticketctl.protect.verdict import SELF_CONSISTENT, SIGNER_CHECKED, UNSIGNED, Verdict
from ticketctl.protect.verify import verify as verify_model


@command
def keygen(
    *,
    out: Annotated[Path, typer.Option("--out", "-o", help="Writes OUT.key and OUT.pub.")],
    output: Output,
) -> None:
    """Make an Ed25519 key pair for signing receipts."""
    key, pub = write_keypair(out, force=output.force)
    output.emit({"key": str(key), "pub": str(pub)}, lambda: console.print(
        f"wrote {plain(key)} (private, mode 600) and {plain(pub)}", highlight=False))


@command
def sign(
    *,
    ticket_path: Annotated[Path, typer.Argument(metavar="TICKET", help="The ticket to sign.")],
    message: Annotated[str, typer.Option(help="The owner's message, written as a QR code.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The signed ticket.")],
    receipt: Annotated[Path, typer.Option(help="The receipt (JSON) to keep private.")],
    signing_key: Annotated[Optional[Path], typer.Option(
        help="PREFIX.key from `ticketctl keygen`: signs the receipt.")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Embed in this layer.")] = None,
    copies: Annotated[int, typer.Option(help="Embed in this many layers (majority vote).")] = 1,
    support: Annotated[int, typer.Option(
        help="Kept weights behind every dark module (a linear or 1x1 conv layer's modules are "
             "blocks of this many weights).")] = 3,
    qr_version: Annotated[Optional[int], typer.Option(
        help="QR version (default: the smallest that fits).")] = None,
    mask_pattern: Annotated[Optional[int], typer.Option(
        help="QR mask pattern 0-7 (default: the one needing the fewest changes).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for new connections.")] = 0,
    qr_png: Annotated[Optional[Path], typer.Option(help="Also write the code as a PNG.")] = None,
    output: Output,
) -> None:
    """Scheme V2: embed a message as a QR code in the mask; write the signed ticket and a
    receipt."""
    output.check(out, receipt, qr_png)
    ticket = load_ticket(ticket_path)
    kept = ticket.mask.num_kept
    key = load_private_key(signing_key) if signing_key else None
    # in place: the ticket was read only to be signed (no copy of the layers that change)
    signed, doc, report, qr = sign_ticket(ticket, message, private_key=key, version=qr_version,
                                          mask_pattern=mask_pattern, layer=layer, copies=copies,
                                          support=support, seed=seed, in_place=True)
    del ticket
    with all_or_nothing(out, receipt, qr_png, force=output.force):  # all of them or none
        save_ticket(signed, out, force=output.force)
        save_receipt(doc, receipt, force=output.force)
        if qr_png:
            render_png(qr.matrix, qr_png, force=output.force)
    first = report.placements[0]
    moved = (report.weights_added + abs(report.compensated)) / max(1, kept)
    result = {"layer": first.layer, "offset": [first.row, first.col],
              "placements": [{"layer": p.layer, "offset": [p.row, p.col], "view": list(p.view),
                              "block": list(p.block)} for p in report.placements],
              "block": list(first.block),
              "qr_version": qr.version, "mask_pattern": qr.mask_pattern,
              "density_before": report.density_before, "density_after": report.density_after,
              "modules_changed": report.modules_changed, "weights_added": report.weights_added,
              "weights_removed": report.weights_removed, "out": str(out),
              "receipt": str(receipt), "receipt_signed": key is not None,
              "moved_fraction": moved}
    if key is None and not output.quiet:
        console.print("[yellow]warning:[/] the receipt is not signed (no --signing-key): anyone "
                      "can write one like it, so it cannot show that the code was yours before "
                      "a forger's (attack fake3); make a key with `ticketctl keygen`",
                      highlight=False)
    if moved > 0.1 and not output.quiet:
        console.print(f"[yellow]warning:[/] signing moved {100 * moved:.0f}% of the ticket's "
                      "weights; expect an accuracy cost (sign a denser ticket, or retrain and "
                      "compare)", highlight=False)
    output.emit(result, lambda: console.print(
        f"signed: version-{qr.version} code (mask {qr.mask_pattern}) in {plain(first.layer)} "
        f"at ({first.row}, {first.col}), one module per {first.block[0]}x{first.block[1]} "
        f"weights; {report.modules_changed} modules changed; density "
        f"{100 * report.density_before:.4f}% -> {100 * report.density_after:.4f}%; wrote "
        f"{plain(out)} and {plain(receipt)}", highlight=False))


@command
def verify(
    *,
    model: Annotated[Optional[Path], typer.Argument(
        help="A ticket, a safetensors or a torch state dict (omit with --predict-cmd).")] = None,
    marks: OwnerMarks,
    predict_cmd: Annotated[Optional[str], typer.Option(
        help="Query a model you cannot open: CMD gets an .npz of images, prints a JSON list "
             "of labels.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds --predict-cmd may take.")] = 300.0,
    data: DataOptions,
    defend: Annotated[bool, typer.Option(
        help="Prune weights below the receipt's magnitude floor first (add-on defence).")] = False,
    qr_png: Annotated[Optional[Path], typer.Option(
        help="Write the extracted code as a PNG.")] = None,
    network: NetworkSource,
    output: Output,
) -> None:
    """Verify a suspect model: the QR code in its mask against a receipt (white box) and its
    answers to a trigger set (black box), each with a p-value."""
    output.check(qr_png)
    owner = marks.load(defend=defend)
    verdict = verify_model(model, owner, predict_cmd=predict_cmd, timeout=timeout,
                           dataset=data.dataset, data_dir=data.data_dir, qr_png=qr_png,
                           force=output.force, stream=data.streaming.stream,
                           image_size=data.streaming.image_size)
    output.emit(verdict.to_dict(), lambda: _print_verdict(verdict))
    if owner.empty:  # a scan reports the codes it finds, but proves nothing
        raise CheckFailed("not verified: nothing to verify against; pass --receipt and/or "
                          "--trigger")
    if not verdict.verified:
        raise CheckFailed("not verified: no check passed at the chosen alpha")


RECEIPT_CHECKS = {
    SIGNER_CHECKED: "signed by the owner of --public-key, unchanged since",
    SELF_CONSISTENT: "unchanged since it was signed, but its signer is not identified (pass "
                     "--public-key)",
    UNSIGNED: "not signed: it neither dates the mark nor names its owner",
}


def _print_verdict(v: Verdict) -> None:
    for finding in v.findings:
        console.print(f"[yellow]note:[/] {plain(finding)}", highlight=False)
    if v.signature is not None:
        s = v.signature
        console.print(f"white box: message {plain(repr(s.message))}, bit match "
                      f"{100 * s.bit_match:.1f}% of "
                      f"{s.data_modules} modules, p = {s.p_value:.3g}", highlight=False)
    elif v.found is not None:
        console.print("no receipt: " + ("; ".join(
            f"{plain(repr(f['message']))} in {plain(f['layer'])} at ({f['row']}, {f['col']})"
            for f in v.found) or "no code found"), highlight=False)
    if v.trigger is not None:
        t = v.trigger
        console.print(f"black box: {t.matches} of {t.n} trigger labels "
                      f"({t.trigger_accuracy:.1f}%), null rate {t.null_rate:.3g}, "
                      f"p = {t.trigger_p_value:.3g}", highlight=False)
    if v.receipt is not None:
        console.print(f"receipt: {RECEIPT_CHECKS[v.receipt.checked]}", highlight=False)
    console.print(f"[bold]{'VERIFIED' if v.verified else 'NOT VERIFIED'}[/] (alpha {v.alpha:g})",
                  highlight=False)
