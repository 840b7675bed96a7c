"""Scheme V2: embedding invariants, receipts, verdicts on signed, unsigned and attacked
models, and bad input."""

import json

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, make_ticket, run, write_raw

from ticketctl.artifacts import save_ticket
from ticketctl.artifacts.convert import save_torch_prune
from ticketctl.protect.embed import grid
from ticketctl.protect.qr import encode, function_module_map
from ticketctl.protect.receipt import load_receipt
from ticketctl.protect.signature import masks_of, scan, sign_ticket, verify_with_receipt
from ticketctl.prune import magnitude_prune


@pytest.fixture(scope="module")
def signed_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("v2")
    ticket = make_ticket(seed=20, density_rate=0.6, width=32)
    assert run("keygen", "--out", d / "owner").exit_code == 0
    t = save_ticket(ticket, d / "t.safetensors")
    result = run("sign", t, "--message", "signature", "--out", d / "s.safetensors", "--receipt",
                 d / "r.json", "--signing-key", d / "owner.key", "--json", "--qr-png",
                 d / "code.png")
    assert result.exit_code == 0, result.stderr
    return {"d": d, "ticket": ticket, "sign": json.loads(result.stdout)}


def test_embedding_keeps_density_and_writes_the_code(signed_setup):
    from ticketctl.artifacts import load_ticket

    d, ticket, info = signed_setup["d"], signed_setup["ticket"], signed_setup["sign"]
    signed = load_ticket(d / "s.safetensors")
    assert signed.kind == "signed"
    assert signed.mask.num_kept == ticket.mask.num_kept  # density equal to the element
    assert info["density_before"] == info["density_after"]
    receipt = json.loads((d / "r.json").read_text())["receipt"]
    version, (p,) = receipt["qr_version"], receipt["placements"]
    assert (info["layer"], info["offset"]) == (p["layer"], [p["row"], p["col"]])
    n = 17 + 4 * version
    code = np.unpackbits(np.frombuffer(bytes.fromhex(receipt["matrix"]), np.uint8))[:n * n]
    code = code.reshape(n, n).astype(bool)
    data = ~function_module_map(version)
    rows, cols = slice(p["row"], p["row"] + n), slice(p["col"], p["col"] + n)
    after = grid(signed.mask[p["layer"]])[rows, cols]
    before = grid(ticket.mask[p["layer"]])[rows, cols]
    support = min(3, signed.mask[p["layer"]][0, 0].numel())
    assert (after[data & code] >= support).all()  # every dark module has its support
    assert (after[data & ~code] == 0).all()  # every light module is empty
    assert (after[~data] == before[~data]).all()  # function modules are not written
    # only the region and the density compensation changed: same number of kept weights
    for name in ticket.mask:
        assert signed.state[name][~signed.mask[name]].eq(0).all()


