"""The caches and background work that make `sign` and `verify` of large tickets fast must
never change a result: per-tensor digests, kept counts and magnitude floors cached on
tensors follow every change; the prefetch's digests are the file's; a signed ticket keeps
+0.0 at every pruned position; the receipt's JSON reads back as written."""

import json
import os

import pytest
import torch
from helpers import make_ticket, run

from ticketctl import prefetch
from ticketctl.artifacts import Mask, load_ticket, save_ticket
from ticketctl.artifacts.io import readable_json
from ticketctl.artifacts.mask import as_bool, kept_count, kept_floor, raw_sha256
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.protect.signature import magnitude_floor, sign_ticket


@pytest.fixture
def small_files(monkeypatch):
    """Prefetch every file, however small (the real threshold is 16 MiB)."""
    monkeypatch.setattr(prefetch, "MIN_BYTES", 0)
    yield
    prefetch._jobs.clear()


def _uncached(ticket):
    """The same ticket's tensors as fresh copies: nothing cached on them."""
    return {k: v.clone() for k, v in ticket.state.items()}, \
        {k: m.clone() for k, m in ticket.mask.items()}


def test_prefetched_digests_are_the_files(tmp_path, small_files):
    ticket = make_ticket(seed=3)
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    got = prefetch.file_digests(str(path))
    assert got is not None
    back = load_ticket(path)  # no prefetch running: hashed here
    for name, t in back.tensors().items():
        assert got.sha256[name] == raw_sha256(t.clone()), name
    assert prefetch.start(path)
    again = load_ticket(path)  # with the prefetch's digests
    assert again.tensors_sha256() == back.tensors_sha256() == ticket.tensors_sha256()
    assert not prefetch._jobs  # taken once


def test_a_prefetch_of_a_file_changed_since_is_not_used(tmp_path, small_files):
    ticket = make_ticket(seed=4)
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    assert prefetch.start(path)
    prefetch._jobs[os.path.realpath(path)].thread.join()
    other = make_ticket(seed=5)
    save_ticket(other, tmp_path / "o.safetensors")
    os.replace(tmp_path / "o.safetensors", path)  # another file under the same name
    assert prefetch.take(path) is None
    assert load_ticket(path).tensors_sha256() == other.tensors_sha256()


def test_tampering_is_caught_with_a_prefetch_too(tmp_path, small_files):
    ticket = make_ticket(seed=6)
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8:8 + n])["fc.bias"]["data_offsets"][0]
    data[8 + n + begin] ^= 0x01  # the lowest bit of a bias: still a finite, unpruned value
    path.write_bytes(bytes(data))
    assert prefetch.start(path)
    with pytest.raises(CheckFailed, match="do not match their recorded SHA-256"):
        load_ticket(path)


def test_a_prefetch_leaves_bad_files_to_the_reader(tmp_path, small_files):
    for name, data in (("short", b"\x05\x00"), ("huge-header", (1 << 40).to_bytes(8, "little")
                                                 + b"{}"), ("not-json", b"\x04" + b"\0" * 7
                                                                       + b"{{{{")):
        path = tmp_path / name
        path.write_bytes(data)
        assert prefetch.file_digests(str(path)) is None
    assert not prefetch.start(tmp_path / "missing")
    assert not prefetch.start(tmp_path)  # a folder


def test_the_cli_prefetches_the_first_large_file(tmp_path, small_files, monkeypatch):
    ticket = make_ticket(seed=7)
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    seen = []
    real = prefetch.start

    def spy(p):
        seen.append(str(p))
        return real(p)

    monkeypatch.setattr(prefetch, "start", spy)
    result = run("inspect", "--json", str(path))
    assert result.exit_code == 0, result.stderr
    assert seen == [str(path)]
    assert json.loads(result.stdout)["hashes"]["tensors_sha256"] == ticket.tensors_sha256()


def test_cached_counts_and_floors_follow_changes():
    ticket = make_ticket(seed=8)
    name = next(iter(ticket.mask))
    w, m = ticket.state[name], ticket.mask[name]
    kept = int(m.sum())
    assert kept_count(m) == kept
    floor = kept_floor(w, m)
    assert floor == float(w[m].abs().min())
    i = int(torch.nonzero(m.view(-1))[0])
    w.view(-1)[i] = floor / 4  # a smaller kept weight, in place
    assert kept_floor(w, m) == floor / 4
    m.view(-1)[i] = False
    w.view(-1)[i] = 0.0
    assert kept_count(m) == kept - 1
    assert kept_floor(w, m) == float(w[m].abs().min())
    other = m.clone()  # the same values in another tensor: computed for it, not taken
    assert kept_floor(w, other) == kept_floor(w, m)


