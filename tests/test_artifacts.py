import json
import pickle

import pytest
import safetensors.torch
import torch
from helpers import make_ticket, write_raw

from ticketctl.artifacts import Mask, load_ticket, read_header, save_ticket
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.prune import magnitude_prune


def test_round_trip_is_identical(tmp_path, ticket):
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    back = load_ticket(path)
    assert set(back.state) == set(ticket.state)
    for k in ticket.state:
        assert torch.equal(back.state[k], ticket.state[k]), k
    assert back.mask == ticket.mask
    assert back.metadata() == ticket.metadata()
    assert back.kind == "ticket" and back.arch_args == {"width": 8}


def test_file_is_plain_safetensors_with_documented_names(tmp_path, ticket):
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    tensors = safetensors.torch.load_file(str(path))
    assert "conv2.weight" in tensors and "conv2.weight.mask" in tensors
    assert tensors["conv2.weight.mask"].dtype == torch.uint8
    assert "conv1.weight.mask" not in tensors  # the first conv is not prunable
    header = read_header(path)
    assert header["format"] == "ticketctl" and header["format_version"] == "3"
    meta = json.loads(header["ticket"])
    for key in ("kind", "arch", "arch_args", "num_classes", "dataset", "density", "rewind_epoch",
                "seed", "masks_sha256", "tensors_sha256"):
        assert key in meta
    assert meta["density"] == pytest.approx(0.5, abs=1e-4)


def test_hashes_do_not_depend_on_mask_dtype(ticket):
    as_float = Mask({k: v.float() for k, v in ticket.mask.items()})
    assert as_float.sha256() == ticket.mask.sha256()
    other = make_ticket(seed=1)
    assert other.mask.sha256() != ticket.mask.sha256()


def test_no_overwrite_without_force(tmp_path, ticket):
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    before = path.read_bytes()
    with pytest.raises(TicketctlError, match="already exists; pass --force"):
        save_ticket(make_ticket(seed=3), path)
    assert path.read_bytes() == before
    save_ticket(make_ticket(seed=3), path, force=True)
    assert path.read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_missing_output_folder(tmp_path, ticket):
    with pytest.raises(TicketctlError, match="does not exist"):
        save_ticket(ticket, tmp_path / "nope" / "t.safetensors")


def _bytes_variant(tmp_path, ticket, name, transform):
    good = save_ticket(ticket, tmp_path / "good.safetensors").read_bytes()
    bad = tmp_path / name
    bad.write_bytes(transform(good))
    return bad


