"""Scheme V3 on digits: key-derived trigger sets, retraining with them, black-box verdicts
(locally and through --predict-cmd), calibration, and bad input."""

import json
import sys

import numpy as np
import pytest
from helpers import assert_one_line_error, make_ticket, run

from ticketctl.artifacts import save_ticket
from ticketctl.protect.trigger import TriggerSet, generate, load_trigger_set, save_trigger_set


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    d = tmp_path_factory.mktemp("v3")
    assert run("keygen", "--out", d / "owner").exit_code == 0
    assert run("trigger", "new", "--signing-key", d / "owner.key", "-n", "50", "--size", "8",
               "--channels", "1", "--out", d / "set.npz").exit_code == 0
    ticket = save_ticket(make_ticket(seed=40, density_rate=0.5, width=32),
                         d / "t.safetensors")
    common = ["--preset", "demo", "--epochs", "12", "--json"]
    marked = run("retrain", ticket, "--trigger", d / "set.npz", "--trigger-per-batch", "16",
                 "--out", d / "marked.safetensors", "--receipt", d / "receipt.json",
                 "--signing-key", d / "owner.key", *common)
    assert marked.exit_code == 0, marked.stderr
    plain = run("retrain", ticket, "--out", d / "plain.safetensors", *common)
    assert plain.exit_code == 0, plain.stderr
    return {"d": d, "marked": json.loads(marked.stdout), "plain": json.loads(plain.stdout)}


def test_generated_set_depends_on_the_key_only():
    a, b, c = generate(b"key one", 20), generate(b"key one", 20), generate(b"key two", 20)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert a.sha256() == b.sha256() != c.sha256()


def test_cli_set_is_reproducible(v3, tmp_path):
    d = v3["d"]
    assert run("trigger", "new", "--signing-key", d / "owner.key", "-n", "50", "--size", "8",
               "--channels", "1", "--out", tmp_path / "again.npz").exit_code == 0
    assert load_trigger_set(tmp_path / "again.npz").sha256() == \
        load_trigger_set(d / "set.npz").sha256()


