"""`attack finetune`: the mask is kept (or, --dense, revived), the marks are checked, a
transfer gets a new head, and a sweep resumes from its folder."""

import json

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, make_ticket, run
from PIL import Image

from ticketctl.artifacts import Mask, Ticket, save_ticket
from ticketctl.attacks.finetune import adapt, head_names
from ticketctl.models import build_model, prunable_names
from ticketctl.protect.receipt import save_receipt
from ticketctl.protect.signature import sign_ticket
from ticketctl.prune import magnitude_prune
from ticketctl.train.config import TrainOverrides

FAST = ["--preset", "demo", "--batch-size", "128"]


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune")
    ticket = make_ticket(seed=60, density_rate=0.6, width=32)
    s, doc, _, _ = sign_ticket(ticket, "signature")
    return {"d": d, "ticket": s, "path": save_ticket(s, d / "s.safetensors"),
            "receipt": save_receipt(doc, d / "r.json")}


def _load(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_finetune_keeps_the_mask_and_the_signature(signed, tmp_path):
    out = tmp_path / "sweep"
    result = run("attack", "finetune", signed["path"], "--sweep-epochs", "1,2", *FAST, "--receipt",
                 signed["receipt"], "--out-dir", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["attack"] == "finetune" and [r["strength"] for r in doc["rows"]] == [1, 2]
    assert doc["reference"] == "the released model"
    density = signed["ticket"].mask.num_kept / sum(m.numel() for m in
                                                    signed["ticket"].mask.values())
    for row in doc["rows"]:
        assert row["details"]["nonzero"] <= density + 1e-9  # no weight grew back
        assert row["verified"] is True and row["message"] == "signature"
    states = sorted(out.glob("jobs/*.safetensors"))
    assert len(states) == 2
    # each row's accuracy is that of the weights kept for it (its best-validation epoch)
    from ticketctl.data import load_recorded_dataset
    from ticketctl.train import evaluate

    data = load_recorded_dataset(signed["ticket"].dataset)
    model = signed["ticket"].build_model().eval()
    reported = sorted(r["accuracy"] for r in doc["rows"])
    measured = []
    for path in states:
        model.load_state_dict(_load(path))
        measured.append(evaluate(model, data.test_x, data.test_y))
    assert sorted(measured) == reported
    for path in states:
        state = _load(path)
        for k, m in signed["ticket"].mask.items():
            assert not bool(state[k][~m].any()), k  # pruned weights stayed exactly zero
        assert any(not torch.equal(state[k], signed["ticket"].state[k])
                   for k in signed["ticket"].mask)  # and training did change the kept ones


def test_dense_finetune_revives_pruned_positions(signed, tmp_path):
    result = run("attack", "finetune", signed["path"], "--sweep-epochs", "1", "--dense", *FAST,
                 "--receipt", signed["receipt"], "--out-dir", tmp_path / "d", "--json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)["rows"][0]
    assert json.loads(result.stdout)["attack"] == "finetune-dense"
    # Dense fine-tuning writes every position (1.0 in every run), the undefended read then
    # sees a blur (0.546 in every run: a fixed function of the code once all are nonzero), and
    # the kept-count defence restores the code (p 1.7e-108): margins far beyond any CPU.
    assert row["details"]["nonzero"] > 0.9  # nearly every position is nonzero now
    assert row["details"]["bit_match"] < 0.9  # the undefended read sees a blurred code
    # the kept-count defence reads the code again
    assert row["details"]["defended_p_value"] < 1e-6


def test_an_interrupted_sweep_resumes(signed, tmp_path):
    out = tmp_path / "sweep"
    first = run("attack", "finetune", signed["path"], "--sweep-epochs", "1", *FAST, "--out-dir",
                out, "--json")
    assert first.exit_code == 0, first.stderr
    jobs = sorted(p.name for p in out.glob("jobs/*"))
    second = run("attack", "finetune", signed["path"], "--sweep-epochs", "1,2", *FAST, "--out-dir",
                 out, "--json")
    assert second.exit_code == 0, second.stderr
    a, b = json.loads(first.stdout)["rows"][0], json.loads(second.stdout)["rows"][0]
    assert a == b  # the finished row is reused, not retrained
    now = sorted(p.name for p in out.glob("jobs/*"))
    assert set(jobs) < set(now) and len(now) == len(jobs) + 2  # one new job: json + state
    # a lost state file means the job runs again rather than failing
    for p in out.glob("jobs/*.safetensors"):
        p.unlink()
    third = run("attack", "finetune", signed["path"], "--sweep-epochs", "1", *FAST, "--out-dir",
                out, "--json")
    assert third.exit_code == 0, third.stderr
    assert len(list(out.glob("jobs/*.safetensors"))) == 1


def _rgb_ticket(classes: int = 10) -> Ticket:
    torch.manual_seed(3)
    model = build_model("digits_cnn", classes, width=8, in_channels=3)
    names = prunable_names(model)
    mask = magnitude_prune(dict(model.named_parameters()), Mask.ones(model, names), 0.5)
    return Ticket.from_model(model, mask, kind="trained", arch="digits_cnn",
                             arch_args={"width": 8, "in_channels": 3}, num_classes=classes,
                             dataset={"name": "imagefolder"}, rewind_epoch=0, seed=3)


def _image_folder(root, classes=3, per_class=(24, 8)):
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class, strict=True):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (8, 8, 3), dtype=np.uint8)
                img[:, :, c] += 150  # learnable: each class is brighter in one channel
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_transfer_replaces_the_head_and_keeps_the_convolution_masks(tmp_path):
    ticket = _rgb_ticket()
    adapted = adapt(ticket, 3, 3, {"name": "imagefolder"})
    head = head_names(ticket.build_model())
    assert adapted.num_classes == 3
    for k, v in adapted.state.items():
        if k in head:
            assert v.shape[0] == 3
        else:
            assert torch.equal(v, ticket.state[k])
    for k in ticket.mask:
        if k not in head:
            assert torch.equal(adapted.mask[k], ticket.mask[k])
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    folder = _image_folder(tmp_path / "imgs")
    result = run("attack", "finetune", path, "--sweep-epochs", "2", "--dataset", "imagefolder",
                 "--data-dir", folder, "--preset", "demo", "--batch-size", "16",
                 "--reference-accuracy", "90", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["settings"]["transfer"] is True and doc["reference_accuracy"] == 90
    row = doc["rows"][0]
    assert 0 <= row["accuracy"] <= 100 and row["delta"] == pytest.approx(row["accuracy"] - 90)


def test_finetune_bad_input(signed, tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    bad = [
        (["--sweep-epochs", "0"], "--sweep-epochs"),
        (["--sweep-epochs", "x"], "--sweep-epochs"),
        (["--sweep-epochs", "1", "--dataset", "imagefolder", "--data-dir", str(folder)], "channel"),
    ]
    for extra, needle in bad:
        result = run("attack", "finetune", signed["path"], *extra, *FAST)
        assert_one_line_error(result, contains=needle)
    rgb = save_ticket(_rgb_ticket(), tmp_path / "rgb.safetensors")
    trig = tmp_path / "t.npz"
    np.savez(trig, images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.arange(4))
    result = run("attack", "finetune", rgb, "--sweep-epochs", "1", "--dataset", "imagefolder",
                 "--data-dir", folder, "--trigger", trig, "--preset", "demo", "--batch-size",
                 "16")
    assert_one_line_error(result, contains="transfer")


def test_packed_finetune_sweep_equals_one_row_at_a_time(signed, tmp_path, float64):
    """Rows of different lengths share one packed network, each with its own schedule; every
    row ends where it would have ended alone. In float64 (the bounds are derived in
    test_packed.py: rounding-order differences near 1e-13 after a few epochs, bound 1e-8)."""
    from ticketctl.attacks import AttackRunner
    from ticketctl.attacks.finetune import finetune
    from ticketctl.data import load_dataset
    from ticketctl.prune import resolve_settings

    data = load_dataset("digits")
    cfg = resolve_settings("demo", train=TrainOverrides(batch_size=128)).train
    alone = AttackRunner(data, cfg, out_dir=tmp_path / "a", pack=1)
    packed = AttackRunner(data, cfg, out_dir=tmp_path / "b", pack=3)
    ra = finetune(alone, signed["ticket"], [1, 2, 3])
    rb = finetune(packed, signed["ticket"], [1, 2, 3])
    for a, b in zip(ra.rows, rb.rows, strict=True):
        assert b.accuracy == a.accuracy
    jobs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "b" / "jobs").glob("*.json")}
    assert sorted(j["result"].get("packed") for j in jobs.values()) == [3, 3, 3]
    for stem in jobs:
        x = _load(tmp_path / "a" / "jobs" / f"{stem}.safetensors")
        y = _load(tmp_path / "b" / "jobs" / f"{stem}.safetensors")
        for name, t in x.items():
            if t.is_floating_point():
                assert float((t - y[name]).abs().max()) <= 1e-8, (stem, name)
    # a rerun reuses the packed rows
    again = AttackRunner(data, cfg, out_dir=tmp_path / "b", pack=3)
    finetune(again, signed["ticket"], [1, 2, 3])
    assert again.jobs_run == 0