def test_truncated_file(tmp_path, ticket):
    bad = _bytes_variant(tmp_path, ticket, "trunc.safetensors", lambda b: b[: len(b) // 2])
    with pytest.raises(TicketctlError) as e:
        load_ticket(bad)
    assert type(e.value) is TicketctlError and "trunc" in str(e.value)


def test_random_bytes(tmp_path):
    bad = tmp_path / "random.safetensors"
    bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                    .to(torch.uint8).numpy().tobytes())
    with pytest.raises(TicketctlError, match="not a valid safetensors file"):
        load_ticket(bad)


def test_safetensors_that_is_not_a_ticket(tmp_path):
    path = write_raw(tmp_path / "plain.safetensors", {"w": torch.zeros(3)}, None)
    with pytest.raises(TicketctlError, match="not a ticketctl ticket"):
        load_ticket(path)


class Boom:
    """Unpickling this would create a marker file: proof the loader never unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["evil.safetensors", "evil.pt", "evil"])
def test_pickle_is_never_unpickled(tmp_path, name):
    marker = tmp_path / "unpickled"
    bad = tmp_path / name
    bad.write_bytes(pickle.dumps({"state_dict": Boom(str(marker))}, protocol=4))
    with pytest.raises(TicketctlError, match="never unpickles"):
        load_ticket(bad)
    assert not marker.exists()


def _meta(ticket, **override):
    meta = ticket.metadata()
    meta.update(override)
    return meta


def test_unknown_arch(tmp_path, ticket):
    path = write_raw(tmp_path / "a.safetensors", ticket.tensors(), _meta(ticket, arch="resnet99"))
    with pytest.raises(TicketctlError, match="unknown architecture 'resnet99'"):
        load_ticket(path)


def test_newer_format_version(tmp_path, ticket):
    path = write_raw(tmp_path / "v.safetensors", ticket.tensors(), _meta(ticket), version=7)
    with pytest.raises(TicketctlError, match="version 7.*upgrade ticketctl"):
        load_ticket(path)


def test_mask_of_wrong_shape(tmp_path, ticket):
    tensors = ticket.tensors()
    tensors["conv2.weight.mask"] = torch.ones(3, 3, dtype=torch.uint8)
    path = write_raw(tmp_path / "s.safetensors", tensors, _meta(ticket))
    with pytest.raises(TicketctlError, match=r"mask 'conv2.weight' has shape \[3, 3\]"):
        load_ticket(path)


def test_mask_with_values_other_than_0_1(tmp_path, ticket):
    tensors = ticket.tensors()
    tensors["conv3.weight.mask"] = tensors["conv3.weight.mask"] * 2
    path = write_raw(tmp_path / "m.safetensors", tensors, _meta(ticket))
    with pytest.raises(TicketctlError, match="values other than 0 and 1"):
        load_ticket(path)


def test_pruned_weights_must_be_zero(tmp_path, ticket):
    tensors = ticket.tensors()
    w = tensors["conv2.weight"].clone()
    w[tensors["conv2.weight.mask"] == 0] = 0.5
    tensors["conv2.weight"] = w
    path = write_raw(tmp_path / "z.safetensors", tensors, _meta(ticket))
    with pytest.raises(TicketctlError, match="pruned weight.*not zero"):
        load_ticket(path)


def test_state_must_fit_the_arch(tmp_path, ticket):
    tensors = ticket.tensors()
    del tensors["bn2.running_mean"]
    path = write_raw(tmp_path / "f.safetensors", tensors, _meta(ticket))
    with pytest.raises(TicketctlError, match="do not fit.*missing bn2.running_mean"):
        load_ticket(path)


def test_tampered_weights_fail_the_integrity_check(tmp_path, ticket):
    tensors = ticket.tensors()
    w = tensors["conv4.weight"].clone()
    w[w != 0] *= 1.01
    tensors["conv4.weight"] = w
    path = write_raw(tmp_path / "t.safetensors", tensors, _meta(ticket))
    with pytest.raises(CheckFailed, match="do not match their recorded SHA-256"):
        load_ticket(path)
    assert load_ticket(path, verify_hashes=False).state["conv4.weight"].equal(w)


def test_magnitude_prune_removes_exact_count_and_is_a_subset(ticket):
    weights = ticket.state
    new = magnitude_prune(weights, ticket.mask, 0.2)
    kept = ticket.mask.num_kept
    assert new.num_kept == kept - round(0.2 * kept)
    assert new.is_subset_of(ticket.mask)
    # every removed weight is no larger in magnitude than every surviving one
    removed = torch.cat([weights[n][ticket.mask[n] & ~new[n]].abs() for n in new])
    survived = torch.cat([weights[n][new[n]].abs() for n in new])
    assert removed.max() <= survived.min()
    layer = magnitude_prune(weights, ticket.mask, 0.2, scope="layer")
    for n in layer:
        k = int(ticket.mask[n].sum())
        assert int(layer[n].sum()) == k - round(0.2 * k)


def test_header_length_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path, ticket):
    """A safetensors header of 0x..80 bytes makes the file start with the pickle opcode."""
    from dataclasses import replace

    from ticketctl.artifacts import save_ticket

    for i in range(0, 400):
        path = save_ticket(replace(ticket, extra={"pad": "x" * i}), tmp_path / f"t{i}.safetensors")
        if path.read_bytes()[:1] == b"\x80":
            break
        path.unlink()
    else:
        raise AssertionError("no padding gave a header length ending in 0x80")
    loaded = load_ticket(path)
    assert loaded.mask == ticket.mask


def test_keys_and_receipts_are_owner_only_from_the_start(tmp_path, monkeypatch):
    """Under a permissive umask the private key and the receipt are still created 0600 (not
    widened, then narrowed); the public key follows the umask."""
    import os

    from helpers import run

    old = os.umask(0)
    try:
        assert run("keygen", "--out", tmp_path / "owner").exit_code == 0
        t = save_ticket(make_ticket(seed=2, width=32), tmp_path / "t.safetensors")
        result = run("sign", t, "--message", "m", "--out", tmp_path / "s.safetensors",
                     "--receipt", tmp_path / "r.json", "--signing-key", tmp_path / "owner.key")
        assert result.exit_code == 0, result.stderr
    finally:
        os.umask(old)
    assert (tmp_path / "owner.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "owner.pub").stat().st_mode & 0o777 == 0o666


def test_a_dangling_link_is_not_replaced_without_force(tmp_path, ticket):
    link = tmp_path / "out.safetensors"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(TicketctlError, match="--force"):
        save_ticket(ticket, link)
    assert link.is_symlink()


def test_nan_or_infinite_weights_are_refused(tmp_path, ticket):
    for value in (float("nan"), float("inf"), float("-inf")):  # (a min-max check sees each)
        tensors = ticket.tensors()
        name = "fc.bias"
        tensors[name] = tensors[name].clone()
        tensors[name][0] = value
        meta = {**ticket.metadata()}
        path = write_raw(tmp_path / "bad.safetensors", tensors, meta)
        with pytest.raises(TicketctlError, match="'fc.bias' holds 1 NaN or infinite"):
            load_ticket(path)


def _legacy_file(path, ticket):
    """A file as format version 1 wrote it: the same tensors, hashes streamed over every
    byte."""
    meta = _meta(ticket, masks_sha256=ticket.mask.legacy_sha256(),
                 tensors_sha256=ticket.legacy_tensors_sha256())
    return write_raw(path, ticket.tensors(), meta, version=1)


def test_version_1_files_still_load_and_their_tampering_is_caught(tmp_path, ticket):
    path = _legacy_file(tmp_path / "v1.safetensors", ticket)
    back = load_ticket(path)
    assert back.metadata() == ticket.metadata()  # rewritten in version 3 hashes
    assert ticket.legacy_tensors_sha256() != ticket.tensors_sha256()
    tensors = ticket.tensors()
    tensors["fc.bias"] = tensors["fc.bias"] + 1
    meta = _meta(ticket, masks_sha256=ticket.mask.legacy_sha256(),
                 tensors_sha256=ticket.legacy_tensors_sha256())
    with pytest.raises(CheckFailed, match="tensors do not match"):
        load_ticket(write_raw(tmp_path / "bad.safetensors", tensors, meta, version=1))
    # a version-1 file holding version-3 hashes was not written by any ticketctl: refused
    with pytest.raises(CheckFailed, match="masks do not match"):
        load_ticket(write_raw(tmp_path / "mixed.safetensors", ticket.tensors(), _meta(ticket),
                              version=1))


def test_a_split_of_a_version_1_ticket_merges(tmp_path, ticket):
    """Key and locked files split from a ticket before version 3 record its older hash."""
    from ticketctl.protect import merge_parts, split_ticket
    key, locked = split_ticket(ticket, "omp", 0.1)
    legacy = ticket.legacy_tensors_sha256()
    key.extra["parent_sha256"] = locked.extra["parent_sha256"] = legacy
    merged = merge_parts(locked, key)
    assert merged.legacy_tensors_sha256() == legacy
    key.extra["parent_sha256"] = locked.extra["parent_sha256"] = "0" * 64
    with pytest.raises(CheckFailed, match="does not match the recorded ticket hash"):
        merge_parts(locked, key)


def test_hashes_follow_in_place_changes(ticket):
    """Each tensor's digest is cached on the tensor: an in-place change or a replaced tensor
    must change the ticket's hash (the cache keys on the version counter and storage)."""
    before, masks = ticket.tensors_sha256(), ticket.mask.sha256()
    assert ticket.tensors_sha256() == before  # cached, the same
    ticket.state["fc.bias"].mul_(2)  # (times and over two: exact in binary floating point)
    changed = ticket.tensors_sha256()
    assert changed != before
    ticket.state["fc.bias"].div_(2)
    assert ticket.tensors_sha256() == before  # the same bytes again: the same hash
    ticket.state["fc.bias"] = ticket.state["fc.bias"] * 4
    assert ticket.tensors_sha256() not in (before, changed)
    name = next(iter(ticket.mask))
    ticket.mask[name].view(-1)[0] ^= True
    assert ticket.mask.sha256() != masks
    fresh = Mask({k: v.clone() for k, v in ticket.mask.items()})
    assert fresh.sha256() == ticket.mask.sha256()  # computed afresh, the same