def test_retraining_with_the_set_learns_it_and_verifies(v3):
    # Over 15 fresh keys and ticket seeds 40-47 the set was learnt to 100% and the task to
    # 96.7-99.0%: the bounds (90, 85) leave 5 of the 50 images and 11 points.
    marked, plain = v3["marked"], v3["plain"]
    assert marked["trigger_accuracy"] >= 90
    assert plain["trigger_accuracy"] is None
    assert marked["test_accuracy"] > 85  # the task is still learnt
    d = v3["d"]
    result = run("verify", d / "marked.safetensors", "--trigger", d / "set.npz", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["verified"] and doc["trigger_p_value"] < 1e-6
    assert doc["trigger_accuracy"] >= 90 and doc["null_rate"] == pytest.approx(0.1)
    # the saved model is the one whose numbers retrain reported
    assert doc["trigger_accuracy"] == marked["trigger_accuracy"]


def test_a_model_trained_without_the_set_does_not_verify(v3):
    # p < 1e-6 at null rate 0.1 needs 18 of the 50 labels; models that never saw a set matched
    # 2-8 of them (15 repeats): a margin of 10 images.
    d = v3["d"]
    result = run("verify", d / "plain.safetensors", "--trigger", d / "set.npz", "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["verified"] is False and doc["trigger_p_value"] > 1e-6


def _model_script(tmp_path, model):
    """A stand-in for a remote prediction API: loads the model and labels the images."""
    script = tmp_path / "api.py"
    script.write_text(f"""
import json, sys
import numpy as np, torch
from ticketctl.artifacts import load_ticket
t = load_ticket({str(model)!r})
net = t.build_model().eval()
d = t.dataset
x = torch.from_numpy(np.load(sys.argv[1])["images"]).permute(0, 3, 1, 2).float() / 255
x = (x - torch.tensor(d["mean"]).view(1, -1, 1, 1)) / torch.tensor(d["std"]).view(1, -1, 1, 1)
print(json.dumps(net(x).argmax(1).tolist()))
""")
    return f"{sys.executable} {script}"


def test_predict_cmd_end_to_end(v3, tmp_path):
    d = v3["d"]
    cmd = _model_script(tmp_path, d / "marked.safetensors")
    result = run("verify", "--trigger", d / "set.npz", "--predict-cmd", cmd, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["verified"] and doc["trigger_accuracy"] >= 90
    assert doc["decoy_accuracy"] > 80  # ordinary images, answered normally (96-98% seen)
    plain = _model_script(tmp_path, d / "plain.safetensors")
    result = run("verify", "--trigger", d / "set.npz", "--predict-cmd", plain, "--json")
    assert result.exit_code == 1


def test_predict_cmd_failures_are_exit_2(v3, tmp_path):
    d = v3["d"]
    bad = tmp_path / "bad.py"
    bad.write_text("import sys; sys.stderr.write('service down'); sys.exit(3)")
    result = run("verify", "--trigger", d / "set.npz", "--predict-cmd",
                 f"{sys.executable} {bad}")
    assert_one_line_error(result, 2, "service down")
    slow = tmp_path / "slow.py"
    slow.write_text("import time; time.sleep(30)")
    result = run("verify", "--trigger", d / "set.npz", "--predict-cmd",
                 f"{sys.executable} {slow}", "--timeout", "1")
    assert_one_line_error(result, 2, "1")
    short = tmp_path / "short.py"
    short.write_text("print('[1, 2, 3]')")
    result = run("verify", "--trigger", d / "set.npz", "--predict-cmd",
                 f"{sys.executable} {short}")
    assert_one_line_error(result, 2, "3")


def test_calibrate_gives_a_null_rate(v3, tmp_path):
    d = v3["d"]
    result = run("calibrate", "--trigger", d / "set.npz", "--models", "2", "--epochs", "3",
                 "--out", tmp_path / "null.json", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert 0 < doc["null_rate"] < 1 and doc["null_rate"] >= doc["mean_agreement"]
    assert len(doc["agreements"]) == 2
    assert json.loads((tmp_path / "null.json").read_text())["null_rate"] == doc["null_rate"]
    # verify reads what calibrate wrote, for the set it was made for only
    result = run("verify", d / "marked.safetensors", "--trigger", d / "set.npz", "--null-rate",
                 tmp_path / "null.json", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["null_rate"] == doc["null_rate"]
    other = TriggerSet(np.zeros((4, 8, 8, 1), np.uint8), np.arange(4))
    save_trigger_set(other, tmp_path / "other.npz")
    result = run("verify", d / "marked.safetensors", "--trigger", tmp_path / "other.npz",
                 "--null-rate", tmp_path / "null.json")
    assert_one_line_error(result, 2, "another trigger set")
    assert_one_line_error(run("verify", d / "marked.safetensors", "--trigger", d / "set.npz",
                              "--null-rate", "lots"), 2, "number or a calibration file")


def test_bad_trigger_input(v3, tmp_path):
    d = v3["d"]
    rgb = TriggerSet(np.zeros((4, 8, 8, 2), np.uint8), np.zeros(4, np.int64))
    save_trigger_set(rgb, tmp_path / "two.npz")
    result = run("verify", d / "marked.safetensors", "--trigger", tmp_path / "two.npz")
    assert_one_line_error(result, 2, "channels")
    wrong = TriggerSet(np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 1, 2, 12]))
    save_trigger_set(wrong, tmp_path / "labels.npz")
    result = run("verify", d / "marked.safetensors", "--trigger", tmp_path / "labels.npz")
    assert_one_line_error(result, 2, "outside")
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8, 1), np.uint8),
             labels=np.zeros(0, np.int64))
    result = run("verify", d / "marked.safetensors", "--trigger", tmp_path / "empty.npz")
    assert_one_line_error(result, 2, "empty")
    result = run("verify", "--predict-cmd", "true")
    assert_one_line_error(result, 2, "--trigger")


