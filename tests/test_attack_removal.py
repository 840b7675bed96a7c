"""`attack prune` and `attack addon`: exact counts, the sweep's table, JSON, CSV and plot."""

import json
import re

import pytest
import torch
from helpers import assert_one_line_error, make_ticket, run

from ticketctl.artifacts import save_ticket
from ticketctl.attacks.removal import added, attack_mask, pruned
from ticketctl.protect.receipt import save_receipt
from ticketctl.protect.signature import sign_ticket


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    d = tmp_path_factory.mktemp("removal")
    ticket = make_ticket(seed=50, density_rate=0.6, width=32)
    s, doc, _, _ = sign_ticket(ticket, "signature")
    return {"d": d, "ticket": s, "path": save_ticket(s, d / "s.safetensors"),
            "receipt": save_receipt(doc, d / "r.json")}


@pytest.mark.parametrize("method", ["omp", "random"])
def test_prune_removes_exactly_the_fraction_first_conv_included(signed, method):
    ticket = signed["ticket"]
    before = attack_mask(ticket)
    assert "conv1.weight" in before  # the first conv is attacked too, as the paper
    state = pruned(ticket, method, 0.3, seed=1)
    kept_before = before.num_kept
    kept_after = sum(int((state[k] != 0).sum()) for k in before)
    assert kept_after == kept_before - round(0.3 * kept_before)
    for k in before:  # nothing revived
        assert not bool(((state[k] != 0) & ~before[k]).any())


def test_addon_revives_exactly_the_fraction(signed):
    ticket = signed["ticket"]
    state = added(ticket, 0.05, seed=2)
    for k, m in ticket.mask.items():
        free = int((~m).sum())
        new = int(((state[k] != 0) & ~m).sum())
        assert new == round(0.05 * free), k
        assert torch.equal(state[k][m], ticket.state[k][m])  # kept weights untouched


