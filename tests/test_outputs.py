"""All outputs of a command or none: a write or a rename that fails half-way (a full disk)
leaves no output, no temporary file, and every file replaced under --force as it was."""

import errno
import json
import os
from pathlib import Path

import pytest
from helpers import assert_one_line_error, make_ticket, run

from ticketctl.artifacts import io as artifacts_io
from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.artifacts.io import all_or_nothing, write_bytes_atomic, write_text_atomic
from ticketctl.errors import TicketctlError
from ticketctl.protect.trigger import generate, save_trigger_set


@pytest.fixture
def full_disk(monkeypatch):
    """`rename(name)`: renaming a finished temporary file onto `name` fails with ENOSPC (the
    renames that put a replaced file back still work); `write(name)`: writing the temporary
    file of `name` fails. `done` lists the files renamed into place so far."""
    real_replace, real_write = os.replace, Path.write_bytes
    renamed: list[str] = []
    failing = {"rename": set(), "write": set()}

    def replace(src, dst, *a, **kw):
        if str(src).endswith(".tmp") and Path(dst).name in failing["rename"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        real_replace(src, dst, *a, **kw)
        if str(src).endswith(".tmp"):
            renamed.append(Path(dst).name)

    def write_bytes(self, data):
        if any(self.name.startswith(f".{n}.") for n in failing["write"]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)

    class Disk:
        done = renamed

        @staticmethod
        def rename(name):  # from now on, instead of any earlier failure
            failing.update(rename={name}, write=set())

        @staticmethod
        def write(name):
            failing.update(rename=set(), write={name})

    return Disk


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---- the helper --------------------------------------------------------------------------------

def test_a_failed_rename_puts_back_what_was_renamed(tmp_path, full_disk):
    (tmp_path / "a").write_bytes(b"old a")
    (tmp_path / "c").symlink_to(tmp_path / "nowhere")  # a dangling link, replaced under force
    full_disk.rename("d")
    with pytest.raises(TicketctlError, match="cannot write .*d: No space left on device; "
                                             "none of the outputs was written"):
        with all_or_nothing(*(tmp_path / n for n in "abcd"), force=True):
            for n in "abcd":
                write_text_atomic(tmp_path / n, f"new {n}", force=True)
    assert full_disk.done == ["a", "b", "c"]  # three renames happened, and were undone
    assert names(tmp_path) == {"a", "c"}
    assert (tmp_path / "a").read_bytes() == b"old a"
    assert os.readlink(tmp_path / "c") == str(tmp_path / "nowhere")


def test_a_failed_write_leaves_nothing(tmp_path, full_disk):
    (tmp_path / "b").write_bytes(b"old b")
    full_disk.write("c")
    with pytest.raises(TicketctlError, match="cannot write .*c: No space left on device"):
        with all_or_nothing(tmp_path / "a", tmp_path / "b", tmp_path / "c", force=True):
            for n in "abc":
                write_bytes_atomic(tmp_path / n, b"new", force=True, private=n == "a")
    assert full_disk.done == []  # nothing was renamed: the temporary files were removed
    assert names(tmp_path) == {"b"} and (tmp_path / "b").read_bytes() == b"old b"


def test_any_error_in_the_block_commits_nothing(tmp_path):
    with pytest.raises(KeyError):
        with all_or_nothing(tmp_path / "a"):
            write_text_atomic(tmp_path / "a", "x")
            raise KeyError("later")
    assert names(tmp_path) == set()


def test_outputs_are_checked_before_anything_is_written(tmp_path):
    (tmp_path / "b").write_bytes(b"keep")
    with pytest.raises(TicketctlError, match="b already exists; pass --force"):
        with all_or_nothing(tmp_path / "a", tmp_path / "b"):
            raise AssertionError("the block must not run")
    with pytest.raises(TicketctlError, match="same file"):
        with all_or_nothing(tmp_path / "a", tmp_path / "." / "a"):
            raise AssertionError("the block must not run")
    with pytest.raises(TicketctlError, match="folder .* does not exist"):
        with all_or_nothing(tmp_path / "a", tmp_path / "no" / "c"):
            raise AssertionError("the block must not run")
    assert names(tmp_path) == {"b"}


def test_an_inner_block_commits_with_the_outer_one(tmp_path, full_disk):
    full_disk.rename("c")
    with pytest.raises(TicketctlError, match="No space left"):
        with all_or_nothing(tmp_path / "c"):
            with all_or_nothing(tmp_path / "a", tmp_path / "b"):
                write_text_atomic(tmp_path / "a", "a")
                write_text_atomic(tmp_path / "b", "b")
            # the inner block's files wait, staged, for the outer one
            assert not (tmp_path / "a").exists() and len(names(tmp_path)) == 2
            write_text_atomic(tmp_path / "c", "c")
    assert names(tmp_path) == set()


def test_a_file_that_appears_meanwhile_stops_every_rename(tmp_path):
    with pytest.raises(TicketctlError, match="b already exists"):
        with all_or_nothing(tmp_path / "a", tmp_path / "b"):
            write_text_atomic(tmp_path / "a", "a")
            write_text_atomic(tmp_path / "b", "b")
            (tmp_path / "b").write_text("someone else's")
    assert names(tmp_path) == {"b"} and (tmp_path / "b").read_text() == "someone else's"


def test_private_outputs_stay_owner_only(tmp_path):
    old = os.umask(0)
    try:
        with all_or_nothing(tmp_path / "k", tmp_path / "p"):
            write_bytes_atomic(tmp_path / "k", b"secret", private=True)
            staged = [p for p in tmp_path.iterdir() if p.name.startswith(".k.")]
            assert [p.stat().st_mode & 0o777 for p in staged] == [0o600]
            write_bytes_atomic(tmp_path / "p", b"public")
    finally:
        os.umask(old)
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o666


def test_a_single_output_on_a_full_disk_is_one_line(tmp_path, full_disk):
    full_disk.write("x")
    with pytest.raises(TicketctlError, match=r"cannot write .*x: No space left on device$"):
        write_text_atomic(tmp_path / "x", "x")
    assert names(tmp_path) == set()
    assert artifacts_io._BATCH.get() is None


# ---- every command with several outputs --------------------------------------------------------

@pytest.fixture
def ticket_file(tmp_path):
    return save_ticket(make_ticket(seed=3, width=32), tmp_path / "t.safetensors")


def test_split_leaves_no_key_without_its_lock(tmp_path, ticket_file, full_disk):
    (tmp_path / "k.safetensors").write_bytes(b"old key")
    (tmp_path / "l.safetensors").write_bytes(b"old locked")
    full_disk.rename("l.safetensors")
    result = run("split", ticket_file, "--score", "omp", "--key-ratio", "0.1", "--key-mask",
                 tmp_path / "k.safetensors", "--locked", tmp_path / "l.safetensors", "--force")
    assert_one_line_error(result, 2, "No space left on device; none of the outputs was written")
    assert full_disk.done == ["k.safetensors"]  # the key was in place, and was put back
    assert (tmp_path / "k.safetensors").read_bytes() == b"old key"
    assert (tmp_path / "l.safetensors").read_bytes() == b"old locked"
    assert names(tmp_path) == {"t.safetensors", "k.safetensors", "l.safetensors"}


def test_split_with_one_output_twice_is_refused(tmp_path, ticket_file):
    result = run("split", ticket_file, "--score", "omp", "--key-ratio", "0.1", "--key-mask",
                 tmp_path / "k.safetensors", "--locked", tmp_path / "." / "k.safetensors")
    assert_one_line_error(result, 2, "different files")
    assert names(tmp_path) == {"t.safetensors"}


def test_sign_leaves_no_signed_ticket_without_its_receipt(tmp_path, ticket_file, full_disk):
    full_disk.write("r.json")
    result = run("sign", ticket_file, "--message", "m", "--out", tmp_path / "s.safetensors",
                 "--receipt", tmp_path / "r.json", "--qr-png", tmp_path / "qr.png")
    assert_one_line_error(result, 2, "r.json: No space left on device")
    assert names(tmp_path) == {"t.safetensors"}
    full_disk.rename("qr.png")  # the last of three renames fails: the first two are undone
    (tmp_path / "s.safetensors").write_bytes(b"old signed")
    result = run("sign", ticket_file, "--message", "m", "--out", tmp_path / "s.safetensors",
                 "--receipt", tmp_path / "r2.json", "--qr-png", tmp_path / "qr.png", "--force")
    assert_one_line_error(result, 2, "none of the outputs was written")
    assert full_disk.done == ["s.safetensors", "r2.json"]
    assert names(tmp_path) == {"t.safetensors", "s.safetensors"}
    assert (tmp_path / "s.safetensors").read_bytes() == b"old signed"
    result = run("sign", ticket_file, "--message", "m", "--out", tmp_path / "s.json",
                 "--receipt", tmp_path / "s.json")
    assert_one_line_error(result, 2, "same file")


def test_keygen_writes_both_keys_or_neither(tmp_path, full_disk):
    full_disk.write("owner.pub")
    assert_one_line_error(run("keygen", "--out", tmp_path / "owner"), 2, "No space left")
    assert names(tmp_path) == set()
    (tmp_path / "owner.key").write_bytes(b"old private")
    full_disk.rename("owner.pub")
    assert_one_line_error(run("keygen", "--out", tmp_path / "owner", "--force"), 2,
                          "none of the outputs was written")
    assert full_disk.done == ["owner.key"]
    assert names(tmp_path) == {"owner.key"}
    assert (tmp_path / "owner.key").read_bytes() == b"old private"


def test_find_writes_its_ticket_trained_model_and_plot_together(tmp_path, full_disk):
    (tmp_path / "ticket.safetensors").write_bytes(b"old ticket")
    full_disk.rename("search.png")
    result = run("find", "--epochs", "2", "--max-rounds", "0", "--run-dir", tmp_path / "run",
                 "--out", tmp_path / "ticket.safetensors", "--trained",
                 tmp_path / "trained.safetensors", "--plot", tmp_path / "search.png", "--force",
                 "-q")
    assert_one_line_error(result, 2, "search.png: No space left on device")
    assert full_disk.done[-2:] == ["ticket.safetensors", "trained.safetensors"]
    assert names(tmp_path) == {"ticket.safetensors", "run"}
    assert (tmp_path / "ticket.safetensors").read_bytes() == b"old ticket"


def test_retrain_writes_the_model_and_its_receipt_together(tmp_path, full_disk):
    ticket = save_ticket(make_ticket(seed=4, width=8), tmp_path / "t.safetensors")
    save_trigger_set(generate(b"k" * 32, n=10, size=8, channels=1), tmp_path / "set.npz")
    full_disk.rename("r.json")
    result = run("retrain", ticket, "--epochs", "1", "--trigger", tmp_path / "set.npz",
                 "--trigger-per-batch", "2", "--receipt", tmp_path / "r.json", "--out",
                 tmp_path / "m.safetensors", "-q")
    assert_one_line_error(result, 2, "r.json: No space left on device")
    assert full_disk.done[-1] == "m.safetensors"
    assert names(tmp_path) == {"t.safetensors", "set.npz"}
    result = run("retrain", ticket, "--epochs", "1", "--trigger", tmp_path / "set.npz",
                 "--receipt", tmp_path / "r.json", "--out", tmp_path / "r.json")
    assert_one_line_error(result, 2, "--out and --receipt must be different files")


def test_attack_permute_writes_its_model_with_its_rows(tmp_path, ticket_file, full_disk):
    full_disk.rename("rows.csv")
    result = run("attack", "permute", ticket_file, "--out", tmp_path / "p.safetensors",
                 "--csv", tmp_path / "rows.csv", "--json")
    assert result.exit_code == 2, result.stderr
    assert json.loads(result.stdout)["exit_code"] == 2
    assert "rows.csv: No space left on device" in result.stderr
    assert names(tmp_path) == {"t.safetensors"}


def test_outputs_written_together_are_whole(tmp_path, ticket_file):
    result = run("split", ticket_file, "--score", "omp", "--key-ratio", "0.1", "--key-mask",
                 tmp_path / "k.safetensors", "--locked", tmp_path / "l.safetensors")
    assert result.exit_code == 0, result.stderr
    assert names(tmp_path) == {"t.safetensors", "k.safetensors", "l.safetensors"}
    assert load_ticket(tmp_path / "k.safetensors").kind == "key"
    assert load_ticket(tmp_path / "l.safetensors").kind == "locked"
