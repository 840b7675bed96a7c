"""Typed records at the file boundary: each converts to and from JSON in one place, reads what
older versions wrote, and keeps what newer ones add."""

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import make_ticket

from ticketctl.artifacts import Kind
from ticketctl.attacks.runner import JobResult
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.protect.receipt import Receipt, canonical, load_receipt, save_receipt
from ticketctl.protect.signature import sign_ticket
from ticketctl.protect.verdict import (
    ReceiptStatus,
    SignatureReading,
    TriggerReading,
    Verdict,
    decide,
    null_rate_for,
)
from ticketctl.prune import Round, SearchState, TrialResult
from ticketctl.prune.rundir import Dense


def test_search_state_reads_the_json_an_earlier_version_wrote():
    # state.json as written before the records were typed (a resumed run must read it)
    old = {"rate_index": 1, "done": False, "seq": 7, "rounds": [
        {"round": 1, "rate": 0.2, "accuracy": 90.5, "accepted": True, "density": 0.8,
         "kept": 800, "accuracies": [90.5], "val_accuracy": 91.0, "best_epoch": 3,
         "prune_seconds": 0.1, "seconds": 12.0},
        {"round": 2, "rate": 0.2, "accuracy": 80.0, "accepted": False}]}
    state = SearchState.from_dict(old)
    assert [r.round for r in state.rounds] == [1, 2]
    assert state.rounds[1].density is None and state.rounds[1].accuracies == []
    assert state.last_accepted == state.rounds[0] and state.accepted_rounds == 1
    again = SearchState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state
    assert state.to_dict()["rounds"][0] == old["rounds"][0]  # the same keys, the same values


def test_flat_records_round_trip_and_ignore_unknown_keys():
    for record in (TrialResult(91.0, 92.0, 4, 1.5, packed=3), Dense(90.0, None, 8, 3.0, 8),
                   Round(3, 0.1, 89.0, True, density=0.5, kept=50, accuracies=[89.0])):
        d = json.loads(json.dumps(record.to_dict()))
        assert type(record).from_dict({**d, "written_by": "a newer version"}) == record
    with pytest.raises(TypeError):  # a required field missing is an error, not a default
        TrialResult.from_dict({"accuracy": 1.0})


def test_job_results_write_only_what_they_measured():
    job = JobResult(95.0, 2.0, nonzero=0.3)
    assert job.to_dict() == {"accuracy": 95.0, "seconds": 2.0, "nonzero": 0.3}
    # a job file an earlier version wrote
    old = {"accuracy": 93.0, "val_accuracy": 94.0, "best_epoch": 2, "seconds": 1.0,
           "density": 0.2, "packed": 2}
    assert JobResult.from_dict(old).to_dict() == old


@pytest.fixture(scope="module")
def signed():
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    ticket = make_ticket(seed=70, density_rate=0.6, width=32)
    s, receipt, _, _ = sign_ticket(ticket, "owner", private_key=key)
    return s, receipt, key


def test_receipt_file_round_trip_keeps_the_signature(signed, tmp_path):
    _, receipt, key = signed
    path = save_receipt(receipt, tmp_path / "r.json")
    doc = json.loads(path.read_text())
    assert set(doc) == {"format", "version", "receipt", "public_key", "signature"}
    loaded = load_receipt(path)
    assert loaded.fields() == doc["receipt"] == receipt.fields()
    assert loaded.check(key.public_key()) is True
    assert loaded.placements == receipt.placements and loaded.has_code


def test_receipt_tampering_and_other_keys_are_caught(signed, tmp_path):
    _, receipt, key = signed
    doc = receipt.to_dict()
    doc["receipt"]["magnitude_floor"] *= 0.5
    with pytest.raises(CheckFailed, match="altered after signing"):
        Receipt.from_dict(doc).check(None)
    other = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    with pytest.raises(CheckFailed, match="another key"):
        receipt.check(other.public_key())