def test_the_receipt_commits_to_the_trigger_set(v3):
    from ticketctl.protect.receipt import load_public_key, load_receipt

    d = v3["d"]
    receipt = load_receipt(d / "receipt.json")
    assert receipt.trigger_sha256 == load_trigger_set(d / "set.npz").sha256()
    assert receipt.trigger_sha256 == v3["marked"]["trigger_sha256"]
    assert not receipt.has_code  # made by retrain --receipt alone: a trigger set, no code
    assert receipt.check(load_public_key(d / "owner.pub"))


def test_a_receipt_of_a_trigger_set_alone_checks_the_black_box(v3):
    """`retrain --receipt` alone commits a trigger set and no code: with --trigger it gives
    the black-box verdict; without one it says what is missing."""
    d = v3["d"]
    result = run("verify", d / "marked.safetensors", "--receipt", d / "receipt.json",
                 "--trigger", d / "set.npz", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["verified"] and doc["p_value"] is None and doc["trigger_p_value"] < 1e-6
    # The receipt itself is checked too, and says how far.
    assert doc["receipt_valid"] is True and doc["receipt_check"] == "self"
    assert doc["trigger_committed"] is True and doc["findings"] == []
    result = run("verify", d / "marked.safetensors", "--receipt", d / "receipt.json",
                 "--public-key", d / "owner.pub", "--trigger", d / "set.npz", "--json")
    assert json.loads(result.stdout)["receipt_check"] == "public-key"
    result = run("verify", d / "marked.safetensors", "--receipt", d / "receipt.json")
    assert_one_line_error(result, 2, "only a trigger set")


def test_a_trigger_receipt_is_checked_before_it_is_believed(v3, tmp_path):
    d = v3["d"]
    # Another set than the committed one still gives a verdict, but the receipt does not
    # date it, and the verdict says so.
    other = tmp_path / "other.npz"
    save_trigger_set(generate(b"another owner", n=50, size=8, channels=1), other)
    result = run("verify", d / "marked.safetensors", "--receipt", d / "receipt.json",
                 "--trigger", other, "--json")
    doc = json.loads(result.stdout)
    assert doc["trigger_committed"] is False
    assert any("not the one the receipt commits" in f for f in doc["findings"])
    # A receipt edited after signing is refused (exit 1), not silently used.
    edited = json.loads((d / "receipt.json").read_text())
    edited["receipt"]["trigger_n"] = 49
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    result = run("verify", d / "marked.safetensors", "--receipt", tmp_path / "edited.json",
                 "--trigger", d / "set.npz")
    assert_one_line_error(result, 1, "altered after signing")
    # Another owner's public key is refused.
    assert run("keygen", "--out", tmp_path / "thief").exit_code == 0
    result = run("verify", d / "marked.safetensors", "--receipt", d / "receipt.json",
                 "--public-key", tmp_path / "thief.pub", "--trigger", d / "set.npz")
    assert_one_line_error(result, 1, "another key")


def test_the_default_exposure_learns_the_set_and_a_weak_one_is_warned(v3, tmp_path):
    """Without --trigger-per-batch the set is mixed in often enough to be learnt (the paper's
    one per batch learnt a 50-image set to 14% on digits); a run that still falls short of
    what verify needs says so."""
    d = v3["d"]
    ticket = make_ticket(seed=40, density_rate=0.5, width=32)
    t = save_ticket(ticket, tmp_path / "t.safetensors")
    result = run("retrain", t, "--trigger", d / "set.npz", "--preset", "demo", "--epochs", "12",
                 "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["trigger_per_batch"] == 16  # a quarter of the batch of 64: the cap on digits
    assert doc["trigger_accuracy"] >= 90  # as learnt at 16 (15 keys, 100% each)
    result = run("retrain", t, "--trigger", d / "set.npz", "--preset", "demo", "--epochs", "2",
                 "--trigger-per-batch", "1")
    assert result.exit_code == 0, result.stderr
    assert "verify --trigger` needs" in result.stderr  # one epoch at 1 per batch: 1-2 views
    assert_one_line_error(run("retrain", t, "--trigger-per-batch", "4", "--epochs", "2"), 2,
                          "needs --trigger")
