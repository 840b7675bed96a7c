"""`ticketctl inspect` in pipelines: the report on stdout, several files and patterns, stdin,
run-folder files and trigger sets, and metadata printed readably and literally."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, make_ticket, run, write_raw

from ticketctl import describe
from ticketctl.artifacts import save_ticket
from ticketctl.protect.trigger import generate, save_trigger_set
from ticketctl.prune.rundir import (
    BEST_CURRENT,
    CHECKPOINT,
    REWIND,
    TRAINED_CURRENT,
    Checkpoint,
    RunDir,
    mask_file,
)


def _json(result):
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def two(tmp_path):
    """Two tickets in two folders, runs/a and runs/b."""
    paths = []
    for i, name in enumerate("ab"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        paths.append(save_ticket(make_ticket(seed=i, density_rate=0.3 + 0.2 * i),
                                 tmp_path / "runs" / name / "t.safetensors"))
    return paths


# ---- several files and patterns ------------------------------------------------------------------


def test_several_files_and_a_pattern_give_one_json_list_in_order(tmp_path, two):
    a, b = two
    # The pattern is passed as written (no shell here): inspect expands it, and a file named
    # twice is listed once.
    doc = _json(run("inspect", b, str(tmp_path / "runs" / "*" / "t.safetensors"), "--json"))
    assert isinstance(doc, list)
    assert [d["file"] for d in doc] == [str(b), str(a)]
    assert doc[0]["density"] == pytest.approx(make_ticket(seed=1, density_rate=0.5).density)
    assert doc[1]["density"] == pytest.approx(make_ticket(seed=0, density_rate=0.3).density)
    assert doc[0]["density"] != doc[1]["density"]
    recursive = _json(run("inspect", str(tmp_path / "**" / "*.safetensors"), "--json"))
    assert [d["file"] for d in recursive] == [str(a), str(b)]


def test_one_file_keeps_the_single_object_shape(tmp_path, two):
    doc = _json(run("inspect", str(tmp_path / "runs" / "a" / "*.safetensors"), "--json"))
    assert isinstance(doc, dict) and doc["file"] == str(two[0]) and doc["kind"] == "ticket"


def test_several_files_as_text_all_on_stdout(tmp_path, two):
    result = run("inspect", *two)
    assert result.exit_code == 0 and result.stderr == ""
    for path in two:
        assert str(path) in " ".join(result.stdout.split())
    assert result.stdout.count("conv2.weight") == 2


def test_a_pattern_matching_nothing_is_one_line(tmp_path, two):
    assert_one_line_error(run("inspect", two[0], str(tmp_path / "nothing-*.safetensors")), 2,
                          "no file matches")


def test_a_name_with_pattern_characters_that_exists_is_taken_as_written(tmp_path):
    path = save_ticket(make_ticket(), tmp_path / "t[1].safetensors")
    assert _json(run("inspect", path, "--json"))["file"] == str(path)


def test_a_bad_file_among_several_is_reported_and_the_rest_still_shown(tmp_path, two):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a ticket at all")
    result = run("inspect", two[0], bad, two[1], "--json")
    assert result.exit_code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0]
    doc = json.loads(result.stdout)
    assert [d["file"] for d in doc] == [str(two[0]), str(bad), str(two[1])]
    assert doc[1]["exit_code"] == 2 and doc[1]["error"] == "bad input"
    assert doc[0]["kind"] == doc[2]["kind"] == "ticket"


def test_an_altered_file_among_several_exits_1(tmp_path, two, ticket):
    tensors = ticket.tensors()
    tensors["fc.bias"] = tensors["fc.bias"] + 1
    altered = write_raw(tmp_path / "altered.safetensors", tensors, ticket.metadata())
    result = run("inspect", two[0], altered)
    assert result.exit_code == 1
    assert "altered after it was written" in result.stderr
    assert "conv2.weight" in result.stdout  # the good file was shown


# ---- stdin ---------------------------------------------------------------------------------------


def test_dash_reads_the_file_from_stdin(tmp_path, ticket):
    data = save_ticket(ticket, tmp_path / "t.safetensors").read_bytes()
    doc = _json(run("inspect", "-", "--json", input=data))
    assert doc["file"] == "-" and doc["kind"] == "ticket"
    assert doc["hashes"]["masks_sha256"] == ticket.mask.sha256()
    text = run("inspect", "-", input=data)
    assert text.exit_code == 0 and "conv2.weight" in text.stdout


def test_stdin_is_bounded_and_errors_name_the_pipe(tmp_path, ticket, monkeypatch):
    data = save_ticket(ticket, tmp_path / "t.safetensors").read_bytes()
    monkeypatch.setattr(describe, "MAX_STDIN_BYTES", len(data) - 1)
    assert_one_line_error(run("inspect", "-", input=data), 2, "more than")
    monkeypatch.setattr(describe, "MAX_STDIN_BYTES", len(data))
    assert run("inspect", "-", input=data).exit_code == 0
    assert_one_line_error(run("inspect", "-", input=b""), 2, "stdin is empty")
    result = run("inspect", "-", input=b"garbage!garbage!garbage!")
    assert_one_line_error(result, 2, "-")
    assert "ticketctl-stdin" not in result.stderr  # not the temporary file's name
    assert_one_line_error(run("inspect", "-", "-", input=data), 2, "only once")


# ---- run-folder files ----------------------------------------------------------------------------


@pytest.fixture
def run_folder(tmp_path, ticket):
    """A run folder's tensor files, written by RunDir as a search writes them."""
    folder = tmp_path / "run"
    rd = RunDir.open(folder, {"arch": "digits_cnn", "dataset": "digits",
                              "search": {"rewind_epoch": 2}}, resume=False, force=False)
    try:
        full = type(ticket.mask)({k: torch.ones_like(v) for k, v in ticket.mask.items()})
        rd.write_mask(0, full, {"round": 0, "rate": None})
        rd.write_mask(3, ticket.mask, {"round": 3, "rate": 0.1})
        opt = {k + ".momentum_buffer": torch.zeros_like(v) for k, v in ticket.state.items()
               if v.is_floating_point()}
        rd.write_rewind(ticket.state, opt)
        rd.write_tensors(TRAINED_CURRENT, ticket.state)
        rd.write_tensors(BEST_CURRENT, ticket.state)
        rd.write_checkpoint(Checkpoint("round-3-trial-0", 4, 17, [], ticket.state, opt,
                                       {"rng.cpu": torch.zeros(4, dtype=torch.uint8)}))
    finally:
        rd.unlock()
    return folder


