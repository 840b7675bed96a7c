"""`ticketctl find` and `ticketctl retrain` through the CLI, on the embedded digits (CPU).

Every `find` here trains for 2 or 3 epochs with few rounds, so each invocation takes about a
second; the run folder and every output always live inside tmp_path."""

import json
import statistics
import subprocess
import sys

import pytest
import torch
from helpers import assert_one_line_error, run

from ticketctl.artifacts import load_ticket
from ticketctl.cli import find as find_cli
from ticketctl.prune import resolve_settings
from ticketctl.train.config import TrainOverrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def find(tmp_path, *extra, out="ticket.safetensors", run_dir="run"):
    """`ticketctl find` with its outputs and run folder inside tmp_path."""
    return run("find", "--out", tmp_path / out, "--run-dir", tmp_path / run_dir, *extra)


def find_json(tmp_path, *extra, **kw):
    result = find(tmp_path, "--json", *extra, **kw)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def pruned_weights_are_zero(ticket) -> bool:
    return all(bool((ticket.state[name][~m] == 0).all()) for name, m in ticket.mask.items())


# ---- bad input: exit 2, one line on stderr, nothing on stdout, no run folder ----------------

BAD_INPUT = {
    "unknown arch": (["--arch", "resnet21"], "unknown architecture 'resnet21'"),
    # Off digits the default preset is paper (rewind to epoch 3): rewind earlier for 2 epochs.
    "unknown dataset": (["--dataset", "mnist", "--rewind-epoch", "1"], "unknown dataset 'mnist'"),
    "missing data folder": (["--dataset", "cifar10", "--data-dir", "{tmp}/nowhere",
                             "--rewind-epoch", "1"], "does not exist"),
    "rate above 1": (["--rates", "0.2,1.5"], "must be in (0, 1)"),
    "rate 0": (["--rates", "0"], "must be in (0, 1)"),
    "rates increasing": (["--rates", "0.1,0.2"], "strictly decreasing"),
    "rates repeated": (["--rates", "0.2,0.2"], "strictly decreasing"),
    "rates not numbers": (["--rates", "0.2,lots"], "comma-separated numbers"),
    "negative tolerance": (["--tolerance", "-1"], "--tolerance"),
    "rewind beyond epochs": (["--epochs", "3", "--rewind-epoch", "5"], "--rewind-epoch 5"),
    "rewind at last epoch": (["--epochs", "3", "--rewind-epoch", "3"], "--rewind-epoch 3"),
    "zero trials": (["--trials", "0"], "--trials"),
    "rate without rounds": (["--rate", "0.3"], "--rounds"),
    "zero rounds": (["--rounds", "0", "--rate", "0.3"], "--rounds"),
    "out in missing folder": (["--out", "{tmp}/no/such/folder/t.safetensors"], "does not exist"),
    "plot in missing folder": (["--plot", "{tmp}/no/p.png"], "does not exist"),
}


@pytest.mark.parametrize("case", [k for k in BAD_INPUT if k != "unknown arch"])
def test_bad_input_is_exit_2_with_one_line_before_any_training(tmp_path, case):
    args, message = BAD_INPUT[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert_one_line_error(find(tmp_path, "--epochs", "2", *args), 2, message)
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "ticket.safetensors").exists()


def test_unknown_arch_is_exit_2_with_one_line(tmp_path):
    args, message = BAD_INPUT["unknown arch"]
    assert_one_line_error(find(tmp_path, "--epochs", "2", *args), 2, message)


def test_unknown_arch_leaves_no_run_folder(tmp_path):
    """A typo in --arch must not leave a run folder behind: rerunning the corrected command
    with the same --run-dir would then refuse ("already exists", or a settings mismatch on
    --resume)."""
    assert find(tmp_path, "--epochs", "2", "--arch", "resnet21").exit_code == 2
    assert not (tmp_path / "run").exists()


