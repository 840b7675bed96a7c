"""Helpers the test modules share: tiny tickets, raw safetensors writers for crafting bad
files, the CLI runner and its one-line-error check, and the time guard for subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from typer.testing import CliRunner

from ticketctl.artifacts import Mask, Ticket
from ticketctl.artifacts.ticket import FORMAT_NAME, FORMAT_VERSION
from ticketctl.cli.app import app
from ticketctl.models import build_model, prunable_names
from ticketctl.prune import magnitude_prune

# A guard against a hung subprocess, not a speed check: a CI run may take up to 30 minutes in
# all, so a single command is given 20 before the test calls it hung. Tests never assert how
# fast something ran.
HANG_GUARD_S = 1200

try:  # Click before 8.2 mixes stderr into stdout unless told not to
    _runner = CliRunner(mix_stderr=False)
except TypeError:  # Click 8.2 and later (vendored by Typer 0.2x) always keep them apart
    _runner = CliRunner()


def run(*args, input=None):
    """Invoke the CLI in-process; stdout and stderr are kept apart; `input` (bytes or text)
    is its stdin."""
    return _runner.invoke(app, [str(a) for a in args], input=input)


def assert_one_line_error(result, code=2, contains=""):
    """The shell contract for errors: exit code, one line on stderr, nothing on stdout."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert contains in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def make_ticket(seed: int = 0, density_rate: float = 0.5, width: int = 8) -> Ticket:
    """A digits CNN pruned by magnitude at initialisation: a ticket in milliseconds."""
    torch.manual_seed(seed)
    model = build_model("digits_cnn", 10, width=width)
    names = prunable_names(model)
    mask = magnitude_prune(dict(model.named_parameters()), Mask.ones(model, names), density_rate)
    return Ticket.from_model(model, mask, kind="ticket", arch="digits_cnn",
                             arch_args={"width": width}, num_classes=10,
                             dataset={"name": "digits"}, rewind_epoch=0, seed=seed)


def write_raw(path: Path, tensors: dict, meta: dict | None, version: int = FORMAT_VERSION,
              header: dict | None = None) -> Path:
    """Write a safetensors file with arbitrary (possibly wrong) content and ticket metadata."""
    if header is None:
        header = {}
        if meta is not None:
            header = {"format": FORMAT_NAME, "format_version": str(version),
                      "ticket": json.dumps(meta)}
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                                metadata=header or None)
    return path


def signed_files(d: Path, trigger_key: bytes = b"k" * 32) -> dict:
    """The 32-wide digits ticket signed with "signature", saved in `d` with its receipt and
    a 20-image trigger set: what the attack tests check against."""
    from ticketctl.artifacts import save_ticket
    from ticketctl.protect.receipt import save_receipt
    from ticketctl.protect.signature import sign_ticket
    from ticketctl.protect.trigger import generate, save_trigger_set

    s, doc, _, _ = sign_ticket(make_ticket(seed=70, density_rate=0.6, width=32), "signature")
    return {"d": d, "ticket": s, "receipt_doc": doc,
            "path": save_ticket(s, d / "s.safetensors"),
            "receipt": save_receipt(doc, d / "r.json"),
            "trigger": save_trigger_set(generate(trigger_key, n=20, size=8, channels=1),
                                        d / "trigger.npz")}
