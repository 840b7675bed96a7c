"""The shell contract: JSON on stdout only, one-line errors on stderr, exit codes 0/1/2."""

import json
import pickle
import subprocess
import sys

import pytest
import torch
from helpers import HANG_GUARD_S, assert_one_line_error, make_ticket, run, write_raw

from ticketctl.artifacts import load_ticket, save_ticket


def test_help_lists_built_commands_with_descriptions():
    result = run("--help")
    assert result.exit_code == 0
    for cmd in ("inspect", "convert", "demo", "data"):
        assert cmd in result.stdout
    assert "Show what a ticket file holds" in result.stdout


def test_inspect_json_is_the_only_stdout(tmp_path, ticket):
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    result = run("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    for key in ("kind", "arch", "density", "layers", "metadata"):
        assert key in doc
    assert doc["kind"] == "ticket" and doc["arch"] == "digits_cnn"
    assert doc["density"] == pytest.approx(ticket.density)
    assert [r["name"] for r in doc["layers"]] == list(ticket.mask)
    assert all({"name", "shape", "density"} <= set(r) for r in doc["layers"])


def test_inspect_report_goes_to_stdout(tmp_path, ticket):
    """The report is inspect's result: on stdout, for pipes (and nothing on stderr)."""
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    result = run("inspect", path)
    assert result.exit_code == 0
    assert result.stderr == ""
    assert "conv2.weight" in result.stdout and "total" in result.stdout
    assert "\x1b[" not in result.stdout  # no colour codes into a pipe
    assert run("inspect", path, "--quiet").stdout == ""


def _bad_files(tmp_path, ticket):
    good = save_ticket(ticket, tmp_path / "good.safetensors").read_bytes()
    files = {}
    (tmp_path / "trunc.safetensors").write_bytes(good[:300])
    files["truncated"] = (tmp_path / "trunc.safetensors", "truncated or corrupt")
    (tmp_path / "rand.safetensors").write_bytes(bytes(range(256)) * 8)
    files["random"] = (tmp_path / "rand.safetensors", "not a valid safetensors")
    files["not a ticket"] = (write_raw(tmp_path / "plain.safetensors", {"x": torch.ones(2)},
                                       None), "not a ticketctl ticket")
    (tmp_path / "ckpt.safetensors").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    files["pickle"] = (tmp_path / "ckpt.safetensors", "never unpickles")
    meta = ticket.metadata()
    files["unknown arch"] = (write_raw(tmp_path / "arch.safetensors", ticket.tensors(),
                                       {**meta, "arch": "lenet9"}), "unknown architecture")
    files["newer version"] = (write_raw(tmp_path / "ver.safetensors", ticket.tensors(), meta,
                                        version=4), "upgrade ticketctl")
    shape = ticket.tensors()
    shape["conv2.weight.mask"] = torch.ones(2, 2, dtype=torch.uint8)
    files["mask shape"] = (write_raw(tmp_path / "shape.safetensors", shape, meta), "has shape")
    vals = ticket.tensors()
    vals["conv2.weight.mask"] = vals["conv2.weight.mask"] * 3
    files["mask values"] = (write_raw(tmp_path / "vals.safetensors", vals, meta),
                            "values other than 0 and 1")
    return files


def test_every_bad_file_is_exit_2_with_one_line(tmp_path, ticket):
    for _label, (path, message) in _bad_files(tmp_path, ticket).items():
        result = run("inspect", path)
        assert_one_line_error(result, 2, message)


def test_tampered_file_is_exit_1(tmp_path, ticket):
    tensors = ticket.tensors()
    tensors["fc.bias"] = tensors["fc.bias"] + 1
    path = write_raw(tmp_path / "tampered.safetensors", tensors, ticket.metadata())
    assert_one_line_error(run("inspect", path), 1, "altered after it was written")


def test_a_missing_choice_option_is_one_line_with_its_choices(tmp_path, ticket):
    """Click lists a missing choice option's choices one per line; the error stays one."""
    src = save_ticket(ticket, tmp_path / "t.safetensors")
    result = run("split", src, "--key-ratio", "0.1")
    assert_one_line_error(result, 2, "Missing option '--score'. Choose from: omp, ewp,")


def test_demo_out_dir_that_cannot_be_a_folder_is_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert_one_line_error(run("demo", "--out-dir", afile), 2, "is a file, not a folder")
    assert_one_line_error(run("demo", "--out-dir", afile / "sub"), 2, "cannot make --out-dir")
    assert afile.read_text() == "keep me"


def test_an_npz_given_as_a_ticket_is_named_as_one(tmp_path):
    """A trigger set (.npz, a zip like torch.save's) passed where a ticket goes is called
    what it is, not a pickled checkpoint to convert."""
    import numpy as np

    path = tmp_path / "trigger.npz"
    np.savez(path, images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(2, np.int64))
    result = run("retrain", path, "--epochs", "1", "-o", tmp_path / "r")
    assert_one_line_error(result, 2, "is a NumPy .npz archive (a trigger set?), not a ticket")
    assert "convert" not in result.stderr


def test_missing_data_folder_is_exit_2(tmp_path):
    result = run("data", "cifar10", "--data-dir", tmp_path / "nowhere")
    assert_one_line_error(result, 2, "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("data", "cifar10", "--data-dir", empty), 2, "data_batch_1")


def test_output_in_missing_folder_and_existing_output(tmp_path, ticket):
    src = save_ticket(ticket, tmp_path / "t.safetensors")
    result = run("convert", src, "--to", "torch-prune", "--out", tmp_path / "no" / "x.pt")
    assert_one_line_error(result, 2, "does not exist")
    existing = tmp_path / "x.pt"
    existing.write_bytes(b"keep me")
    result = run("convert", src, "--to", "torch-prune", "--out", existing)
    assert_one_line_error(result, 2, "pass --force")
    assert existing.read_bytes() == b"keep me"
    result = run("convert", src, "--to", "torch-prune", "--out", existing, "--force", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["out"] == str(existing)
    assert existing.read_bytes() != b"keep me"


def test_convert_round_trip_through_cli(tmp_path):
    ticket = make_ticket(seed=5)
    src = save_ticket(ticket, tmp_path / "t.safetensors")
    assert run("convert", src, "--to", "torch-prune", "--out", tmp_path / "e.pt").exit_code == 0
    result = run("convert", tmp_path / "e.pt", "--out", tmp_path / "back.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["masks_sha256"] == ticket.mask.sha256()


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"garbage!garbage!")
    result = run("inspect", tmp_path / "x.safetensors", "--debug")
    assert result.exit_code != 0 and result.exception is not None


@pytest.mark.slow
def test_demo_and_python_dash_m(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "ticketctl", "demo", "--out-dir", str(out),
                           "--json"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    found = doc["find"]
    # A real model on real digits, not a stub: 98.3-99.0% dense over seeds 0-4 (and 92.6-97.7%
    # after 2 epochs over 20 seeds), far above 80 on any CPU.
    assert found["dense_accuracy"] > 80
    # How far the search prunes is not asserted: a round is accepted when it loses at most
    # 1 point, 3 of the 299 test images, so a single image decides and another CPU's rounding
    # can take another path (densities of 1.5% to 64% over seeds 0-4). What holds on every
    # path: rounds ran, and the ticket is the last accepted round's (or dense, if none was).
    accepted = [r for r in found["rounds"] if r["accepted"]]
    assert found["rounds"]
    assert found["density"] == (accepted[-1]["density"] if accepted else 1.0)
    assert found["ticket_accuracy"] >= found["dense_accuracy"] - 1.0
    assert doc["inspect"]["kind"] == "ticket"
    assert doc["inspect"]["density"] == pytest.approx(found["density"])
    for name in ("digits.ticket.safetensors", "digits.trained.safetensors", "search.png",
                 "digits.key.safetensors", "digits.locked.safetensors"):
        assert (out / name).exists()
    v1 = doc["v1"]
    assert v1["identical"] is True
    ticket = load_ticket(out / "digits.ticket.safetensors")
    assert v1["key_weights"] == round(0.1 * ticket.mask.num_kept)
    assert v1["key_weights"] + v1["locked_weights"] == ticket.mask.num_kept
    # Both retrainings are real (96-99% over seeds 0-4). That the key matters is not asserted
    # here: on digits a 10% key moves accuracy by -0.3 to +5.0 points over seeds 0-4, within
    # the noise of 299 test images; its effect is measured on CIFAR-10 (docs/SCHEME_V1.md).
    assert v1["original_accuracy"] > 80 and v1["nokey_accuracy"] > 80
    v2 = doc["v2"]
    assert v2["verified"] is True and v2["message"] == "ticketctl demo"
    assert v2["p_value"] < 1e-12
    v3 = doc["v3"]
    assert v3["verified"] is True and v3["predict_cmd"]["trigger_p_value"] < 1e-6
    attacks = {a["attack"]: a for a in doc["attacks"]}
    assert [r["strength"] for r in attacks["prune-omp"]["rows"]] == [0.1, 0.3, 0.5]
    assert [r["strength"] for r in attacks["quantize"]["rows"]] == ["int8", "int4"]
    assert all(r["p_value"] is not None for a in doc["attacks"] for r in a["rows"])
    # where the time went: every stage timed, together no more than the whole
    stages = doc["stage_seconds"]
    assert list(stages) == ["find", "v1", "v2", "v3", "attacks"]
    assert all(v >= 0 for v in stages.values())
    assert sum(stages.values()) <= doc["seconds"] + 0.05  # each rounded to 0.01 s
    again = subprocess.run([sys.executable, "-m", "ticketctl", "demo", "--out-dir", str(out)],
                           capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert again.returncode == 2 and "--force" in again.stderr


def test_text_from_files_and_users_is_printed_literally(tmp_path, ticket):
    """Metadata, messages and paths are data: Rich markup in them is shown, not applied (a
    `[/]` used to crash every command), and terminal escape sequences are shown as \\xNN."""
    hostile = "[/][bold]x[link=http://e]y \x1b]0;title\x07\x1b[2J"
    ticket.extra = {"note": hostile}
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    result = run("inspect", path)
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "[/][bold]x[link=http://e]y" in text and "\\x1b]0;title\\x07" in text
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    meta = {**ticket.metadata(), "kind": "[/]"}
    bad = write_raw(tmp_path / "kind.safetensors", ticket.tensors(), meta)
    assert_one_line_error(run("inspect", bad), 2, "field 'kind' must be one of")
    assert "got '[/]'" in run("inspect", bad).stderr


def test_a_message_with_brackets_is_signed_and_shown_as_written(tmp_path):
    t = save_ticket(make_ticket(seed=6, width=32), tmp_path / "t.safetensors")
    message = "(c) [acme] 2026 [/]"
    result = run("sign", t, "--message", message, "--out", tmp_path / "s.safetensors",
                 "--receipt", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    result = run("verify", tmp_path / "s.safetensors", "--receipt", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    assert repr(message) in " ".join(result.stderr.split())


def test_progress_is_plain_lines_when_not_a_terminal(tmp_path):
    """A log or a pipe gets progress lines (what, how far, time left) where a terminal gets a
    bar; --quiet and --json keep stderr free of them."""
    args = ["find", "--epochs", "2", "--max-rounds", "0", "--run-dir", tmp_path / "run"]
    result = run(*args, "--out", tmp_path / "a.safetensors")
    assert result.exit_code == 0, result.stderr
    assert "dense: 2/2" in result.stderr
    result = run(*args, "--out", tmp_path / "b.safetensors", "--force", "--quiet")
    assert result.exit_code == 0 and "dense:" not in result.stderr


def test_threads_are_set_and_checked(tmp_path):
    before = torch.get_num_threads()
    try:
        assert run("find", "--epochs", "1", "--max-rounds", "0", "--threads", "1", "--out",
                   tmp_path / "t.safetensors", "--run-dir", tmp_path / "run").exit_code == 0
        assert torch.get_num_threads() == 1
        result = run("find", "--threads", "0", "--out", tmp_path / "u.safetensors")
        assert_one_line_error(result, 2, "--threads")
        assert_one_line_error(run("demo", "--threads", "0"), 2, "--threads")
    finally:
        torch.set_num_threads(before)


def test_help_and_version_import_no_heavy_library():
    """`--help` and `--version` list commands without importing them (PyTorch and SciPy take
    seconds to import); a command's own module loads when it runs."""
    probe = ("import sys\nfrom ticketctl.cli.app import app\n"
             "try:\n    app(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print({m: m in sys.modules for m in ('torch', 'scipy', 'matplotlib')})")
    for args in (["--help"], ["--version"], []):
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True,
                              text=True, timeout=HANG_GUARD_S)
        last = proc.stdout.strip().splitlines()[-1]
        assert last == "{'torch': False, 'scipy': False, 'matplotlib': False}", (args, last)


def test_the_root_help_is_each_commands_own():
    """The root --help lists commands from a table (so it imports none): each entry must be
    the first paragraph of the command's own help."""
    from ticketctl.cli.app import COMMANDS, load_command

    for name, spec in COMMANDS.items():
        cmd = load_command(name)
        first = " ".join((cmd.help or "").split("\n\n")[0].split())
        assert spec.help == first, name
