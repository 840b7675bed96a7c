"""`attack quantize` and `attack noise`: what the attacked weights may hold, the mask they
keep, the rows' checks (signature and trigger set), the saved files and bad input."""

import json

import pytest
import torch
from helpers import assert_one_line_error, make_ticket, run, signed_files

from ticketctl.artifacts import save_ticket
from ticketctl.attacks.degrade import FP8, noised, parse_formats, quantize_weight, quantized
from ticketctl.attacks.removal import attack_mask
from ticketctl.errors import TicketctlError
from ticketctl.protect.receipt import save_receipt
from ticketctl.protect.signature import sign_ticket


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    return signed_files(tmp_path_factory.mktemp("degrade"))


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_quantized_channels_hold_at_most_2_to_the_bits_values_and_zeros_stay(signed, bits):
    ticket = signed["ticket"]
    state = quantized(ticket, f"int{bits}")
    for k in attack_mask(ticket):
        w, q = ticket.state[k], state[k]
        rows = q.reshape(q.shape[0], -1)
        for row in rows:
            assert len(torch.unique(row)) <= 2 ** bits - 1  # -L..L: zero and L a side
        assert bool((q[w == 0] == 0).all()), k  # a pruned weight stays zero
        # each value is within half a step of the original: the step is the channel's
        # largest |w| over 2^(bits-1) - 1 (float64 arithmetic, float32 storage: a few ulps)
        step = w.reshape(w.shape[0], -1).abs().amax(1) / (2 ** (bits - 1) - 1)
        err = (q - w).reshape(w.shape[0], -1).abs().amax(1)
        assert bool((err <= step / 2 * (1 + 1e-5) + 1e-12).all()), k
    for k, v in ticket.state.items():  # biases and BatchNorm are left in float
        if k not in attack_mask(ticket):
            assert torch.equal(state[k], v)


def test_fp8_keeps_zeros_and_the_channel_maximum():
    w = torch.tensor([[0.0, 0.3, -0.01, 1e-9], [0.0, 0.0, 0.0, 0.0]])
    q = quantize_weight(w, FP8)
    assert q[0, 0] == 0 and bool((q[1] == 0).all())
    assert q[0, 1] == pytest.approx(0.3, rel=1e-6)  # the channel's largest maps to 448 exactly
    # e4m3 keeps 3 mantissa bits: a relative error of at most 2^-4 above its subnormals
    assert float(q[0, 2]) == pytest.approx(-0.01, rel=2 ** -4)
    assert q[0, 3] == 0  # far below the channel's smallest subnormal step: flushed to zero


def test_noise_leaves_every_mask_and_pruned_zero_as_it_was(signed):
    ticket = signed["ticket"]
    before = attack_mask(ticket)
    state = noised(ticket, 0.2, seed=3)
    changed = 0
    for k, m in before.items():
        assert torch.equal(state[k] != 0, m), k
        changed += int((state[k][m] != ticket.state[k][m]).sum())
        kept = ticket.state[k][m]
        if kept.numel() > 100:  # the noise's scale: 0.2 of the layer's std, within 30%
            spread = float((state[k][m] - kept).std() / kept.std())
            assert 0.14 < spread < 0.26, (k, spread)
    assert changed == before.num_kept
    assert torch.equal(noised(ticket, 0.2, seed=3)[k], state[k])  # seeded


def test_every_row_carries_every_check(signed, tmp_path):
    for attack, extra in (("quantize", ["--bits", "8,4,fp8"]),
                          ("noise", ["--sigmas", "0.05,0.5"])):
        result = run("attack", attack, signed["path"], *extra, "--receipt", signed["receipt"],
                     "--trigger", signed["trigger"], "--dataset", "digits", "--json",
                     "--csv", tmp_path / f"{attack}.csv", "--plot", tmp_path / f"{attack}.png")
        assert result.exit_code in (0, 1), result.stderr
        doc = json.loads(result.stdout)
        assert doc["attack"] == attack and doc["reference_accuracy"] is not None
        for row in doc["rows"]:
            for key in ("accuracy", "verified", "message", "p_value", "trigger_accuracy"):
                assert row[key] is not None, (attack, key)
            assert "bit_match" in row["details"] and "trigger_p_value" in row["details"]
        assert (tmp_path / f"{attack}.png").read_bytes()[:4] == b"\x89PNG"
        assert len((tmp_path / f"{attack}.csv").read_text().splitlines()) == \
            len(doc["rows"]) + 1
    # the signature outlives int8 and noise at 5% of the weights' spread on this ticket
    rows = {r["strength"]: r for r in doc["rows"]}
    assert rows[0.05]["message"] == "signature"


def test_saved_quantized_models_verify_as_suspects(signed, tmp_path):
    folder = tmp_path / "q"
    result = run("attack", "quantize", signed["path"], "--bits", "8", "--receipt",
                 signed["receipt"], "--save", folder, "--json")
    assert result.exit_code == 0, result.stderr
    saved = folder / "quantized-int8.safetensors"
    result = run("verify", saved, "--receipt", signed["receipt"], "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["verified"] is True and doc["message"] == "signature"
    again = run("attack", "quantize", signed["path"], "--bits", "8", "--receipt",
                signed["receipt"], "--save", folder)
    assert_one_line_error(again, 2, "already exists")


@pytest.mark.parametrize("args,message", [
    (["quantize", "--bits", "1"], "from 2 to 16, got 1"),
    (["quantize", "--bits", "17"], "from 2 to 16, got 17"),
    (["quantize", "--bits", "8,int4"], "got 'int4'"),
    (["quantize", "--bits", ","], "at least one value"),
    (["noise", "--sigmas", "0"], "positive and finite"),
    (["noise", "--sigmas", "-0.1"], "positive and finite"),
])
def test_bad_strengths_are_one_line(signed, args, message):
    result = run("attack", args[0], signed["path"], *args[1:], "--receipt", signed["receipt"])
    assert_one_line_error(result, 2, message)


def test_formats_are_parsed_in_order():
    assert parse_formats("8, 6,4,FP8") == ["int8", "int6", "int4", FP8]
    with pytest.raises(TicketctlError):
        parse_formats("16,99")


def test_a_ticket_without_its_network_is_attacked_too(signed, tmp_path):
    """Quantization and noise need only weights and masks: accuracy is "not measured"."""
    from ticketctl.models.sources import NetworkInfo
    ext = make_ticket(seed=71, density_rate=0.6, width=32).derive(
        arch="none", arch_args={}, network=NetworkInfo("none"))
    s, doc, _, _ = sign_ticket(ext, "signature")
    path = save_ticket(s, tmp_path / "ext.safetensors")
    receipt = save_receipt(doc, tmp_path / "ext.json")
    for attack, extra in (("quantize", ["--bits", "8"]), ("noise", ["--sigmas", "0.05"])):
        result = run("attack", attack, path, *extra, "--receipt", receipt, "--json")
        assert result.exit_code == 0, result.stderr
        row = json.loads(result.stdout)["rows"][0]
        assert row["accuracy"] is None and row["message"] == "signature"
