"""The CLI's option model: groups expanded into flags, closed sets checked by the CLI and
listed in --help, and usage errors on one line like every other error."""

import inspect
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import pytest
import torch
from helpers import assert_one_line_error, make_ticket, run

from ticketctl.artifacts import save_ticket
from ticketctl.cli.options import Output, Training, Without, command, group, nested, option
from ticketctl.data import load_dataset
from ticketctl.models import build_model
from ticketctl.train import TrainConfig, Trainer


@group()
class Inner:
    depth: int = option(default=1, help="How deep.")


@group(panel="Panel")
class Outer:
    name: Optional[str] = option(help="A name.")
    inner: Inner = nested(Inner)
    output: Output = nested(Output)


def test_groups_expand_into_their_flags_and_back():
    seen = {}

    @command
    def cmd(*, path: Path, outer: Outer, training: Training) -> None:
        seen.update(outer=outer, training=training, path=path)

    params = inspect.signature(cmd).parameters
    assert {"path", "name", "depth", "json_out", "quiet", "debug", "force", "epochs",
            "preset", "no_compile"} <= set(params)
    assert "outer" not in params and "training" not in params
    values = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    cmd(path=Path("x"), **{**values, "name": "a", "depth": 3, "epochs": 5})
    assert seen["outer"] == Outer(name="a", inner=Inner(depth=3), output=Output())
    assert seen["training"].overrides().epochs == 5 and seen["path"] == Path("x")


def test_without_drops_flags_at_any_depth_and_duplicates_are_refused():
    def cut(*, outer: Annotated[Outer, Without("depth", "json_out")], training: Training
            ) -> None: ...

    params = set(inspect.signature(command(cut)).parameters)
    assert "depth" not in params and "json_out" not in params
    assert {"name", "quiet", "epochs"} <= params

    def twice(*, a: Outer, b: Outer) -> None: ...

    with pytest.raises(TypeError, match="declared twice"):
        command(twice)


@pytest.mark.parametrize("args, choices", [
    (["attack", "prune", "M", "--method", "magnitude"], "'omp', 'random'"),
    (["find", "--out", "t", "--scope", "row"], "'global', 'layer'"),
    (["find", "--out", "t", "--device", "tpu"], "'auto', 'cpu', 'cuda'"),
    (["retrain", "T", "--schedule", "linear"], "'multistep', 'cosine'"),
    (["convert", "F", "--out", "o", "--weights", "best"], "'auto', 'rewind', 'trained'"),
    (["convert", "F", "--out", "o", "--to", "onnx"], "'torch-prune'"),
])
def test_closed_sets_are_checked_by_the_cli_with_one_line(args, choices, tmp_path):
    result = run(*args)
    assert_one_line_error(result, 2, choices)
    assert "--help" in result.stderr  # it says where to look
    assert not list(tmp_path.iterdir())  # nothing was written


def test_help_lists_the_choices():
    text = " ".join(run("attack", "prune", "--help").stdout.split())
    assert "omp|random" in text and "auto|cpu|cuda" in text
    text = " ".join(run("find", "--help").stdout.split())
    assert "demo|fast|paper" in text and "global|layer" in text and "multistep|cosine" in text


def test_usage_errors_are_one_line(tmp_path):
    path = save_ticket(make_ticket(), tmp_path / "t.safetensors")
    assert_one_line_error(run("split", path, "--score", "omp"), 2, "Missing option")
    assert_one_line_error(run("inspect", path, "--no-such-flag"), 2, "No such option")
    assert_one_line_error(run("attack", "prune", path, "--seed", "many"), 2,
                          "Invalid value for '--seed'")


def test_common_flags_work_after_every_subcommand(tmp_path):
    path = save_ticket(make_ticket(), tmp_path / "t.safetensors")
    for args in (["inspect", path], ["keygen", "--out", tmp_path / "owner"],
                 ["data", "digits"]):
        result = run(*args, "--json", "--quiet", "--force")
        assert result.exit_code == 0, result.stderr
        assert result.stdout.startswith("{") and result.stderr == ""


def test_restart_is_a_fresh_training_in_the_same_network():
    """One call restores weights, mask and momentum and reseeds: the next training matches a
    newly built trainer's bit for bit (CPU, same arithmetic in the same order)."""
    data = load_dataset("digits")
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=4)
    start = build_model("digits_cnn", seed=1).state_dict()
    fresh_model = build_model("digits_cnn", seed=1)
    fresh = Trainer(fresh_model, data, cfg)
    fresh.fit()
    reused = Trainer(build_model("digits_cnn", seed=2), data, replace(cfg, seed=9))
    reused.fit()  # move weights, momentum and the generators away first
    reused.restart(start, seeds=4)
    reused.fit()
    a, b = fresh.model_state(), reused.model_state()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_with_json_every_failure_is_one_json_document_too(tmp_path):
    import json

    path = save_ticket(make_ticket(), tmp_path / "t.safetensors")
    cases = [(["inspect", tmp_path / "missing", "--json"], 2, "bad input"),
             (["split", path, "--score", "bogus", "--json"], 2, "usage"),
             (["keygen", "--out", tmp_path / "no" / "k", "--json"], 2, "bad input")]
    for args, code, kind in cases:
        result = run(*args)
        assert result.exit_code == code, result.stderr
        doc = json.loads(result.stdout)  # exactly one document
        assert doc["error"] == kind and doc["exit_code"] == code and doc["message"]
        assert result.stderr.startswith("error:")
    # a failed check that printed its result prints no second document
    result = run("verify", path, "--json")
    assert result.exit_code == 1
    assert "verified" in json.loads(result.stdout) and "error" not in json.loads(result.stdout)
