import json
import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch
from helpers import HANG_GUARD_S

from ticketctl.artifacts import load_ticket
from ticketctl.prune import (
    SearchConfig,
    SearchOverrides,
    SearchState,
    find_ticket,
    record_round,
    resolve_settings,
)
from ticketctl.prune.rundir import RunDir
from ticketctl.train.config import TrainOverrides


def test_extreme_search_control_flow_on_a_stub_sequence():
    cfg = SearchConfig(rates=[0.2, 0.1, 0.05], tolerance=1.0)
    state = SearchState()
    dense = 90.0
    # (expected rate, accuracy, accepted)
    script = [(0.2, 89.5, True), (0.2, 89.0, True), (0.2, 88.9, False),  # revert, next rate
              (0.1, 89.2, True), (0.1, 88.0, False),                      # revert, next rate
              (0.05, 89.9, True), (0.05, 88.99, False)]                   # smallest fails: stop
    for i, (rate, acc, accepted) in enumerate(script):
        assert not state.done
        assert cfg.rates[state.rate_index] == rate
        assert record_round(state, cfg, dense, acc) is accepted
        assert state.rounds[-1].round == i + 1
    assert state.done
    assert state.spec(cfg) == [2, 1, 1]
    with pytest.raises(RuntimeError):
        record_round(state, cfg, dense, 90.0)


def test_fixed_rate_imp_accepts_every_round_and_stops_after_n():
    cfg = SearchConfig(rates=[0.2], mode="fixed", rounds=3)
    state = SearchState()
    for acc in (10.0, 5.0, 1.0):  # accuracy does not matter in fixed-rate IMP
        assert record_round(state, cfg, 90.0, acc)
    assert state.done and state.spec(cfg) == [3]


def test_tolerance_boundary_is_inclusive():
    cfg = SearchConfig(rates=[0.2], tolerance=1.0)
    state = SearchState()
    assert record_round(state, cfg, 90.0, 89.0)
    assert not record_round(state, cfg, 90.0, 88.999)


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("imp") / "run"
    settings = resolve_settings("demo", train=TrainOverrides(epochs=3),
                                search=SearchOverrides(rates=[0.5, 0.2], rewind_epoch=1))
    result = find_ticket(settings, run_dir, device="cpu")
    return result, RunDir(run_dir)


def test_each_round_prunes_the_last_accepted_mask_to_the_exact_count(search):
    result, run = search
    assert len(result.rounds) >= 2
    parent = run.read_mask(0)
    for rd in result.rounds:
        mask = run.read_mask(rd.round)
        kept = parent.num_kept
        assert mask.num_kept == kept - round(rd.rate * kept) == rd.kept
        assert mask.is_subset_of(parent)
        assert rd.density == mask.num_kept / mask.num_total
        if rd.accepted:
            parent = mask
    assert result.ticket.mask == parent
    assert result.density == parent.density


def test_ticket_holds_the_rewind_weights_times_the_mask(search):
    result, run = search
    rewind, _ = run.read_tensors("rewind.safetensors")
    mask = result.ticket.mask
    for name, value in result.ticket.state.items():
        expected = rewind["model." + name]
        if name in mask:
            expected = expected * mask[name]
        assert torch.equal(value, expected), name
    assert result.ticket.rewind_epoch == 1
    # the trained model is sparse under the same mask
    for name in mask:
        assert bool((result.trained.state[name][~mask[name]] == 0).all())


def _find_cmd(run_dir, out, every="0"):
    return [sys.executable, "-m", "ticketctl", "find", "--preset", "demo", "--epochs", "4",
            "--rewind-epoch", "1", "--rates", "0.5,0.2", "--run-dir", str(run_dir), "--out",
            str(out), "--json", "--quiet", "--checkpoint-every", every]


# "0": the training in progress is checkpointed after every epoch, so the resumed run goes
# on from the killed epoch; "3600": only after each training, so the killed training is
# trained again from its start. Both must end with the same ticket and epoch log.
@pytest.mark.slow
@pytest.mark.parametrize("every", ["0", "3600"])
def test_killed_run_resumes_to_exactly_the_same_mask(tmp_path, every):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # identical arithmetic in every process
    ref_out, out = tmp_path / "ref.safetensors", tmp_path / "resumed.safetensors"
    subprocess.run(_find_cmd(tmp_path / "ref", ref_out), check=True, env=env,
                   capture_output=True, timeout=HANG_GUARD_S)

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_find_cmd(run_dir, out, every), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    epochs = run_dir / "epochs.jsonl"
    deadline = time.monotonic() + HANG_GUARD_S
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if epochs.exists():
            rows = [json.loads(x) for x in epochs.read_text().splitlines() if x.endswith("}")]
            mid = [r for r in rows if r["training"] == "round-2-trial-0" and r["epoch"] == 3]
            if mid:
                proc.send_signal(signal.SIGKILL)
                killed_at = mid[0]
                break
        time.sleep(0.005)
    proc.wait()
    assert killed_at is not None, "the run ended before it could be killed mid-round"
    assert not out.exists()

    checkpoint = run_dir / "checkpoint.safetensors"
    with safetensors.safe_open(str(checkpoint), "pt") as f:
        saved = json.loads(f.metadata()["json"])["key"]
    # every epoch: the killed training's own epoch was saved; else the last finished training
    assert (saved == "round-2-trial-0") == (every == "0"), saved
    resumed = subprocess.run(_find_cmd(run_dir, out, every) + ["--resume"], env=env,
                             capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_ticket(ref_out), load_ticket(out)
    assert a.mask == b.mask
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    # the metrics of the resumed run have no duplicate or missing epochs
    rows = [json.loads(x) for x in epochs.read_text().splitlines()]
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    ref_rows = [json.loads(x) for x in (tmp_path / "ref" / "epochs.jsonl").read_text()
                .splitlines()]
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in ref_rows]