def test_run_folder_files_say_what_they_are(run_folder, ticket):
    names = [mask_file(0), mask_file(3), REWIND, CHECKPOINT, TRAINED_CURRENT, BEST_CURRENT]
    doc = _json(run("inspect", *[run_folder / n for n in names], "--json"))
    by = {Path(d["file"]).relative_to(run_folder).as_posix(): d for d in doc}
    assert [by[n]["kind"] for n in names] == ["run-mask", "run-mask", "run-rewind",
                                              "run-checkpoint", "run-trained", "run-best"]
    assert all(d["run_dir"] == str(run_folder) and d["arch"] == "digits_cnn" for d in doc)
    assert by[mask_file(0)]["density"] == 1.0 and "round 0" in by[mask_file(0)]["what"]
    three = by[mask_file(3)]
    assert three["density"] == pytest.approx(ticket.density)
    assert three["kept"] == ticket.mask.num_kept and three["counted"] == "kept"
    assert "round 3" in three["what"] and "0.1" in three["what"]
    assert [r["name"] for r in three["layers"]] == list(ticket.mask)
    assert "after epoch 2" in by[REWIND]["what"]
    assert set(by[REWIND]["tensors"]) == {"model", "opt"}
    ck = by[CHECKPOINT]
    assert ck["metadata"]["epoch"] == 4 and "round-3-trial-0" in ck["what"]
    assert set(ck["tensors"]) == {"model", "opt", "rng"}
    trained = by[TRAINED_CURRENT]
    assert trained["counted"] == "nonzero"
    counts = {r["name"]: r["kept"] for r in trained["layers"]}
    for name in ticket.mask:  # nonzero weights: the kept ones (a ticket's are never 0)
        assert counts[name] == int(torch.count_nonzero(ticket.state[name]))
    text = run("inspect", run_folder / mask_file(3))
    assert text.exit_code == 0 and "round 3" in text.stdout and "run-mask" in text.stdout