def test_receipt_fields_of_a_newer_version_are_kept_and_still_verify(signed, tmp_path):
    _, receipt, key = signed
    fields = {**receipt.fields(), "watermark_v4": {"bits": [1, 0, 1]}}
    doc = {"format": "ticketctl-receipt", "version": 1, "receipt": fields,
           "public_key": receipt.public_key,
           "signature": base64.b64encode(key.sign(canonical(fields))).decode()}
    (tmp_path / "new.json").write_text(json.dumps(doc))
    loaded = load_receipt(tmp_path / "new.json")
    assert loaded.other == {"watermark_v4": {"bits": [1, 0, 1]}}
    assert loaded.check(key.public_key())
    assert loaded.fields() == fields  # written back unchanged


def test_trigger_commitment_signs_again(signed):
    _, receipt, key = signed
    updated = receipt.with_trigger("ab" * 32, 100, key)
    assert updated.trigger_sha256 == "ab" * 32 and updated.trigger_n == 100
    assert updated.signature != receipt.signature and updated.check(key.public_key())
    assert receipt.trigger_sha256 is None  # the original is unchanged
    with pytest.raises(TicketctlError, match="--signing-key"):
        receipt.with_trigger("cd" * 32, 100, None)


def _reading(p_value: float, decoded: bool) -> SignatureReading:
    return SignatureReading(message="m" if decoded else None, bit_match=0.9, p_value=p_value,
                            receipt_valid=True, data_modules=100, matches=90,
                            precision_p_value=1e-9, decoded_matches_receipt=decoded,
                            decode_method="rs", decode_min_count=1, placements=[],
                            comparisons=1, alignment="as stored", floor_defence=False)


def test_the_verdict_is_any_check_passing_at_alpha():
    weak, strong = _reading(0.5, False), _reading(1e-9, False)
    trigger = TriggerReading(20.0, 1e-8, 20, 100, 0.1)
    assert not decide(1e-6, signature=weak).verified
    assert decide(1e-6, signature=strong).verified
    assert decide(1e-6, signature=_reading(0.5, True)).verified  # the committed message
    assert decide(1e-6, signature=weak, trigger=trigger).verified
    assert not decide(1e-9, signature=weak, trigger=trigger).verified  # a stricter alpha
    assert decide(1e-6, signature=weak, defended=strong).verified
    assert not decide(1e-6).verified  # no evidence, no verdict for the owner
    with pytest.raises(TicketctlError, match="--alpha"):
        decide(0.0, signature=strong)


def test_verdict_json_round_trip():
    v = decide(1e-6, signature=_reading(1e-9, True), trigger=TriggerReading(95.0, 1e-40, 95,
                                                                              100, 0.1, 90.0))
    v.notes["zbar_message"] = "m"
    v.receipt = ReceiptStatus(True, "self", False)
    doc = json.loads(json.dumps(v.to_dict()))
    for key in ("verified", "message", "bit_match", "p_value", "trigger_accuracy",
                "trigger_p_value", "alpha", "receipt_valid"):  # the CLI contract's keys
        assert key in doc
    assert Verdict.from_dict(doc) == v


def test_null_rate_defaults_to_chance_and_is_checked():
    assert null_rate_for(None, 10) == 0.1
    assert null_rate_for(0.2, 10) == 0.2
    with pytest.raises(TicketctlError, match="null-rate"):
        null_rate_for(1.5, 10)


def test_derive_carries_the_metadata_and_kinds_are_a_closed_set():
    t = make_ticket(seed=3)
    t.extra = {"note": "x"}
    trained = t.derive(kind=Kind.TRAINED, seed=9)
    assert (trained.arch, trained.arch_args, trained.num_classes, trained.dataset,
            trained.rewind_epoch, trained.extra) == (t.arch, t.arch_args, t.num_classes,
                                                     t.dataset, t.rewind_epoch, t.extra)
    assert trained.kind == "trained" and str(trained.kind) == "trained" and trained.seed == 9
    assert t.kind == Kind.TICKET  # the source is unchanged
    assert json.loads(json.dumps({"kind": trained.kind})) == {"kind": "trained"}
    with pytest.raises(TicketctlError, match="unknown ticket kind 'model'"):
        t.derive(kind="model")