def test_run_folder_masks_are_plain_safetensors(search):
    _, run = search
    tensors = safetensors.torch.load_file(str(run.file("masks/round-001.safetensors")))
    assert all(t.dtype == torch.uint8 for t in tensors.values())


class _Killed(Exception):
    """Stands for a kill right after a save (in-process, so the test can edit the files)."""


def _killed_after_checkpoint(monkeypatch, settings, run_dir, key, epoch):
    """Run a search until the checkpoint of training `key` at `epoch` is written, then stop
    it as a kill would; returns the run folder with its checkpoint's time set to 1000 s (far
    above what a CPU takes for the tiny trainings here, so sums that reach it can only come
    from the files)."""
    write = RunDir.write_checkpoint

    def write_then_die(self, ck):
        write(self, ck)
        if ck.key == key and ck.epoch == epoch:
            raise _Killed

    monkeypatch.setattr(RunDir, "write_checkpoint", write_then_die)
    with pytest.raises(_Killed):
        find_ticket(settings, run_dir, device="cpu", checkpoint_seconds=0)
    monkeypatch.setattr(RunDir, "write_checkpoint", write)
    run = RunDir(run_dir)
    ck = run.read_checkpoint(key)
    assert ck is not None and ck.epoch == epoch and 0 < ck.seconds < 500
    ck.seconds = 1000.0
    run.write_checkpoint(ck)
    return run


def _resumed(settings, run_dir):
    t0 = time.perf_counter()
    result = find_ticket(settings, run_dir, device="cpu", checkpoint_seconds=0, resume=True)
    return result, time.perf_counter() - t0


def test_a_resumed_round_reports_the_time_earlier_processes_spent_on_it(tmp_path,
                                                                         monkeypatch):
    """A round cut by a kill and resumed in a new process reports its whole wall time: what
    was spent before the kill (its finished trials, in pending.json; the checkpointed part
    of the trial in progress) plus the resumed part, not the resumed part alone."""
    settings = resolve_settings("demo", train=TrainOverrides(epochs=3),
                                search=SearchOverrides(rates=[0.5], rewind_epoch=1, trials=2,
                                                       max_rounds=1))
    run_dir = tmp_path / "run"
    run = _killed_after_checkpoint(monkeypatch, settings, run_dir, "round-1-trial-1", 2)
    # and the killed process spent 500 s on trial 0
    pending = json.loads(run.file("pending.json").read_text())
    assert pending["round"] == 1 and len(pending["trials"]) == 1 and pending["seconds"] > 0
    pending["seconds"] = 500.0
    run.file("pending.json").write_text(json.dumps(pending))

    result, resumed_wall = _resumed(settings, run_dir)
    (rd,) = result.rounds
    assert 1500.0 <= rd.seconds <= 1500.0 + resumed_wall
    trials = json.loads(run.file("pending.json").read_text())["trials"]
    assert 1000.0 <= trials[1]["seconds"] <= 1000.0 + resumed_wall
    assert trials[0]["seconds"] < 500  # finished before the kill: as it was recorded
    assert result.seconds <= resumed_wall  # this process's own time
    assert result.search_seconds == pytest.approx(result.dense.seconds + rd.seconds)
    assert json.loads(run.file("rounds.jsonl").read_text().splitlines()[0])["seconds"] \
        == rd.seconds


def test_a_resumed_dense_training_reports_its_whole_time_and_the_first_round_its_own(
        tmp_path, monkeypatch):
    """The dense training's time carried in its checkpoint counts for the dense training,
    not for the first round after it."""
    settings = resolve_settings("demo", train=TrainOverrides(epochs=3),
                                search=SearchOverrides(rates=[0.5], rewind_epoch=1,
                                                       max_rounds=1))
    run_dir = tmp_path / "run"
    run = _killed_after_checkpoint(monkeypatch, settings, run_dir, "dense", 2)
    result, resumed_wall = _resumed(settings, run_dir)
    assert 1000.0 <= result.dense.seconds <= 1000.0 + resumed_wall
    assert json.loads(run.file("dense.json").read_text())["seconds"] == result.dense.seconds
    (rd,) = result.rounds
    assert rd.seconds <= resumed_wall
