"""The Scheme V1 key file in its sparse layout (format version 2): only the key's positions
and values, rebuilt into the dense key bit for bit; key files of the old dense layout still
read; a crafted sparse key is one clear error."""

import json

import pytest
import safetensors
import torch
from helpers import assert_one_line_error, make_ticket, run, write_raw

from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.artifacts.sparse import INDEX_SUFFIX, VALUE_SUFFIX, sparse_key
from ticketctl.artifacts.ticket import read_header
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.protect import merge_parts, split_ticket


def header_length(path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


@pytest.fixture
def parts(tmp_path):
    ticket = make_ticket(seed=21, width=32)
    t = save_ticket(ticket, tmp_path / "t.safetensors")
    result = run("split", t, "--score", "betweenness", "--key-ratio", "0.1", "--key-mask",
                 tmp_path / "k.safetensors", "--locked", tmp_path / "l.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    return ticket, t, tmp_path / "k.safetensors", tmp_path / "l.safetensors"


def test_the_key_file_holds_only_its_weights(parts):
    """Past its header, the file is one int32 position and one float32 value per key weight,
    exactly: nothing of the rest of the model."""
    ticket, _, k, _ = parts
    key = load_ticket(k)
    n = key.mask.num_kept
    assert n == round(0.1 * ticket.mask.num_kept)
    assert k.stat().st_size == 8 + header_length(k) + n * (4 + 4)
    with safetensors.safe_open(str(k), "pt") as f:
        names = set(f.keys())
    assert names == {m + s for m in ticket.mask for s in (INDEX_SUFFIX, VALUE_SUFFIX)}
    assert read_header(k)["format_version"] == "3"
    assert "sparse" in json.loads(read_header(k)["ticket"])


def test_merge_of_a_sparse_key_is_bit_identical(parts, tmp_path):
    ticket, t, k, lk = parts
    result = run("merge", lk, k, "--out", tmp_path / "m.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "m.safetensors").read_bytes() == t.read_bytes()
    key = load_ticket(k)  # rebuilt dense: the split's own key, bit for bit
    expected, _ = split_ticket(ticket, "betweenness", 0.1)
    assert key.tensors_sha256() == expected.tensors_sha256()
    assert key.metadata() == expected.metadata()
    for name, v in expected.state.items():
        assert v.dtype == key.state[name].dtype
        assert v.reshape(-1).view(torch.uint8).equal(key.state[name].reshape(-1).view(torch.uint8))


def test_a_float64_key_keeps_its_dtypes(tmp_path, float64):
    ticket = make_ticket(seed=22)
    assert ticket.state["conv2.weight"].dtype == torch.float64
    key, locked = split_ticket(ticket, "omp", 0.2)
    k = save_ticket(key, tmp_path / "k.safetensors")
    assert k.stat().st_size == 8 + header_length(k) + key.mask.num_kept * (4 + 8)
    merged = merge_parts(locked, load_ticket(k))
    assert merged.tensors_sha256() == ticket.tensors_sha256()


def test_a_key_file_of_the_old_dense_layout_still_reads(tmp_path, parts):
    """A key written before the sparse layout: every tensor and mask, format version 1."""
    ticket, t, _, lk = parts
    key, _ = split_ticket(ticket, "betweenness", 0.1)
    meta = {**key.metadata(), "masks_sha256": key.mask.legacy_sha256(),
            "tensors_sha256": key.legacy_tensors_sha256()}  # as version 1 hashed
    old = write_raw(tmp_path / "old.key.safetensors", key.tensors(), meta, version=1)
    # 4 + 1 bytes for each of the 64,512 prunable weights and 4 for the 1,710 others, against
    # 8 for each of the 3,226 key weights (a tenth of a half-density ticket), headers aside
    assert old.stat().st_size > 8 * (tmp_path / "k.safetensors").stat().st_size
    assert load_ticket(old).tensors_sha256() == key.tensors_sha256()
    result = run("merge", lk, old, "--out", tmp_path / "m.safetensors")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "m.safetensors").read_bytes() == t.read_bytes()
    result = run("inspect", old, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["kind"] == "key"


def test_a_key_that_is_not_zero_elsewhere_is_written_densely(tmp_path):
    """Nothing is lost: a hand-made key with weights outside its mask keeps the old layout."""
    key, _ = split_ticket(make_ticket(seed=23), "omp", 0.1)
    odd = key.derive(state={**key.state, "fc.bias": torch.ones(10)})
    k = save_ticket(odd, tmp_path / "k.safetensors")
    assert read_header(k)["format_version"] == "3"
    assert "sparse" not in json.loads(read_header(k)["ticket"])
    assert load_ticket(k).tensors_sha256() == odd.tensors_sha256()
    negative_zero = key.derive(state={**key.state, "fc.bias": torch.full((10,), -0.0)})
    assert sparse_key(negative_zero.state, dict(negative_zero.mask)) is None


def crafted(tmp_path, change):
    """A sparse key file whose tensors or metadata `change` edits (hashes as recorded)."""
    key, _ = split_ticket(make_ticket(seed=24), "omp", 0.1)
    tensors, layout = sparse_key(key.state, dict(key.mask))
    meta = {**key.metadata(), "sparse": layout}
    change(tensors, meta)
    return write_raw(tmp_path / "bad.key.safetensors", tensors, meta, version=2)


IX, VAL = "conv2.weight" + INDEX_SUFFIX, "conv2.weight" + VALUE_SUFFIX


def _set(d, k, v):
    d[k] = v


BAD_KEYS = {
    "position out of range": (lambda t, m: t[IX].__setitem__(-1, 10 ** 6),
                               "increasing positions within the"),
    "negative position": (lambda t, m: t[IX].__setitem__(0, -1), "increasing positions"),
    "repeated position": (lambda t, m: t[IX].__setitem__(1, int(t[IX][0])),
                          "increasing positions"),
    "float positions": (lambda t, m: _set(t, IX, t[IX].float()), "int32 or int64 positions"),
    "positions in 2-d": (lambda t, m: _set(t, IX, t[IX].reshape(1, -1)), "int32 or int64"),
    "a value short": (lambda t, m: _set(t, VAL, t[VAL][:-1]), "one torch.float32 value per"),
    "values of another dtype": (lambda t, m: _set(t, VAL, t[VAL].double()),
                                "one torch.float32 value"),
    "no values": (lambda t, m: t.pop(VAL), "needs both"),
    "a stray tensor": (lambda t, m: _set(t, "fc.bias", torch.zeros(10)),
                       "holds only `.key_index` and `.key_value` tensors, not 'fc.bias'"),
    "a layer the model lacks": (lambda t, m: (_set(t, "conv9.weight" + INDEX_SUFFIX, t[IX] + 0),
                                              _set(t, "conv9.weight" + VALUE_SUFFIX, t[VAL] + 0)),
                                "'conv9.weight', which the architecture does not have"),
    "no dtypes": (lambda t, m: _set(m, "sparse", {}), "must name the dtype of every tensor"),
    "a dtype missing": (lambda t, m: m["sparse"]["dtypes"].pop("fc.bias"),
                        "must name the dtype of every tensor"),
    "an unknown dtype": (lambda t, m: m["sparse"]["dtypes"].__setitem__("fc.bias", "float7"),
                         "unknown dtype 'float7'"),
    "a sparse locked file": (lambda t, m: _set(m, "kind", "locked"),
                             "only a key file is written in the sparse layout"),
    "a NaN weight": (lambda t, m: t[VAL].__setitem__(0, float("nan")), "NaN or infinite"),
}


@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_a_crafted_sparse_key_is_one_line(tmp_path, case):
    change, message = BAD_KEYS[case]
    path = crafted(tmp_path, change)
    with pytest.raises(TicketctlError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_ticket(path)
    assert_one_line_error(run("inspect", path), 2, message)


def test_a_sparse_key_edited_without_its_hashes_is_altered(tmp_path):
    path = crafted(tmp_path, lambda t, m: t[VAL].mul_(2))
    with pytest.raises(CheckFailed, match="altered after it was written"):
        load_ticket(path)
    assert_one_line_error(run("inspect", path), 1, "altered after it was written")