def test_data_folder_in_the_wrong_layout(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = find(tmp_path, "--dataset", "cifar10", "--data-dir", empty, "--epochs", "2",
                  "--rewind-epoch", "1")
    assert_one_line_error(result, 2, "data_batch_1")
    assert not (tmp_path / "run").exists()


def test_device_cuda_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = find(tmp_path, "--epochs", "2", "--device", "cuda")
    assert_one_line_error(result, 2, "CUDA")
    assert not (tmp_path / "run").exists()


def test_existing_out_without_force_is_refused_before_training(tmp_path):
    out = tmp_path / "ticket.safetensors"
    out.write_bytes(b"keep me")
    assert_one_line_error(find(tmp_path, "--epochs", "2"), 2, "pass --force")
    assert out.read_bytes() == b"keep me"
    assert not (tmp_path / "run").exists()
    trained = tmp_path / "trained.safetensors"
    trained.write_bytes(b"keep me too")
    result = find(tmp_path, "--epochs", "2", "--trained", trained, out="other.safetensors")
    assert_one_line_error(result, 2, "pass --force")
    assert trained.read_bytes() == b"keep me too"
    assert not (tmp_path / "run").exists() and not (tmp_path / "other.safetensors").exists()


def test_existing_run_folder_needs_resume_or_force(tmp_path):
    dense_only = ("--epochs", "2", "--max-rounds", "0")
    assert find(tmp_path, *dense_only).exit_code == 0
    config = (tmp_path / "run" / "config.json").read_text()
    result = find(tmp_path, *dense_only, out="again.safetensors")
    assert_one_line_error(result, 2, "already exists")
    assert "--resume" in result.stderr and "--force" in result.stderr
    assert (tmp_path / "run" / "config.json").read_text() == config
    assert not (tmp_path / "again.safetensors").exists()
    # A folder that is not a run is never deleted, even with --force.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    result = find(tmp_path, *dense_only, "--force", out="again.safetensors", run_dir="other")
    assert_one_line_error(result, 2, "not a ticketctl run")
    assert (tmp_path / "other" / "precious.txt").read_text() == "x"


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path):
    dense_only = ("--epochs", "2", "--max-rounds", "0")
    assert find(tmp_path, *dense_only).exit_code == 0
    def files():
        return {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()
                if p.is_file() and p.name != "run.lock"}

    before = files()
    # Another process reopens the folder (as `find --resume` does) and holds it.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_RUN, str(tmp_path / "run")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        for extra in (("--resume",), ("--force",)):
            result = find(tmp_path, *dense_only, *extra, out="again.safetensors")
            assert_one_line_error(result, 2, "in use by process")
            assert str(holder.pid) in result.stderr
        assert files() == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # Once the holder is gone, the same folder resumes.
    assert find(tmp_path, *dense_only, "--resume", out="again.safetensors").exit_code == 0


HOLD_RUN = """
import json, sys
from pathlib import Path
from ticketctl.prune.rundir import CONFIG, RunDir
path = Path(sys.argv[1])
settings = json.loads((path / CONFIG).read_text())["settings"]
RunDir.open(path, settings, resume=True, force=False)
print("holding", flush=True)
sys.stdin.read()
"""


def test_resume_of_a_missing_run_folder(tmp_path):
    result = find(tmp_path, "--epochs", "2", "--resume")
    assert_one_line_error(result, 2, "nothing to resume")
    assert not (tmp_path / "run").exists()


def test_a_negative_checkpoint_interval_is_refused_before_any_work(tmp_path):
    result = find(tmp_path, "--epochs", "2", "--checkpoint-every", "-1")
    assert_one_line_error(result, 2, "--checkpoint-every must be 0 or more seconds")
    assert not (tmp_path / "run").exists()


def test_resume_with_different_settings_names_the_difference(tmp_path):
    assert find(tmp_path, "--epochs", "2", "--max-rounds", "0").exit_code == 0
    result = find(tmp_path, "--epochs", "3", "--max-rounds", "0", "--resume",
                  out="again.safetensors")
    assert_one_line_error(result, 2, "different settings")
    assert "train.epochs" in result.stderr
    assert not (tmp_path / "again.safetensors").exists()
    # The same settings resume the finished run and give the same answer.
    first = json.loads((tmp_path / "run" / "result.json").read_text())
    doc = find_json(tmp_path, "--epochs", "2", "--max-rounds", "0", "--resume",
                    out="again.safetensors")
    assert doc["dense_accuracy"] == first["dense_accuracy"]
    # How the step is compiled may change (a fused compilation that fails goes on without);
    # a recipe setting beside it is still refused, and named alone.
    doc = find_json(tmp_path, "--epochs", "2", "--max-rounds", "0", "--resume",
                    "--no-fuse-step", out="again2.safetensors")
    assert doc["dense_accuracy"] == first["dense_accuracy"]
    doc = find_json(tmp_path, "--epochs", "2", "--max-rounds", "0", "--resume",
                    "--combo-kernels", out="again3.safetensors")
    assert doc["dense_accuracy"] == first["dense_accuracy"]
    result = find(tmp_path, "--epochs", "3", "--max-rounds", "0", "--resume", "--no-fuse-step",
                  "--combo-kernels", out="third.safetensors")
    assert_one_line_error(result, 2, "different settings")
    assert "train.epochs" in result.stderr and "fuse_step" not in result.stderr
    assert "combo_kernels" not in result.stderr