def test_prune_sweep_outputs(signed, tmp_path):
    result = run("attack", "prune", signed["path"], "--rates", "0.1,0.3", "--receipt",
                 signed["receipt"], "--json", "--csv", tmp_path / "rows.csv", "--plot",
                 tmp_path / "rows.png")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["attack"] == "prune-omp" and [r["strength"] for r in doc["rows"]] == [0.1, 0.3]
    for row in doc["rows"]:
        for key in ("strength", "accuracy", "verified", "message", "p_value"):
            assert key in row
        assert row["verified"] is True and row["p_value"] < 1e-6
    assert doc["rows"][0]["message"] == "signature"
    lines = (tmp_path / "rows.csv").read_text().splitlines()
    assert lines[0].startswith("attack,strength,accuracy") and len(lines) == 3
    assert (tmp_path / "rows.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_addon_with_defence_reports_both(signed):
    result = run("attack", "addon", signed["path"], "--rates", "0.01", "--receipt",
                 signed["receipt"], "--defend", "--json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)["rows"][0]
    assert "defended_p_value" in row["details"] and row["verified"] is True


def test_removal_bad_input(signed, tmp_path):
    assert_one_line_error(run("attack", "prune", signed["path"], "--rates", "1.2"), 2,
                          "[0, 1)")
    assert_one_line_error(run("attack", "addon", signed["path"], "--rates", "-0.1"), 2,
                          "[0, 1)")
    assert_one_line_error(run("attack", "addon", signed["path"], "--defend"), 2,
                          "needs --receipt")
    other = save_ticket(make_ticket(seed=3, width=8), tmp_path / "small.safetensors")
    # a narrower model of the same architecture could be a channel-pruned copy: it is read
    # as one (missing channels empty) and the code is not there
    result = run("attack", "prune", other, "--receipt", signed["receipt"], "--json")
    assert result.exit_code == 1
    assert not any(r["verified"] for r in json.loads(result.stdout)["rows"])


def test_no_checks_means_accuracy_only(signed):
    result = run("attack", "prune", signed["path"], "--method", "random", "--rates", "0.05",
                 "--json")
    assert result.exit_code == 0
    row = json.loads(result.stdout)["rows"][0]
    assert row["verified"] is None and 0 <= row["accuracy"] <= 100


@pytest.mark.parametrize("arch", ["digits_cnn", "resnet20"])
def test_permutation_preserves_every_output_and_moves_the_mask(arch, float64):
    """Permuting channels reorders the sums of the next layer only; in float64 (u = 1.1e-16,
    at most 576 terms a sum, ~20 layers) outputs agree to ~1e-12 relative, bound 1e-9."""
    from ticketctl.artifacts import Mask, Ticket
    from ticketctl.attacks.permute import permutable_groups, permute
    from ticketctl.models import build_model, prunable_names
    from ticketctl.prune import magnitude_prune

    model = build_model(arch, seed=7)
    mask = magnitude_prune(dict(model.named_parameters()),
                           Mask.ones(model, prunable_names(model)), 0.7)
    ticket = Ticket.from_model(model, mask, arch=arch)
    moved, perms = permute(ticket, seed=4)
    assert len(perms) == len(permutable_groups(ticket)) > 0
    x = torch.randn(4, *((1, 8, 8) if arch == "digits_cnn" else (3, 32, 32)))
    a, b = ticket.build_model().eval(), moved.build_model().eval()
    torch.testing.assert_close(a(x), b(x), atol=1e-9, rtol=1e-9)
    assert moved.mask.num_kept == ticket.mask.num_kept
    assert any(not torch.equal(moved.mask[k], ticket.mask[k]) for k in ticket.mask)


def test_permuted_signed_model_verifies_by_realignment(signed, tmp_path):
    result = run("attack", "permute", signed["path"], "--receipt", signed["receipt"], "--json",
                 "--out", tmp_path / "p.safetensors")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)["rows"][0]
    assert row["delta"] == pytest.approx(0.0, abs=1e-9)  # accuracy unchanged
    assert row["verified"] and row["message"] == "signature"
    assert row["details"]["alignment"] == "re-aligned"
    result = run("verify", tmp_path / "p.safetensors", "--receipt", signed["receipt"], "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["message"] == "signature"


def test_fake3_overwrites_the_code_but_not_the_receipts_history(signed):
    result = run("attack", "fake3", signed["path"], "--message", "mine now", "--receipt",
                 signed["receipt"], "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["forger_on_forged"]["message"] == "mine now"
    assert doc["owner_on_forged"]["message"] is None  # the region now holds his code
    assert doc["owner_receipt_matches_release"] is True
    assert doc["forger_receipt_matches_release"] is False
    assert doc["forger_receipt_created"] >= doc["owner_receipt_created"]
    assert doc["accuracy_after"] <= doc["accuracy_before"] + 1.0
    # rows like every other attack: the forged model, and what the owner's receipt reads in it
    (row,) = doc["rows"]
    assert doc["attack"] == "fake3" and row["accuracy"] == doc["accuracy_after"]
    assert row["verified"] is False and row["details"]["forger_message"] == "mine now"


def test_alignment_uses_kernel_patterns_when_weights_and_counts_say_nothing():
    """Every kept kernel holds one weight (all counts alike) and the weights are drawn anew
    (as after retraining): only the kernels' 0/1 patterns can tell the channels apart."""
    from ticketctl.protect.align import align, fingerprints

    gen = torch.Generator().manual_seed(3)
    out_c, in_c = 32, 32
    mask = torch.zeros(out_c, in_c, 9, dtype=torch.bool)
    keep = torch.rand(out_c, in_c, generator=gen) < 0.3
    pos = torch.randint(0, 9, (out_c, in_c), generator=gen)
    mask[keep, pos[keep]] = True
    mask = mask.view(out_c, in_c, 3, 3)
    weight = torch.randn(mask.shape, generator=gen) * mask
    reference = fingerprints(weight, mask)
    rows, cols = torch.randperm(out_c, generator=gen), torch.randperm(in_c, generator=gen)
    moved_mask = mask[rows][:, cols]
    redrawn = torch.randn(mask.shape, generator=gen) * moved_mask
    assert torch.equal(align(redrawn, moved_mask, reference), mask)


def test_permutation_is_undone_after_the_weights_drifted(signed):
    """Retraining after signing changes every weight but not the mask; the receipt's kernel
    patterns still identify the permuted channels, so the exact code is read back."""
    from ticketctl.artifacts import Ticket
    from ticketctl.attacks.permute import permute
    from ticketctl.protect.receipt import load_receipt
    from ticketctl.protect.signature import masks_of, verify_with_receipt

    ticket = signed["ticket"]
    gen = torch.Generator().manual_seed(7)
    drifted = {k: (v * (0.3 + 1.4 * torch.rand(v.shape, generator=gen))
                   if v.is_floating_point() else v) for k, v in ticket.state.items()}
    retrained = Ticket(state=drifted, mask=ticket.mask, kind="trained", arch=ticket.arch,
                       arch_args=ticket.arch_args, num_classes=ticket.num_classes,
                       dataset=ticket.dataset, rewind_epoch=ticket.rewind_epoch)
    doc = load_receipt(signed["receipt"])
    for seed in range(3):
        moved, _ = permute(retrained, seed)
        verdict = verify_with_receipt(masks_of(moved.state), doc, state=moved.state)
        assert verdict.signature.alignment == "re-aligned"
        assert verdict.bit_match == 1.0 and verdict.message == "signature"


def test_tables_never_cut_numbers_when_not_a_terminal(signed):
    """Piped or logged output used to squeeze tables to 80 columns and cut p-values
    ("6.1e-1..." for 6.1e-108)."""
    result = run("attack", "addon", signed["path"], "--rates", "0.01,0.05", "--receipt",
                 signed["receipt"], "--defend")
    assert result.exit_code == 0, result.stderr
    assert "…" not in result.stderr and "..." not in result.stderr
    assert re.search(r"\de-\d{2,3}", result.stderr)  # p-values with their whole exponent