def test_run_folder_files_are_told_apart_by_content_when_renamed_or_piped(run_folder,
                                                                          tmp_path):
    moved = tmp_path / "elsewhere.safetensors"
    shutil.copy(run_folder / mask_file(3), moved)
    assert _json(run("inspect", moved, "--json"))["kind"] == "run-mask"
    for name, kind in ((REWIND, "run-rewind"), (CHECKPOINT, "run-checkpoint"),
                       (mask_file(3), "run-mask"), (TRAINED_CURRENT, "run-trained")):
        doc = _json(run("inspect", "-", "--json", input=(run_folder / name).read_bytes()))
        assert doc["kind"] == kind and doc["file"] == "-" and doc["run_dir"] is None


# ---- trigger sets --------------------------------------------------------------------------------


def test_a_trigger_set_npz_is_recognised(tmp_path):
    ts = generate(b"k" * 32, n=40, size=16, num_classes=7)
    path = save_trigger_set(ts, tmp_path / "set.npz")
    doc = _json(run("inspect", path, "--json"))
    assert doc["kind"] == "trigger-set"
    assert doc["images"] == {"count": 40, "height": 16, "width": 16, "channels": 3,
                             "dtype": "uint8"}
    expected = {str(k): int(v) for k, v in enumerate(np.bincount(ts.labels)) if v}
    assert doc["labels"]["classes"] == expected
    assert sum(doc["labels"]["classes"].values()) == 40
    text = run("inspect", path)
    assert text.exit_code == 0 and "trigger set" in text.stdout
    assert "pickle" not in text.stdout + text.stderr


def test_npz_that_is_not_a_trigger_set_and_torch_zips(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    assert_one_line_error(run("inspect", tmp_path / "other.npz"), 2, "not a trigger set")
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 4, 4, 3), np.uint8),
             labels=np.array([0.5, 1.0]))
    assert_one_line_error(run("inspect", tmp_path / "float.npz"), 2, "must be integers")
    np.savez(tmp_path / "short.npz", images=np.zeros((3, 4, 4, 3), np.uint8),
             labels=np.array([0, 1]))
    assert_one_line_error(run("inspect", tmp_path / "short.npz"), 2, "3 trigger images but 2")
    torch.save({"w": torch.ones(2)}, tmp_path / "ckpt.pt")  # a zip too, but torch's
    assert_one_line_error(run("inspect", tmp_path / "ckpt.pt"), 2, "pickled PyTorch")


# ---- metadata, readably and literally ------------------------------------------------------------


def test_metadata_is_printed_readably_and_never_cut(tmp_path, ticket):
    long = "".join(f"{i:04d}" for i in range(150))  # 600 characters, no space to wrap at
    words = " ".join(f"word{i}" for i in range(120))
    ticket.extra = {"long": long, "words": words,
                    "config": {"lr": 0.1, "schedule": {"milestones": [91, 136]}}}
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    result = run("inspect", path)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 200  # wrapped to the width of a pipe
    assert all(ln == ln.rstrip() for ln in lines if "│" not in ln and "━" not in ln)
    joined = "".join(result.stdout.split())
    assert long in joined and "".join(words.split()) in joined  # all there, nothing cut
    assert "…" not in result.stdout
    stripped = [ln.strip() for ln in lines]
    assert '"lr": 0.1,' in stripped and '"milestones": [' in stripped  # indented JSON
    assert "91," in stripped and "136" in stripped