# (seed, pruning rate): at 40% density signing restores weights outside the code, at 10%
# and 3% it removes the smallest (where the receipt's floor comes from the removal's work)
@pytest.mark.parametrize("seed,rate,removes", [(0, 0.6, False), (1, 0.9, True),
                                               (3, 0.97, True)])
def test_a_signed_tickets_floor_hashes_and_zeros_are_exact(seed, rate, removes):
    """What signing derives from caches equals a computation from scratch."""
    ticket = make_ticket(seed=seed, density_rate=rate, width=32)
    before, before_masks = _uncached(ticket)
    signed, receipt, report, _ = sign_ticket(ticket, "signed", seed=seed)
    assert (report.compensated > 0) == removes
    state, masks = _uncached(signed)
    assert receipt.magnitude_floor == min(float(state[k][m].abs().min())
                                          for k, m in masks.items() if m.any())
    assert magnitude_floor(signed) == receipt.magnitude_floor
    fresh = signed.derive(state=state, mask=Mask(masks))
    assert fresh.tensors_sha256() == signed.tensors_sha256() == receipt.signed_ticket_sha256
    assert fresh.mask.sha256() == signed.mask.sha256()
    for k, m in signed.mask.items():  # every pruned weight +0.0, bit for bit
        bits = signed.state[k].view(torch.int32)
        assert int(torch.count_nonzero(bits[~m])) == 0, k
    # layers are shared with the unsigned ticket, not copied, until signing changes them;
    # the unsigned ticket itself never changes
    for k in ticket.state:
        assert torch.equal(ticket.state[k], before[k]), k
    for k in ticket.mask:
        assert torch.equal(ticket.mask[k], before_masks[k]), k
        unchanged = torch.equal(signed.mask[k], before_masks[k]) and \
            torch.equal(signed.state[k], before[k])
        assert (signed.mask[k] is ticket.mask[k] and signed.state[k] is ticket.state[k]) \
            == unchanged, k


def test_masks_handed_over_are_shared_and_others_copied():
    t = torch.tensor([1, 0, 1], dtype=torch.uint8)
    shared = Mask({"w": t}, copy=False)["w"]
    assert shared.dtype == torch.bool and shared.data_ptr() == t.data_ptr()
    copied = Mask({"w": t})["w"]
    assert copied.data_ptr() != t.data_ptr() and copied.tolist() == [True, False, True]
    with pytest.raises(TicketctlError, match="values other than 0 and 1"):
        as_bool("w", torch.tensor([0, 2], dtype=torch.uint8))
    with pytest.raises(TicketctlError, match="values other than 0 and 1"):
        as_bool("w", torch.tensor([0.0, 0.5]))


def test_readable_json_reads_back():
    doc = {"b": [[1, 2.5], [3, 4]], "a": {"x": [1, 2], "y": [{"q": "], ["}], "z": []},
           "c": [[1, "s"], [2]], "d": [[]], "e": {}, "f": [[True, None]], "g": "x"}
    text = readable_json(doc)
    assert json.loads(text) == doc
    assert '\n    [1, 2.5],\n    [3, 4]\n' in text  # a row of numbers a line


def test_signing_in_place_writes_the_same_file(tmp_path):
    """The CLI signs the ticket it read in place (no copy of the layers that change): the
    signed file and receipt commitments are those of signing a copy."""
    ticket = make_ticket(seed=11, density_rate=0.9, width=32)
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    copy_signed, copy_receipt, _, _ = sign_ticket(load_ticket(path), "owner", seed=2)
    loaded = load_ticket(path)
    original = loaded.tensors_sha256()
    in_place, receipt, _, _ = sign_ticket(loaded, "owner", seed=2, in_place=True)
    assert in_place.extra["signed_from"] == original  # taken before anything changed
    a = save_ticket(copy_signed, tmp_path / "a.safetensors")
    b = save_ticket(in_place, tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()
    assert receipt.signed_ticket_sha256 == copy_receipt.signed_ticket_sha256
    assert load_ticket(path).tensors_sha256() == original  # the file itself is untouched


def test_the_console_command_exits_with_its_status_after_its_handlers(tmp_path):
    """`main` ends the process without the interpreter's teardown: output flushed, exit
    handlers run, the command's own status kept (0, or 2 for bad input)."""
    import subprocess
    import sys
    code = ("import atexit, sys; atexit.register(lambda: print('handler ran', flush=True)); "
            "sys.argv = ['ticketctl'] + sys.argv[1:]; "
            "from ticketctl.cli.app import main; main()")
    ok = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("ticketctl ") and \
        ok.stdout.rstrip().endswith("handler ran"), (ok.stdout, ok.stderr)
    bad = subprocess.run([sys.executable, "-c", code, "inspect", str(tmp_path / "none.st")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no such file" in bad.stderr
    assert bad.stdout.strip() == "handler ran"