def test_signed_model_verifies_with_message_and_p_value(signed_setup):
    d = signed_setup["d"]
    result = run("verify", d / "s.safetensors", "--receipt", d / "r.json", "--public-key",
                 d / "owner.pub", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    for key in ("verified", "message", "bit_match", "p_value", "trigger_accuracy",
                "trigger_p_value", "alpha", "receipt_valid"):
        assert key in doc
    assert doc["verified"] is True and doc["message"] == "signature"
    assert doc["bit_match"] == 1.0 and doc["p_value"] < 1e-30 and doc["receipt_valid"] is True
    assert doc["receipt_check"] == "public-key" and doc["trigger_committed"] is None
    assert "signed by the owner of --public-key" in run(
        "verify", d / "s.safetensors", "--receipt", d / "r.json", "--public-key",
        d / "owner.pub").stderr
    # Without --public-key only the receipt's integrity is checked, and it says so.
    doc = json.loads(run("verify", d / "s.safetensors", "--receipt", d / "r.json",
                         "--json").stdout)
    assert doc["receipt_valid"] is True and doc["receipt_check"] == "self"


def test_unsigned_and_unrelated_models_do_not_verify(signed_setup):
    d = signed_setup["d"]
    result = run("verify", d / "t.safetensors", "--receipt", d / "r.json", "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["verified"] is False and doc["message"] is None and doc["p_value"] > 1e-6
    # No training here: masks come from seeded initialisations and exact integer counts, so
    # these p-values are the same on every machine. Under the null a p-value is roughly
    # uniform, so five draws all above 1e-6 fail with probability ~5e-6.
    for seed in range(21, 26):  # unrelated tickets: different seeds
        other = make_ticket(seed=seed, density_rate=0.6, width=32)
        verdict = verify_with_receipt(masks_of(other.state, dict(other.mask)),
                                      load_receipt(d / "r.json"))
        assert not verdict.verified and verdict.p_value > 1e-6


def test_pruned_and_added_attacks_still_verify(signed_setup):
    from ticketctl.artifacts import load_ticket

    d = signed_setup["d"]
    signed = load_ticket(d / "s.safetensors")
    doc = load_receipt(d / "r.json")
    for rate in (0.3, 0.5):
        mask = magnitude_prune(signed.state, signed.mask, rate)
        verdict = verify_with_receipt(masks_of(signed.state, dict(mask)), doc)
        assert verdict.verified and verdict.p_value < 1e-12
        if rate == 0.3:
            assert verdict.message == "signature"
    # add-on: revive 1% of the pruned positions with small random weights (two-sided damage)
    gen = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in signed.state.items()}
    for k, m in signed.mask.items():
        free = torch.nonzero(~m.reshape(-1)).squeeze(1)
        pick = free[torch.randperm(len(free), generator=gen)[: round(0.01 * len(free))]]
        state[k].view(-1)[pick] = torch.randn(len(pick), generator=gen) * 1e-3
    masks = masks_of(state)  # a plain state dict: the mask is weight != 0
    verdict = verify_with_receipt(masks, doc)
    assert verdict.verified and verdict.message == "signature"
    assert verdict.bit_match < 1.0  # the attack did turn light modules dark
    defended = verify_with_receipt(masks, doc, floor_defence=True, state=state)
    assert defended.verified and defended.bit_match >= verdict.bit_match


def test_kept_count_defence_removes_revived_weights_above_the_floor(signed_setup):
    """Add-on weights at a tenth of the median kept magnitude pass the magnitude floor; the
    receipt's kept counts still strip them, so the defended read is the signed code again."""
    from ticketctl.artifacts import load_ticket
    from ticketctl.attacks.removal import added

    d = signed_setup["d"]
    signed = load_ticket(d / "s.safetensors")
    doc = load_receipt(d / "r.json")
    layer = doc.placements[0].layer
    assert doc.kept_counts[layer] == int(signed.mask[layer].sum())
    state = added(signed, 0.2, seed=3, scale=0.1)
    masks = masks_of(state)
    floor = doc.magnitude_floor
    revived = masks[layer] & ~signed.mask[layer]
    assert int((revived & (state[layer].abs() >= floor)).sum()) > 0  # the floor lets them in
    plain = verify_with_receipt(masks, doc)
    defended = verify_with_receipt(masks, doc, floor_defence=True, state=state)
    assert plain.bit_match < 0.95
    assert defended.bit_match > plain.bit_match and defended.bit_match >= 0.99
    assert defended.message == "signature"


def test_plain_state_dicts_verify_by_nonzero_weights(signed_setup, tmp_path):
    from ticketctl.artifacts import load_ticket

    d = signed_setup["d"]
    pt = save_torch_prune(load_ticket(d / "s.safetensors"), tmp_path / "s.pt")
    result = run("verify", pt, "--receipt", d / "r.json", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["message"] == "signature"


def test_no_receipt_scan_reports_the_message(signed_setup):
    d = signed_setup["d"]
    result = run("verify", d / "s.safetensors", "--json")
    assert result.exit_code == 1  # found, but nothing to verify it against: not verified
    doc = json.loads(result.stdout)
    assert doc["message"] == "signature" and doc["found"][0]["layer"]
    assert json.loads(run("verify", d / "t.safetensors", "--json").stdout)["message"] is None


def test_scan_finds_a_version_1_code_in_a_dense_layer():
    """The function patterns are never written, so in a dense layer they stay mostly dark and
    the region of a small code is mostly dark too; only its data modules are about half dark
    (the scan once counted every module and never found a version-1 code here)."""
    ticket = make_ticket(seed=31, density_rate=0.6, width=32)
    signed, doc, _, qr = sign_ticket(ticket, "hi")
    p = doc.placements[0]
    n = qr.matrix.shape[0]
    region = grid(signed.mask[p.layer])[p.row:p.row + n, p.col:p.col + n] > 0
    assert qr.version == 1 and region.mean() > 0.75
    found = scan(masks_of(signed.state, dict(signed.mask)), versions=range(1, 2))
    assert [(f["message"], f["layer"], f["row"], f["col"]) for f in found] == \
        [("hi", p.layer, p.row, p.col)]


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_what_a_scan_expects_is_what_the_encoder_writes(version):
    """The scan filters offsets by the modules every code of a message length stores (header,
    terminator, fill, pad codewords); they must be the encoder's, blocks interleaved."""
    from ticketctl.protect.qr import capacity_bytes
    from ticketctl.protect.signature import _known, _message_modules

    header = _message_modules(version)[:12]
    for pattern in range(8):
        cap = capacity_bytes(version)
        for length in sorted({1, 2, min(9, cap), cap - 1, cap}):
            qr = encode("x" * length, version=version, mask_pattern=pattern)
            code, where, stored = _known(version, pattern, length)
            assert code == sum(int(qr.matrix[r, c]) << i for i, (r, c) in enumerate(header))
            assert np.array_equal(qr.matrix[where[:, 0], where[:, 1]], stored)


def test_receipt_signature_checks(signed_setup, tmp_path):
    d = signed_setup["d"]
    doc = json.loads((d / "r.json").read_text())
    doc["receipt"]["placements"][0]["col"] += 1
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    result = run("verify", d / "s.safetensors", "--receipt", tmp_path / "bad.json")
    assert_one_line_error(result, 1, "altered after signing")
    assert run("keygen", "--out", tmp_path / "other").exit_code == 0
    result = run("verify", d / "s.safetensors", "--receipt", d / "r.json", "--public-key",
                 tmp_path / "other.pub")
    assert_one_line_error(result, 1, "signed by another key")
    (tmp_path / "corrupt.json").write_text("{not json")
    result = run("verify", d / "s.safetensors", "--receipt", tmp_path / "corrupt.json")
    assert_one_line_error(result, 2, "receipt is not valid JSON")


def test_receipt_for_another_architecture(signed_setup, tmp_path):
    d = signed_setup["d"]
    small = save_ticket(make_ticket(seed=3, width=8), tmp_path / "small.safetensors")
    # narrower, so it could be a channel-pruned copy: read as one, and the code is not there
    result = run("verify", small, "--receipt", d / "r.json", "--json")
    assert result.exit_code == 1
    verdict = json.loads(result.stdout)
    assert verdict["verified"] is False and verdict["p_value"] > 1e-3
    assert any("read as a channel-pruned copy" in f for f in verdict["findings"])


def test_bad_sign_input(tmp_path):
    t = save_ticket(make_ticket(seed=4, width=32), tmp_path / "t.safetensors")
    out = ["--out", tmp_path / "s.safetensors", "--receipt", tmp_path / "r.json"]
    result = run("sign", t, "--message", "x" * 400, *out)
    assert_one_line_error(result, 2, "at most")
    small = save_ticket(make_ticket(seed=4, width=8), tmp_path / "small.safetensors")
    result = run("sign", small, "--message", "signature", *out)
    assert_one_line_error(result, 2, "largest grid found: 16x16")
    result = run("sign", t, "--message", "signature", "--layer", "conv9.weight", *out)
    assert_one_line_error(result, 2, "not a masked layer")
    result = run("sign", t, "--message", "signature", "--signing-key", tmp_path / "nokey.key",
                 *out)
    assert_one_line_error(result, 2, "no such key file")
    assert not (tmp_path / "s.safetensors").exists()


def test_revived_single_weights_read_light_at_a_higher_threshold():
    ticket = make_ticket(seed=31, density_rate=0.6, width=32)
    signed, doc, _, qr = sign_ticket(ticket, "signature")
    p = doc.placements[0]
    n = 17 + 4 * qr.version
    masks = {k: v.clone() for k, v in signed.mask.items()}
    light = np.argwhere(~qr.matrix & ~function_module_map(qr.version))
    # one weight in each of 60 light modules: far beyond what plain RS corrects
    for i, j in light[:60]:
        masks[p.layer][p.row + i, p.col + j, 0, 0] = True
    verdict = verify_with_receipt(masks_of(signed.state, masks), doc)
    assert verdict.message == "signature" and verdict.signature.decode_min_count == 2
    assert n == qr.matrix.shape[0]


def test_copies_vote_module_wise(tmp_path):
    ticket = make_ticket(seed=30, density_rate=0.6, width=32)
    signed, doc, report, _ = sign_ticket(ticket, "sig", copies=2)
    assert len({p.layer for p in report.placements}) == 2
    assert signed.mask.num_kept == ticket.mask.num_kept
    verdict = verify_with_receipt(masks_of(signed.state, dict(signed.mask)), doc)
    assert verdict.verified and verdict.message == "sig"


def test_a_suspect_file_is_checked_whatever_its_header_claims(signed_setup, tmp_path):
    """A thief who edits the recorded hash, breaks the header or strips it does not dodge
    the check: the weights and masks are read as they are and the mismatch is a finding."""
    import safetensors.torch

    from ticketctl.artifacts import load_ticket

    d = signed_setup["d"]
    signed = load_ticket(d / "s.safetensors")
    meta = signed.metadata()
    forged_hash = {**meta, "tensors_sha256": "0" * 64}
    broken = {**meta, "arch": "resnet20"}  # tensors do not fit the claimed architecture
    files = {"hash": write_raw(tmp_path / "hash.safetensors", signed.tensors(), forged_hash),
             "arch": write_raw(tmp_path / "arch.safetensors", signed.tensors(), broken),
             "plain": tmp_path / "plain.safetensors"}
    safetensors.torch.save_file(signed.tensors(), str(files["plain"]))  # no header at all
    for name, path in files.items():
        result = run("verify", path, "--receipt", d / "r.json", "--json")
        assert result.exit_code == 0, (name, result.stderr)
        doc = json.loads(result.stdout)
        assert doc["verified"] is True and doc["message"] == "signature", name
        assert bool(doc["findings"]) == (name != "plain"), (name, doc["findings"])
    assert "altered after it was written" in json.loads(
        run("verify", files["hash"], "--receipt", d / "r.json", "--json").stdout)["findings"][0]
    # the user's own input to a transformation stays strict
    assert_one_line_error(run("split", files["hash"], "--score", "omp", "--key-ratio", "0.1",
                              "--key-mask", tmp_path / "k", "--locked", tmp_path / "l"), 1,
                          "altered after it was written")


def test_an_unsigned_receipt_is_said_loudly(tmp_path):
    t = save_ticket(make_ticket(seed=8, width=32), tmp_path / "t.safetensors")
    result = run("sign", t, "--message", "m", "--out", tmp_path / "s.safetensors", "--receipt",
                 tmp_path / "r.json", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["receipt_signed"] is False
    assert "not signed" in result.stderr and "keygen" in result.stderr
    # verify says what an unsigned receipt cannot show, and its JSON says it was unsigned
    result = run("verify", tmp_path / "s.safetensors", "--receipt", tmp_path / "r.json")
    assert result.exit_code == 0 and "receipt: not signed" in result.stderr
    doc = json.loads(run("verify", tmp_path / "s.safetensors", "--receipt",
                         tmp_path / "r.json", "--json").stdout)
    assert doc["receipt_valid"] is False and doc["receipt_check"] == "unsigned"