def test_the_default_run_folder_is_the_same_whatever_a_resume_may_change():
    """Without --run-dir the folder is named by the settings' hash: --no-fuse-step and
    --combo-kernels, which a resume may change, leave the name as it is; a recipe setting
    does not."""
    from ticketctl.cli.options import Training
    from ticketctl.prune import resolve_settings
    from ticketctl.prune.imp import default_run_dir

    def folder(**kw):
        return default_run_dir(resolve_settings("demo", train=Training(**kw).overrides()))

    plain = folder()
    assert folder(combo_kernels=True) == plain
    assert folder(no_fuse_step=True, combo_kernels=True) == plain
    assert folder(epochs=3) != plain


# ---- the extreme-ticket search end to end ------------------------------------------------------


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One extreme search on digits: --json, --trained and --plot."""
    tmp = tmp_path_factory.mktemp("find")
    doc = find_json(tmp, "--epochs", "2", "--rewind-epoch", "1", "--rates", "0.5,0.2",
                    "--max-rounds", "4", "--trained", tmp / "trained.safetensors",
                    "--plot", tmp / "search.png")
    return tmp, doc


def test_find_json_is_one_document_with_the_results(searched):
    tmp, doc = searched
    for key in ("dense_accuracy", "ticket_accuracy", "density", "rounds", "spec", "ticket",
                "trained"):
        assert key in doc
    assert doc["ticket"] == str(tmp / "ticket.safetensors")
    assert doc["trained"] == str(tmp / "trained.safetensors")
    assert doc["dense_accuracy"] > 50  # 2 epochs: 92.6-97.7% over seeds 0-19
    assert len(doc["rounds"]) in range(1, 5)
    for i, r in enumerate(doc["rounds"], 1):
        assert {"rate", "density", "accuracy", "accepted"} <= set(r)
        assert r["round"] == i and r["rate"] in (0.5, 0.2)
        assert 0 < r["density"] < 1
    accepted = [r for r in doc["rounds"] if r["accepted"]]
    assert set(doc["spec"]) == {"0.5", "0.2"}
    assert sum(doc["spec"].values()) == len(accepted)
    assert doc["spec"]["0.5"] == sum(1 for r in accepted if r["rate"] == 0.5)
    if accepted:
        assert doc["density"] == accepted[-1]["density"]
        assert doc["ticket_accuracy"] == accepted[-1]["accuracy"]
    else:
        assert doc["density"] == 1.0 and doc["ticket_accuracy"] == doc["dense_accuracy"]


def test_find_writes_ticket_trained_model_and_plot(searched):
    tmp, doc = searched
    ticket = load_ticket(tmp / "ticket.safetensors")
    trained = load_ticket(tmp / "trained.safetensors")
    assert ticket.kind == "ticket" and trained.kind == "trained"
    assert ticket.mask == trained.mask
    assert ticket.rewind_epoch == 1 and trained.rewind_epoch == 1
    assert ticket.density == pytest.approx(doc["density"])
    assert pruned_weights_are_zero(ticket) and pruned_weights_are_zero(trained)
    assert ticket.extra["spec"] == doc["spec"]
    assert (tmp / "search.png").read_bytes()[:8] == PNG_MAGIC


def test_find_run_folder_holds_config_metrics_and_every_mask(searched):
    tmp, doc = searched
    folder = tmp / "run"
    for name in ("config.json", "epochs.jsonl", "epochs.csv", "rounds.csv"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["settings"]["train"]["epochs"] == 2
    assert config["settings"]["search"]["rates"] == [0.5, 0.2]
    n = len(doc["rounds"])
    masks = sorted(p.name for p in (folder / "masks").iterdir())
    assert masks == [f"round-{i:03d}.safetensors" for i in range(n + 1)]
    # Dense: epochs 1-2; every round retrains epochs 2..2 from the rewind point (epoch 1).
    epochs = [json.loads(line) for line in (folder / "epochs.jsonl").read_text().splitlines()]
    assert [e["seq"] for e in epochs] == list(range(1, 2 + n + 1))
    assert len((folder / "rounds.csv").read_text().strip().splitlines()) == n + 1
    assert len((folder / "epochs.csv").read_text().strip().splitlines()) == len(epochs) + 1


def test_inspect_reads_every_file_of_the_run_folder(searched):
    """The masks, rewind point and weights a real search left are inspectable, each saying
    what it is; a pattern takes every round's mask at once."""
    tmp, doc = searched
    folder = tmp / "run"
    masks = run("inspect", str(folder / "masks" / "*.safetensors"), "--json")
    assert masks.exit_code == 0, masks.stderr
    masks = json.loads(masks.stdout)
    n = len(doc["rounds"])
    assert len(masks) == n + 1 and all(m["kind"] == "run-mask" for m in masks)
    assert [m["density"] for m in masks] == [1.0] + [r["density"] for r in doc["rounds"]]
    for m, r in zip(masks[1:], doc["rounds"], strict=True):
        assert f"round {r['round']}" in m["what"]
    result = run("inspect", folder / "rewind.safetensors", folder / "best-current.safetensors",
                 "--json")
    assert result.exit_code == 0, result.stderr
    rewind, best = json.loads(result.stdout)
    assert rewind["kind"] == "run-rewind" and "after epoch 1" in rewind["what"]
    assert best["kind"] == "run-best" and best["arch"] == "digits_cnn"
    trained = load_ticket(tmp / "trained.safetensors")  # find --trained: the best weights
    nonzero = {r["name"]: r["kept"] for r in best["layers"]}
    for name in trained.mask:
        assert nonzero[name] == int(torch.count_nonzero(trained.state[name]))


