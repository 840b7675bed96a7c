"""`attack nokey` and `attack fake1` on digits, and the runner's reuse of finished rows."""

import json

import pytest
import torch
from helpers import assert_one_line_error, run

from ticketctl.artifacts import save_ticket
from ticketctl.attacks import AttackRunner, fake1, forge_key, nokey
from ticketctl.attacks.keymask import forged_size
from ticketctl.data import load_dataset
from ticketctl.protect import split_ticket
from ticketctl.prune import SearchOverrides, find_ticket, resolve_settings
from ticketctl.train import TrainConfig
from ticketctl.train.config import TrainOverrides

FAST = ["--epochs", "3", "--preset", "demo"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("v1")
    settings = resolve_settings("demo", train=TrainOverrides(epochs=3),
                                search=SearchOverrides(rates=[0.5], max_rounds=2))
    ticket = find_ticket(settings, d / "run", device="cpu").ticket
    key, locked = split_ticket(ticket, "omp", 0.2)
    return {"dir": d, "ticket": ticket, "key": key, "locked": locked,
            "key_path": save_ticket(key, d / "key.safetensors"),
            "locked_path": save_ticket(locked, d / "locked.safetensors")}


def test_forged_key_adds_exactly_n_new_weights_outside_the_locked_mask(parts):
    locked = parts["locked"]
    n = forged_size(locked, 0.2)
    assert n == parts["key"].mask.num_kept  # same size as the owner's key
    forged = forge_key(locked, n, seed=3)
    added = 0
    for k in locked.mask:
        assert torch.equal(forged.mask[k] & locked.mask[k], locked.mask[k])
        new = forged.mask[k] & ~locked.mask[k]
        added += int(new.sum())
        assert torch.equal(forged.state[k][locked.mask[k]], locked.state[k][locked.mask[k]])
        assert bool((forged.state[k][new] != 0).all())
    assert added == n
    again = forge_key(locked, n, seed=3)
    assert again.mask == forged.mask


def test_runner_reuses_finished_rows(parts, tmp_path):
    data = load_dataset("digits")
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, nesterov=True, schedule="cosine")
    runner = AttackRunner(data, cfg, out_dir=tmp_path / "sweep")
    first = nokey(runner, parts["locked"], key=parts["key"])
    assert runner.jobs_run == 2  # the original (reference) and the locked ticket
    assert first.reference == "original ticket retrained"
    again = AttackRunner(data, cfg, out_dir=tmp_path / "sweep")
    second = nokey(again, parts["locked"], key=parts["key"])
    assert again.jobs_run == 0 and again.jobs_cached == 2
    assert second.rows[0].accuracy == first.rows[0].accuracy
    # a forged record is not believed: the job runs again and the true number comes back
    record_path = next(p for p in (tmp_path / "sweep" / "jobs").glob("*.json")
                       if json.loads(p.read_text())["result"]["accuracy"] ==
                       first.rows[0].accuracy)
    record = json.loads(record_path.read_text())
    record["result"]["accuracy"] = 12.5
    record_path.write_text(json.dumps(record))
    third = AttackRunner(data, cfg, out_dir=tmp_path / "sweep")
    assert nokey(third, parts["locked"], key=parts["key"]).rows[0].accuracy == \
        first.rows[0].accuracy
    assert third.jobs_run == 1 and third.jobs_cached == 1
    report = fake1(again, parts["locked"], [0.1, 0.2], key=parts["key"])
    assert [r.strength for r in report.rows] == [0.1, 0.2]
    assert again.jobs_run == 2  # only the two forged tickets were trained
    row = report.rows[0]
    assert row.delta == pytest.approx(row.accuracy - report.reference_accuracy)
    assert row.matches == (row.accuracy >= report.reference_accuracy - 1.0)


def test_attack_cli_json_and_csv(parts, tmp_path):
    result = run("attack", "nokey", parts["locked_path"], "--key-mask", parts["key_path"], *FAST,
                 "--json", "--csv", tmp_path / "rows.csv", "--out-dir", tmp_path / "s")
    doc = json.loads(result.stdout)
    assert doc["attack"] == "nokey"
    row = doc["rows"][0]
    # exit 1 exactly when the lock had no effect (retrained without the key it still matches)
    assert result.exit_code == (1 if row["matches"] else 0), result.stderr
    if row["matches"]:
        assert "the lock had no effect" in result.stderr
    for key in ("strength", "accuracy", "verified", "message", "p_value"):
        assert key in row
    assert row["strength"] == 0.2 and 0 <= row["accuracy"] <= 100
    assert (tmp_path / "rows.csv").read_text().startswith("attack,strength,accuracy")
    result = run("attack", "fake1", parts["locked_path"], "--key-ratios", "0.05,0.2", *FAST,
                 "--json", "--out-dir", tmp_path / "s", "--reference-accuracy", "102")
    assert result.exit_code == 0, result.stderr  # none can reach 101 points: no forgery works
    doc = json.loads(result.stdout)
    assert doc["reference_accuracy"] == 102 and len(doc["rows"]) == 2
    result = run("attack", "fake1", parts["locked_path"], "--key-ratios", "0.05", *FAST,
                 "--json", "--out-dir", tmp_path / "s", "--reference-accuracy", "1")
    assert result.exit_code == 1 and "the lock had no effect" in result.stderr
    assert json.loads(result.stdout)["rows"][0]["matches"] is True


def test_attack_bad_input(parts, tmp_path):
    assert_one_line_error(run("attack", "nokey", parts["key_path"], *FAST), 2,
                          "takes a locked file")
    assert_one_line_error(run("attack", "fake1", parts["locked_path"], "--key-ratios", "1.5",
                              *FAST), 2, "(0, 1)")


def test_packed_fake1_sweep_equals_one_at_a_time(parts, tmp_path, float64):
    """Packed and alone differ by rounding order only; in float64 that leaves the accuracies
    exactly equal (see test_packed.py for the bound)."""
    data = load_dataset("digits")
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, nesterov=True, schedule="cosine")
    alone = fake1(AttackRunner(data, cfg, pack=1), parts["locked"], [0.1, 0.2, 0.3])
    runner = AttackRunner(data, cfg, out_dir=tmp_path / "sweep", pack=2)
    packed = fake1(runner, parts["locked"], [0.1, 0.2, 0.3])
    for a, b in zip(alone.rows, packed.rows, strict=True):
        assert a.details == b.details
        assert b.accuracy == a.accuracy
    jobs = [json.loads(p.read_text()) for p in (tmp_path / "sweep" / "jobs").glob("*.json")]
    assert sorted(j["result"].get("packed", 1) for j in jobs) == [1, 2, 2]  # 2, then one
