"""`attack distill`: the student learns from the released model's outputs alone (shuffled
labels change nothing), learns something, carries every check in its row, is cached in the
sweep folder, and bad input is refused with one line."""

import json
from dataclasses import replace

import pytest
import torch
from helpers import assert_one_line_error, make_ticket, run

from ticketctl.artifacts import Ticket, save_ticket
from ticketctl.attacks.distill import distill, student_for
from ticketctl.data import load_dataset
from ticketctl.protect.receipt import save_receipt
from ticketctl.protect.signature import sign_ticket
from ticketctl.protect.trigger import generate, save_trigger_set
from ticketctl.train import Trainer
from ticketctl.train.config import TrainConfig
from ticketctl.train.engine import evaluate

CFG = TrainConfig(epochs=3, batch_size=64, lr=0.05, momentum=0.9, nesterov=True,
                  weight_decay=5e-4, schedule="cosine", seed=0)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", val_size=200)


@pytest.fixture(scope="module")
def teacher(digits):
    """A digits CNN ticket trained for a few epochs: a teacher worth copying."""
    ticket = make_ticket(seed=11, density_rate=0.5, width=16)
    model = ticket.build_model()
    trainer = Trainer(model, digits, replace(CFG, epochs=6), mask=ticket.mask)
    trainer.fit()
    return ticket.derive(state={k: v.detach().clone() for k, v in
                                trainer.best_state().items()})


def _distilled(teacher: Ticket, data):
    student = student_for(teacher, data, None, seed=0)
    return distill(teacher.build_model().eval(), student, data, CFG, temperature=4.0)


def test_labels_are_never_read(teacher, digits):
    """The same seed with the training labels shuffled gives the very same student, weight
    for weight: nothing in the training reads them."""
    first = _distilled(teacher, digits)
    g = torch.Generator().manual_seed(5)
    shuffled = replace(digits, train_y=digits.train_y[torch.randperm(len(digits.train_y),
                                                                     generator=g)])
    assert not torch.equal(shuffled.train_y, digits.train_y)
    second = _distilled(teacher, shuffled)
    assert first.state.keys() == second.state.keys()
    assert all(torch.equal(first.state[k], second.state[k]) for k in first.state)
    assert first.accuracy == second.accuracy


def test_the_student_learns_the_teacher(teacher, digits):
    """Chance is 10% on the ten digits; the teacher (six epochs) reaches over 90% and a
    student that copied nothing would stay near chance. Three epochs of distillation on its
    answers alone put the student above 60% and in agreement with the teacher on most test
    images (deterministic on CPU: fixed seeds, no threads racing)."""
    got = _distilled(teacher, digits)
    assert got.accuracy > 60
    assert got.agreement > 60
    # the weights returned are the ones the numbers describe (the chosen epoch's, not the
    # last epoch's): loaded into a fresh student they score the reported accuracy again
    again = student_for(teacher, digits, None, seed=1)
    again.load_state_dict(got.state)
    assert evaluate(again.eval(), digits.test_x, digits.test_y) == got.accuracy


@pytest.fixture(scope="module")
def signed(tmp_path_factory, teacher):
    d = tmp_path_factory.mktemp("distill")
    s, doc, _, _ = sign_ticket(teacher, "signature")
    trigger = save_trigger_set(generate(b"d" * 32, n=20, size=8, channels=1),
                               d / "trigger.npz")
    return {"d": d, "path": save_ticket(s, d / "s.safetensors"),
            "receipt": save_receipt(doc, d / "r.json"), "trigger": trigger}


def test_the_row_carries_every_check_and_is_cached(signed, tmp_path):
    args = ["attack", "distill", str(signed["path"]), "--epochs", "2", "--dataset", "digits",
            "--receipt", str(signed["receipt"]), "--trigger", str(signed["trigger"]),
            "--out-dir", str(tmp_path / "sweep"), "--json"]
    first = run(*args)
    assert first.exit_code in (0, 1), first.stderr
    doc = json.loads(first.stdout)
    row = doc["rows"][0]
    assert doc["attack"] == "distill" and row["strength"] == 2
    assert row["accuracy"] is not None and row["p_value"] is not None
    assert row["trigger_accuracy"] is not None and "trigger_p_value" in row["details"]
    assert "bit_match" in row["details"]  # the student has the signed layer: it is read
    assert row["details"]["temperature"] == 4.0 and row["details"]["agreement"] > 0
    again = run(*args)
    assert json.loads(again.stdout)["rows"] == doc["rows"]  # the cached job, not a new one
    assert len(list((tmp_path / "sweep" / "jobs").glob("*.json"))) == 1


def test_another_student_architecture(signed):
    result = run("attack", "distill", str(signed["path"]), "--epochs", "1", "--dataset",
                 "digits", "--student", "resnet20", "--receipt", str(signed["receipt"]),
                 "--json")
    assert result.exit_code in (0, 1), result.stderr
    row = json.loads(result.stdout)["rows"][0]
    assert row["details"]["student"] == "resnet20"
    assert row["details"]["signature"].startswith("not read")


@pytest.mark.parametrize("extra, says", [
    (["--temperature", "0"], "positive"),
    (["--temperature", "-2"], "positive"),
    (["--temperature", "inf"], "positive"),
    (["--student", "nonesuch"], "nonesuch"),
    (["--student", "vgg16"], "does not fit the data"),  # five poolings of an 8x8 image
    (["--dataset", "synthetic"], "released model does not fit the data"),  # 3x32x32 images
])
def test_bad_input_is_one_line(signed, extra, says):
    result = run("attack", "distill", str(signed["path"]), "--epochs", "1", "--dataset",
                 "digits", *extra)
    assert_one_line_error(result, 2, says)