def test_retrain_the_found_ticket(searched):
    tmp, doc = searched
    out = tmp / "retrained.safetensors"
    result = run("retrain", tmp / "ticket.safetensors", "--epochs", "3", "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    got = json.loads(result.stdout)
    # 3 epochs: 96.0-98.7% over seeds 0-19
    assert isinstance(got["test_accuracy"], float) and got["test_accuracy"] > 50
    assert got["trigger_accuracy"] is None
    assert got["out"] == str(out)
    retrained = load_ticket(out)
    ticket = load_ticket(tmp / "ticket.safetensors")
    assert retrained.kind == "trained"
    assert retrained.mask == ticket.mask
    assert pruned_weights_are_zero(retrained)
    assert retrained.extra["retrained_from"] == ticket.tensors_sha256()
    # Refuses to overwrite its output, before training.
    assert_one_line_error(run("retrain", tmp / "ticket.safetensors", "--epochs", "3", "--out",
                              out), 2, "pass --force")


# ---- fixed-rate IMP, dense only, trials, presets -------------------------------------------------


def test_fixed_rate_imp_prunes_exact_counts(tmp_path, monkeypatch):
    titles = []
    real = find_cli.plot_search

    def plot(*args, **kw):
        titles.append(kw["title"])
        return real(*args, **kw)

    monkeypatch.setattr(find_cli, "plot_search", plot)
    doc = find_json(tmp_path, "--epochs", "2", "--rounds", "3", "--rate", "0.3",
                    "--plot", tmp_path / "fixed.png")
    assert titles == ["digits_cnn on digits: fixed-rate IMP, 3 rounds at rate 0.3"]
    assert (tmp_path / "fixed.png").read_bytes()[:8] == PNG_MAGIC
    assert len(doc["rounds"]) == 3
    assert all(r["accepted"] and r["rate"] == 0.3 for r in doc["rounds"])
    assert doc["spec"] == {"0.3": 3}
    ticket = load_ticket(tmp_path / "ticket.safetensors")
    total = ticket.mask.num_total
    kept = total
    for r in doc["rounds"]:
        kept -= round(0.3 * kept)
        assert r["kept"] == kept
        assert r["density"] == kept / total
    assert ticket.mask.num_kept == kept
    assert doc["density"] == kept / total
    assert ticket.extra["search"] == "fixed"


def test_max_rounds_0_trains_the_dense_model_only(tmp_path):
    doc = find_json(tmp_path, "--epochs", "2", "--max-rounds", "0",
                    "--trained", tmp_path / "dense.safetensors")
    assert doc["rounds"] == []
    assert doc["density"] == 1.0
    assert doc["ticket_accuracy"] == doc["dense_accuracy"]
    ticket = load_ticket(tmp_path / "ticket.safetensors")
    assert ticket.density == 1.0
    assert load_ticket(tmp_path / "dense.safetensors").kind == "trained"
    assert [p.name for p in (tmp_path / "run" / "masks").iterdir()] == ["round-000.safetensors"]


def test_trials_accept_on_the_mean(tmp_path):
    doc = find_json(tmp_path, "--epochs", "2", "--rounds", "1", "--rate", "0.5",
                    "--trials", "2")
    (r,) = doc["rounds"]
    assert len(r["accuracies"]) == 2
    assert r["accuracy"] == pytest.approx(statistics.fmean(r["accuracies"]))


def test_explicit_options_override_the_preset(tmp_path):
    assert find(tmp_path, "--preset", "demo", "--epochs", "2", "--max-rounds", "0").exit_code == 0
    settings = json.loads((tmp_path / "run" / "config.json").read_text())["settings"]
    assert settings["train"]["epochs"] == 2
    assert settings["train"]["batch_size"] == 64
    assert settings["train"]["lr"] == 0.05
    assert settings["train"]["schedule"] == "cosine"
    assert settings["search"]["rewind_epoch"] == 1
    assert settings["search"]["max_rounds"] == 0
    assert settings["arch"] == "digits_cnn" and settings["dataset"] == "digits"


def test_unknown_preset(tmp_path):
    # a closed set: the CLI refuses it, names the choices, and no run folder is made
    assert_one_line_error(find(tmp_path, "--preset", "turbo"), 2,
                          "'turbo' is not one of 'demo', 'fast', 'paper'")
    assert not (tmp_path / "run").exists()


def test_resolve_settings_paper_and_fast():
    r50 = resolve_settings("paper", arch="resnet50", dataset="cifar10")
    assert r50.train.epochs == 182
    assert r50.train.milestones == [91, 136]
    assert r50.train.schedule == "multistep"
    assert r50.train.weight_decay == 5e-4
    assert r50.search.rewind_epoch == 3
    r20 = resolve_settings("paper", arch="resnet20", dataset="cifar10")
    assert r20.train.weight_decay == 1e-4 and r20.train.epochs == 182
    explicit = resolve_settings("paper", arch="resnet50", dataset="cifar10",
                                train=TrainOverrides(weight_decay=1e-3))
    assert explicit.train.weight_decay == 1e-3
    fast = resolve_settings("fast", arch="resnet20", dataset="cifar10")
    assert fast.train.batch_size == 512
    assert fast.train.schedule == "cosine"
    assert fast.train.nesterov is True
    assert resolve_settings(None, dataset="cifar10").train.epochs == 182
    assert resolve_settings(None, dataset="digits").train.batch_size == 64


def _accuracy_of(path) -> float:
    """The test accuracy of a saved model, evaluated afresh on the data it records."""
    from ticketctl.data import load_recorded_dataset
    from ticketctl.train import evaluate

    t = load_ticket(path)
    data = load_recorded_dataset(t.dataset)
    return evaluate(t.build_model().eval(), data.test_x, data.test_y)


def test_saved_models_are_the_ones_whose_numbers_are_reported(searched, tmp_path):
    """The reported accuracy is the best-validation epoch's; the file saved is that epoch's
    model, so evaluating it gives the same number (the same arithmetic on the same CPU)."""
    tmp, doc = searched
    trained = load_ticket(tmp / "trained.safetensors")
    assert _accuracy_of(tmp / "trained.safetensors") == trained.extra["test_accuracy"]
    out = tmp_path / "r.safetensors"
    result = run("retrain", tmp / "ticket.safetensors", "--epochs", "4", "--out", out,
                 "--json")
    assert result.exit_code == 0, result.stderr
    got = json.loads(result.stdout)
    assert _accuracy_of(out) == got["test_accuracy"] == load_ticket(out).extra["test_accuracy"]


def test_a_preset_follows_a_shorter_schedule_and_conflicts_come_together(tmp_path):
    """--preset fast --epochs 1 used to fail on the preset's warm-up, then on its rewind
    epoch; what depends on the schedule's length now follows it. What the user set and cannot
    work is refused, every problem in one line."""
    fast = resolve_settings("fast", arch="resnet20", dataset="cifar10",
                            train=TrainOverrides(epochs=1))
    fast.validate()
    assert fast.train.warmup_epochs == 0 and fast.search.rewind_epoch == 0
    doc = find_json(tmp_path, "--preset", "demo", "--epochs", "1", "--max-rounds", "0")
    assert doc["rounds"] == []
    result = find(tmp_path, "--epochs", "2", "--rewind-epoch", "5", "--warmup-epochs", "3",
                  "--tolerance", "-1", run_dir="other")
    assert_one_line_error(result, 2, "--warmup-epochs")
    for flag in ("--rewind-epoch 5", "--tolerance"):
        assert flag in result.stderr


def test_resuming_a_finished_run_says_so(tmp_path):
    assert find(tmp_path, "--epochs", "2", "--max-rounds", "0").exit_code == 0
    result = find(tmp_path, "--epochs", "2", "--max-rounds", "0", "--resume",
                  out="again.safetensors")
    assert result.exit_code == 0 and "had finished" in result.stderr
