"""Hostile inputs: a generated corpus of broken, crafted and oversized files, made from valid
files built here (a ticket, a signed ticket and its receipt, a V1 split pair, an Ed25519 key
pair) by setting one field at a time to a wrong type, a negative, huge or missing value, or by
crafting tensors and containers. Every case must end as one line that names what is wrong
(exit status 2, or 1 for a failed check), never as an "unexpected" error or a traceback; a
suspect given to `verify` is read whatever its header claims, so there a problem is a finding
beside the verdict. Nothing here trains a model: the whole corpus runs in seconds."""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_ticket, run, write_raw

from ticketctl.artifacts import save_ticket
from ticketctl.artifacts.convert import save_torch_prune
from ticketctl.artifacts.mask import tensor_digest
from ticketctl.artifacts.ticket import FORMAT_NAME, MASK_SUFFIX
from ticketctl.protect.receipt import load_private_key, save_receipt, write_keypair
from ticketctl.protect.signature import sign_ticket
from ticketctl.protect.split import split_ticket

SIGNED_LAYER = "conv2.weight"  # where the base signature sits (checked by the fixture)
OTHER_LAYER = "conv3.weight"  # a masked layer the signature does not use


# ---- the valid files every case starts from -----------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("hostile")
    ticket = make_ticket(seed=20, density_rate=0.6, width=32)
    key_path, pub_path = write_keypair(d / "owner")
    signed, receipt, _, _ = sign_ticket(ticket, "owner", private_key=load_private_key(key_path))
    assert [p.layer for p in receipt.placements] == [SIGNED_LAYER]
    unsigned = copy.deepcopy(receipt).sign(None)
    key, locked = split_ticket(ticket, "omp", 0.1)
    files = {
        "d": d, "key": key_path, "pub": pub_path,
        "ticket": save_ticket(ticket, d / "ticket.safetensors"),
        "signed": save_ticket(signed, d / "signed.safetensors"),
        "receipt": save_receipt(receipt, d / "receipt.json"),
        "unsigned": save_receipt(unsigned, d / "unsigned.json"),
        "v1key": save_ticket(key, d / "v1key.safetensors"),
        "locked": save_ticket(locked, d / "locked.safetensors"),
        "signed_pt": save_torch_prune(signed, d / "signed.pt"),
    }
    # the base files are good: what a case changes is what makes it fail
    assert run("inspect", files["ticket"]).exit_code == 0
    good = run("verify", files["signed"], "--receipt", files["receipt"], "--public-key",
               files["pub"])
    assert good.exit_code == 0, good.stderr
    assert run("verify", files["signed_pt"], "--receipt", files["unsigned"]).exit_code == 0
    return files


def header_of(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["ticket"])
    return load_file(str(path)), meta


def rehash(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The two hashes recomputed (docs/FORMAT.md), so a crafted file is consistent with
    itself and only the crafted part is wrong."""
    whole, masks = hashlib.sha256(), hashlib.sha256()
    for name in sorted(tensors):
        tensor_digest(whole, name, tensors[name])
        if name.endswith(MASK_SUFFIX):
            tensor_digest(masks, name[: -len(MASK_SUFFIX)], tensors[name].to(torch.uint8))
    return {**meta, "tensors_sha256": whole.hexdigest(), "masks_sha256": masks.hexdigest()}


def write_ticket(path: Path, tensors: dict[str, torch.Tensor], meta: dict | str) -> Path:
    text = meta if isinstance(meta, str) else json.dumps(meta)
    return write_raw(path, tensors, None,
                     header={"format": FORMAT_NAME, "format_version": "1", "ticket": text})


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def check_error(result, field: str, codes: tuple[int, ...] = (2,)) -> None:
    """One line on stderr naming `field`, the exit status, no traceback, nothing 'unexpected'."""
    text = result.stderr + result.stdout
    assert result.exit_code in codes, (result.exit_code, text[-2000:])
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text[-2000:]
    assert lines[0].startswith("error:")
    assert "unexpected" not in text and "Traceback" not in text, text[-2000:]
    assert field in lines[0], lines[0][:2000]


def check_finding(result, field: str, codes: tuple[int, ...] = (0,)) -> None:
    """A suspect with a broken part is still checked: the verdict, and a finding naming it."""
    assert result.exit_code in codes, (result.exit_code, result.stderr[-2000:])
    assert "unexpected" not in result.stderr and "Traceback" not in result.stderr
    doc = json.loads(result.stdout)
    assert any(field in f for f in doc["findings"]), doc["findings"]


# ---- ticket metadata: each field wrong in turn ---------------------------------------------
def setting(path: str, value: Any) -> Callable[[dict], dict]:
    """A metadata mutation: the dotted `path` set to `value` (or removed for DELETE)."""

    def apply(meta: dict) -> dict:
        out = copy.deepcopy(meta)
        *parents, last = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
        return out

    return apply


DELETE = object()
HUGE = 10 ** 30

META_CASES: list[tuple[str, Callable[[dict], Any], str]] = [
    *[(f"{f}-missing", setting(f, DELETE), f) for f in ("kind", "arch", "num_classes")],
    *[(f"kind-{n}", setting("kind", v), "kind") for n, v in
      (("int", 5), ("null", None), ("list", []), ("unknown", "bogus"))],
    *[(f"arch-{n}", setting("arch", v), "arch") for n, v in
      (("int", 5), ("list", ["digits_cnn"]), ("unknown", "nope"))],
    *[(f"arch_args-{n}", setting("arch_args", v), "arch_args") for n, v in
      (("float", 1.5), ("list", [1]), ("string", "width=32"))],
    *[(f"arch_args.width-{n}", setting("arch_args.width", v), "width") for n, v in
      (("string", "32"), ("negative", -1), ("zero", 0), ("huge", 10 ** 9), ("float", 32.5),
       ("bool", True))],
    ("arch_args.in_channels-huge", setting("arch_args.in_channels", 10 ** 9), "in_channels"),
    ("arch_args-unknown", setting("arch_args.depth", 3), "depth"),
    *[(f"num_classes-{n}", setting("num_classes", v), "num_classes") for n, v in
      (("string", "10"), ("float", 10.5), ("negative", -1), ("zero", 0), ("huge", HUGE),
       ("bool", True), ("null", None))],
    *[(f"class_names-{n}", setting("class_names", v), "class_names") for n, v in
      (("string", "abc"), ("ints", list(range(10))), ("dict", {"a": 1}))],
    *[(f"dataset-{n}", setting("dataset", v), "dataset") for n, v in
      (("list", ["digits"]), ("string", "digits"), ("int", 3))],
    *[(f"dataset.{k}-{n}", setting(f"dataset.{k}", v), f"dataset.{k}") for k, n, v in
      (("name", "int", 5), ("name", "list", ["digits"]), ("val_size", "string", "100"),
       ("val_size", "negative", -5), ("val_size", "huge", HUGE), ("split_seed", "huge", HUGE),
       ("split_seed", "string", "0"), ("data_dir", "int", 7), ("mean", "string", "0.5"),
       ("std", "strings", ["a"]))],
    *[(f"rewind_epoch-{n}", setting("rewind_epoch", v), "rewind_epoch") for n, v in
      (("string", "0"), ("negative", -1), ("float", 1.5), ("huge", HUGE))],
    *[(f"seed-{n}", setting("seed", v), "seed") for n, v in
      (("string", "1"), ("huge", HUGE), ("float", 0.5))],
    *[(f"extra-{n}", setting("extra", v), "extra") for n, v in
      (("list", [1]), ("string", "x"), ("int", 5))],
    *[(f"{h}-{n}", setting(h, v), h) for h in ("masks_sha256", "tensors_sha256") for n, v in
      (("int", 5), ("list", []), ("short", "abc"))],
    *[(f"{k}-{n}", setting(k, v), k) for k, n, v in
      (("density", "string", "0.5"), ("kept", "negative", -3), ("prunable", "list", []))],
    ("extra-deep", lambda m: json.dumps({**m, "extra": {"a": 0}}).replace(
        '{"a": 0}', '{"a": ' + nested(10 ** 4) + "}"), "nested"),
    ("extra-deep-900", lambda m: json.dumps({**m, "extra": {"a": 0}}).replace(
        '{"a": 0}', '{"a": ' + nested(900) + "}"), "nested"),
    ("metadata-list", lambda m: "[1, 2]", "metadata"),
    ("metadata-string", lambda m: '"ticket"', "metadata"),
    ("metadata-deep", lambda m: nested(10 ** 4), "nested"),
    ("metadata-not-json", lambda m: "{kind: ticket", "JSON"),
]


@pytest.mark.parametrize("name,mutate,field", META_CASES, ids=[c[0] for c in META_CASES])
def test_ticket_metadata(base, tmp_path, name, mutate, field):
    tensors, meta = header_of(base["ticket"])
    bad = write_ticket(tmp_path / "bad.safetensors", tensors, mutate(meta))
    check_error(run("inspect", bad), field)


@pytest.mark.parametrize("name,mutate,field", META_CASES, ids=[c[0] for c in META_CASES])
def test_suspect_metadata_is_a_finding(base, tmp_path, name, mutate, field):
    """The same lies in a signed suspect's header: its tensors are read as they are, the
    verdict is given, and the lie is reported."""
    tensors, meta = header_of(base["signed"])
    bad = write_ticket(tmp_path / "bad.safetensors", tensors, mutate(meta))
    check_finding(run("verify", bad, "--receipt", base["receipt"], "--public-key", base["pub"],
                      "--json"), field)


# ---- V1 split parts: the fields merge reads ----------------------------------------------
SPLIT_CASES = [
    ("parent_sha256-int", setting("extra.parent_sha256", 5), "parent_sha256"),
    ("parent_sha256-list", setting("extra.parent_sha256", ["a"]), "parent_sha256"),
    ("parent_metadata-list", setting("extra.parent_metadata", [1]), "parent_metadata"),
    ("parent_metadata-string", setting("extra.parent_metadata", "x"), "parent_metadata"),
    ("parent_metadata.kind-int", setting("extra.parent_metadata.kind", 3), "parent_metadata"),
    ("parent_metadata.seed-string", setting("extra.parent_metadata.seed", "x"),
     "parent_metadata"),
    ("parent_metadata.extra-list", setting("extra.parent_metadata.extra", [1]),
     "parent_metadata"),
    ("parent_metadata.dataset-list", setting("extra.parent_metadata.dataset", [1]),
     "parent_metadata"),
    ("key_ratio-string", setting("extra.key_ratio", "0.1"), "key_ratio"),
    ("key_weights-negative", setting("extra.key_weights", -1), "key_weights"),
]


@pytest.mark.parametrize("part", ["v1key", "locked"])
@pytest.mark.parametrize("name,mutate,field", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_split_part_metadata(base, tmp_path, part, name, mutate, field):
    tensors, meta = header_of(base[part])
    bad = write_ticket(tmp_path / "bad.safetensors", tensors, mutate(meta))
    parts = (bad, base["v1key"]) if part == "locked" else (base["locked"], bad)
    check_error(run("merge", *parts, "--out", tmp_path / "m.safetensors"), field)
    assert not (tmp_path / "m.safetensors").exists()


# ---- ticket tensors ------------------------------------------------------------------------
def retyped(name: str, dtype: torch.dtype) -> Callable[[dict], dict]:
    return lambda t: {**t, name: t[name].to(dtype)}


TENSOR_CASES: list[tuple[str, Callable[[dict], dict], str]] = [
    *[(f"weight-{str(dt).removeprefix('torch.')}", retyped(OTHER_LAYER, dt), OTHER_LAYER)
      for dt in (torch.bool, torch.int64, torch.uint8, torch.float16, torch.bfloat16,
                 torch.complex64)],
    ("bias-int32", retyped("fc.bias", torch.int32), "fc.bias"),
    ("num_batches_tracked-float", retyped("bn1.num_batches_tracked", torch.float32),
     "bn1.num_batches_tracked"),
    ("no-masks", lambda t: {k: v for k, v in t.items() if not k.endswith(MASK_SUFFIX)},
     "mask"),
    ("weight-scalar", lambda t: {**t, OTHER_LAYER: torch.tensor(0.0),
                                 OTHER_LAYER + MASK_SUFFIX: torch.tensor(0, dtype=torch.uint8)},
     OTHER_LAYER),
]


@pytest.mark.parametrize("name,mutate,field", TENSOR_CASES, ids=[c[0] for c in TENSOR_CASES])
def test_ticket_tensors(base, tmp_path, name, mutate, field):
    tensors, meta = header_of(base["ticket"])
    tensors = mutate(tensors)
    bad = write_ticket(tmp_path / "bad.safetensors", tensors, rehash(meta, tensors))
    check_error(run("inspect", bad), field)


# Every command that reads a ticket goes through the same boundary: a few of the cases above
# through each of them.
EVERY_COMMAND = ["extra-deep", "arch_args.width-huge", "dataset-list", "extra-list",
                 "num_classes-huge", "rewind_epoch-string", "dataset.val_size-string"]


def _commands(base: dict, bad: Path, out: Path) -> dict[str, list]:
    return {
        "inspect": ["inspect", bad],
        "convert": ["convert", bad, "--to", "torch-prune", "--out", out / "x.pt"],
        "sign": ["sign", bad, "--message", "m", "--out", out / "s.safetensors", "--receipt",
                 out / "r.json"],
        "split": ["split", bad, "--score", "omp", "--key-ratio", "0.1", "--key-mask",
                  out / "k.safetensors", "--locked", out / "l.safetensors"],
        "retrain": ["retrain", bad, "--out", out / "t.safetensors", "--epochs", "1"],
        "merge": ["merge", bad, base["v1key"], "--out", out / "m.safetensors"],
    }


@pytest.mark.parametrize("command", ["inspect", "convert", "sign", "split", "retrain", "merge"])
@pytest.mark.parametrize("case", EVERY_COMMAND + ["weight-bool", "no-masks"])
def test_every_command_refuses_a_bad_ticket(base, tmp_path, command, case):
    tensors, meta = header_of(base["ticket"])
    tensor_cases = {c[0]: c[1:] for c in TENSOR_CASES}
    if case in tensor_cases:
        mutate, field = tensor_cases[case]
        tensors = mutate(tensors)
        meta = rehash(meta, tensors)
    else:
        mutate, field = {c[0]: c[1:] for c in META_CASES}[case]
        meta = mutate(meta)
    bad = write_ticket(tmp_path / "bad.safetensors", tensors, meta)
    out = tmp_path / "out"
    out.mkdir()
    check_error(run(*_commands(base, bad, out)[command]), field)
    assert list(out.iterdir()) == []


def test_a_huge_metadata_string_is_refused_before_it_is_parsed(base, tmp_path):
    """The header of a safetensors file is bounded (here just past the bound): a crafted
    60 MB `kind` once hung every command. As a suspect the file's tensors are still read."""
    from ticketctl.artifacts.ticket import MAX_HEADER_BYTES

    for name in ("ticket", "signed"):
        tensors, meta = header_of(base[name])
        write_ticket(tmp_path / f"{name}.safetensors", tensors,
                     {**meta, "kind": "x" * MAX_HEADER_BYTES})
    check_error(run("inspect", tmp_path / "ticket.safetensors"), "header")
    check_finding(run("verify", tmp_path / "signed.safetensors", "--receipt", base["receipt"],
                      "--json"), "header")


# ---- receipts ------------------------------------------------------------------------------
def rsetting(path: str, value: Any) -> Callable[[dict], Any]:
    """A receipt mutation: `path` inside "receipt" (or at the top with a leading '/')."""
    if path.startswith("/"):
        top = path[1:]
        return lambda doc: {k: v for k, v in doc.items() if k != top} if value is DELETE \
            else {**doc, top: value}
    return lambda doc: {**doc, "receipt": setting(path, value)(doc["receipt"])}


def placement(**changes: Any) -> Callable[[dict], Any]:
    def apply(doc: dict) -> dict:
        out = copy.deepcopy(doc)
        p = out["receipt"]["placements"][0]
        for k, v in changes.items():
            if v is DELETE:
                p.pop(k)
            else:
                p[k] = v
        return out

    return apply


def per_layer(name: str, value: Any) -> Callable[[dict], Any]:
    """The signed layer's entry of a per-layer field (its name holds a dot)."""

    def apply(doc: dict) -> dict:
        out = copy.deepcopy(doc)
        out["receipt"][name][SIGNED_LAYER] = value
        return out

    return apply


def fingerprint(key: str, value: Any) -> Callable[[dict], Any]:
    def apply(doc: dict) -> dict:
        out = copy.deepcopy(doc)
        out["receipt"]["fingerprints"][SIGNED_LAYER][key] = value(
            out["receipt"]["fingerprints"][SIGNED_LAYER][key])
        return out

    return apply


RECEIPT_CASES: list[tuple[str, Callable[[dict], Any], str]] = [
    ("format-int", rsetting("/format", 5), "format"),
    ("version-string", rsetting("/version", "x"), "version"),
    ("version-negative", rsetting("/version", -1), "version"),
    ("version-huge", rsetting("/version", HUGE), "version"),
    ("receipt-list", rsetting("/receipt", []), "receipt"),
    ("receipt-missing", rsetting("/receipt", DELETE), "receipt"),
    *[(f"{f}-{n}", rsetting(f, v), f) for f, n, v in (
        ("created", "int", 5),
        ("message_sha256", "int", 5), ("message_sha256", "not-hex", "z" * 64),
        ("qr_version", "string", "1"), ("qr_version", "float", 1.5),
        ("qr_version", "zero", 0), ("qr_version", "negative", -1),
        ("qr_version", "41", 41), ("qr_version", "huge", 10 ** 9),
        ("mask_pattern", "8", 8), ("mask_pattern", "negative", -1),
        ("mask_pattern", "string", "2"),
        ("error_correction", "int", 5), ("error_correction", "unknown", "Z"),
        ("placements", "empty", []), ("placements", "dict", {}),
        ("placements", "string", "conv2"), ("placements", "ints", [5]),
        ("matrix", "int", 5), ("matrix", "odd-length", "abc"), ("matrix", "short", "00"),
        ("matrix", "not-hex", "zz" * 56), ("matrix", "long", "00" * 57),
        ("matrix_sha256", "list", []),
        ("data_modules", "negative", -1), ("data_modules", "string", "208"),
        ("support", "float", 1e9), ("support", "huge", 10 ** 9), ("support", "zero", 0),
        ("support", "negative", -1), ("support", "string", "3"),
        ("signed_ticket_sha256", "int", 5), ("signed_masks_sha256", "list", []),
        ("magnitude_floor", "string", "x"), ("magnitude_floor", "negative", -1.0),
        ("arch", "int", 5), ("ticketctl", "list", []),
        ("kept_counts", "list", []), ("kept_counts", "int", 5),
        ("fingerprints", "list", []), ("fingerprints", "string", "x"),
        ("trigger_sha256", "int", 5), ("trigger_n", "negative", -1),
        ("trigger_n", "string", "5"), ("trigger_committed", "int", 5),
    )],
    ("placements-missing", rsetting("placements", DELETE), "placements"),
    ("placements.layer-missing", placement(layer=DELETE), "layer"),
    ("placements.layer-int", placement(layer=5), "layer"),
    ("placements.row-missing", placement(row=DELETE), "row"),
    ("placements.row-negative", placement(row=-1), "row"),
    ("placements.row-string", placement(row="0"), "row"),
    ("placements.row-huge", placement(row=HUGE), "row"),
    ("placements.col-float", placement(col=1.5), "col"),
    ("placements.view-string", placement(view="32x288"), "view"),
    ("placements.view-arity", placement(view=[32]), "view"),
    ("placements.view-zero", placement(view=[0, 288]), "view"),
    ("placements.view-huge", placement(view=[HUGE, 288]), "view"),
    ("placements.block-float", placement(block=[1, 9.5]), "block"),
    ("placements.block-alone", placement(view=DELETE), "view"),
    ("placements.block-over-view", placement(block=[1, 289]), "block"),
    ("kept_counts-negative", per_layer("kept_counts", -1), "kept_counts"),
    ("kept_counts-string", per_layer("kept_counts", "9"), "kept_counts"),
    ("kept_counts-huge", per_layer("kept_counts", HUGE), "kept_counts"),
    ("fingerprints-layer-list", per_layer("fingerprints", []), "fingerprints"),
    ("fingerprints.rows-string", fingerprint("rows", lambda v: "x"), "rows"),
    ("fingerprints.rows-ragged", fingerprint("rows", lambda v: [v[0], v[1][:3]] + v[2:]),
     "rows"),
    ("fingerprints.rows-strings", fingerprint("rows", lambda v: [["a"] * len(v[0])] + v[1:]),
     "rows"),
    ("fingerprints.row_patterns-negative",
     fingerprint("row_patterns", lambda v: [[-1, 0, 1]] + v[1:]), "row_patterns"),
    ("fingerprints.row_patterns-arity",
     fingerprint("row_patterns", lambda v: [[0, 1]] + v[1:]), "row_patterns"),
    ("fingerprints.row_patterns-channel",
     fingerprint("row_patterns", lambda v: [[99999, 0, 1]] + v[1:]), "row_patterns"),
    ("fingerprints.col_patterns-pattern",
     fingerprint("col_patterns", lambda v: [[0, 2 ** 20, 1]] + v[1:]), "col_patterns"),
]


def test_a_receipt_view_larger_than_the_layer_is_for_another_ticket(base, tmp_path):
    """Well-formed, but the layer has fewer weights than the view reads: exit 1 before any
    tensor is reshaped."""
    doc = placement(view=[1 << 20, 1 << 20])(json.loads(base["unsigned"].read_text()))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    check_error(run("verify", base["signed"], "--receipt", bad), "another ticket", codes=(1,))


@pytest.mark.parametrize("name,mutate,field", RECEIPT_CASES, ids=[c[0] for c in RECEIPT_CASES])
def test_receipt(base, tmp_path, name, mutate, field):
    doc = json.loads(base["unsigned"].read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(mutate(doc)))
    check_error(run("verify", base["signed"], "--receipt", bad), field)


SIGNED_RECEIPT_CASES = [
    ("public_key-int", rsetting("/public_key", 5), "public_key"),
    ("public_key-garbage", rsetting("/public_key", "not base64 at all!"), "public_key"),
    ("public_key-short", rsetting("/public_key", base64.b64encode(b"short").decode()),
     "public_key"),
    ("signature-int", rsetting("/signature", 12), "signature"),
    ("signature-garbage", rsetting("/signature", "***"), "signature"),
    ("signature-short", rsetting("/signature", base64.b64encode(b"x" * 10).decode()),
     "signature"),
]


@pytest.mark.parametrize("name,mutate,field", SIGNED_RECEIPT_CASES,
                         ids=[c[0] for c in SIGNED_RECEIPT_CASES])
def test_signed_receipt(base, tmp_path, name, mutate, field):
    doc = json.loads(base["receipt"].read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(mutate(doc)))
    check_error(run("verify", base["signed"], "--receipt", bad, "--public-key", base["pub"]),
                field)


RAW_RECEIPTS = [
    ("not-json", b"{receipt", "JSON"),
    ("binary", bytes(range(256)), "receipt"),
    ("list", b"[1, 2]", "receipt"),
    ("deep", nested(10 ** 4).encode(), "nested"),
    ("deep-inside", b'{"format": "ticketctl-receipt", "version": 1, "receipt": {"x": '
     + nested(10 ** 4).encode() + b"}}", "nested"),
]


@pytest.mark.parametrize("name,data,field", RAW_RECEIPTS, ids=[c[0] for c in RAW_RECEIPTS])
def test_raw_receipt(base, tmp_path, name, data, field):
    bad = tmp_path / "bad.json"
    bad.write_bytes(data)
    check_error(run("verify", base["signed"], "--receipt", bad), field)


def test_a_huge_receipt_is_refused_unread(base, tmp_path):
    from ticketctl.protect.receipt import MAX_RECEIPT_BYTES

    bad = tmp_path / "bad.json"
    with open(bad, "wb") as f:
        f.truncate(MAX_RECEIPT_BYTES + 1)
    check_error(run("verify", base["signed"], "--receipt", bad), "bytes")


def test_support_is_bounded_by_what_the_kernels_hold(base, tmp_path, monkeypatch):
    """A receipt may claim any support within its bound; reading stops at the signed layer's
    kernel size (a 3x3 kernel cannot back a module with more weights), so on a model without
    the code the decoder tries 9 thresholds and plain RS once, not 4096 (a claimed 10^9 once
    made decoding run for minutes)."""
    import ticketctl.protect.signature as signature
    from ticketctl.protect.receipt import load_receipt
    from ticketctl.protect.suspect import open_suspect

    doc = json.loads(base["unsigned"].read_text())
    doc["receipt"]["support"] = 4096
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    receipt = load_receipt(path)
    calls = []
    real = signature.decode_matrix

    def counting(*args, **kwargs):
        calls.append(kwargs.get("one_sided", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(signature, "decode_matrix", counting)
    unsigned = open_suspect(base["ticket"])  # the same network without the code
    result, threshold = signature._decode_any(unsigned.masks, receipt.placements, receipt)
    assert result.message is None and threshold is None
    assert calls == [True] * 9 + [False]
    signed = open_suspect(base["signed"])
    result, threshold = signature._decode_any(signed.masks, receipt.placements, receipt)
    assert result.message == "owner" and threshold == 1


# ---- Ed25519 key files ---------------------------------------------------------------------
def _ec_private() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def _ec_public() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _encrypted(base: dict) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return load_private_key(base["key"]).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"))


KEY_FILES: list[tuple[str, Callable[[dict], bytes | None]]] = [
    ("folder", lambda b: None),
    ("empty", lambda b: b""),
    ("garbage", lambda b: b"not a key\n"),
    ("binary", lambda b: bytes(range(256)) * 4),
    ("huge", lambda b: b"A" * (2 ** 20 + 1)),
    ("pem-truncated", lambda b: b["key"].read_bytes()[:40]),
    ("other-half", lambda b: (b["pub"] if b["_want"] == "private" else b["key"]).read_bytes()),
    ("ec", lambda b: _ec_private() if b["_want"] == "private" else _ec_public()),
    ("encrypted", lambda b: _encrypted(b) if b["_want"] == "private" else b"-----BEGIN "
     b"PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
]


def _key_file(base: dict, tmp_path: Path, make: Callable, want: str) -> Path:
    bad = tmp_path / "bad.key"
    data = make({**base, "_want": want})
    if data is None:
        bad.mkdir()
    else:
        bad.write_bytes(data)
    return bad


@pytest.mark.parametrize("name,make", KEY_FILES, ids=[c[0] for c in KEY_FILES])
def test_signing_key_file(base, tmp_path, name, make):
    bad = _key_file(base, tmp_path, make, "private")
    check_error(run("sign", base["ticket"], "--message", "m", "--out", tmp_path / "s.st",
                    "--receipt", tmp_path / "r.json", "--signing-key", bad), "key")
    assert not (tmp_path / "s.st").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("name,make", KEY_FILES, ids=[c[0] for c in KEY_FILES])
def test_public_key_file(base, tmp_path, name, make):
    bad = _key_file(base, tmp_path, make, "public")
    check_error(run("verify", base["signed"], "--receipt", base["receipt"], "--public-key", bad),
                "key")


# ---- folders and other non-files where a file is expected ----------------------------------
def test_folders_where_files_are_expected(base, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for args in (["verify", base["signed"], "--receipt", folder],
                 ["verify", base["signed"], "--receipt", base["receipt"], "--null-rate", folder],
                 ["merge", base["locked"], folder, "--out", tmp_path / "m.st"],
                 ["merge", folder, base["v1key"], "--out", tmp_path / "m.st"],
                 ["inspect", folder], ["verify", folder, "--receipt", base["receipt"]],
                 ["convert", folder, "--out", tmp_path / "c.st"]):
        check_error(run(*args), "folder")


# ---- calibration files (verify --null-rate) ------------------------------------------------
CALIBRATIONS = [
    ("not-json", b"{null", "calibration"),
    ("list", b"[0.1]", "calibration"),
    ("missing", b'{"confidence": 0.99}', "null_rate"),
    ("string", b'{"null_rate": "0.1"}', "null_rate"),
    ("above-one", b'{"null_rate": 2}', "null_rate"),
    ("negative", b'{"null_rate": -0.1}', "null_rate"),
    ("nan", b'{"null_rate": NaN}', "null_rate"),
    ("inf", b'{"null_rate": 1e400}', "null_rate"),
    ("sha-int", b'{"null_rate": 0.1, "trigger_sha256": 5}', "trigger_sha256"),
    ("deep", b'{"null_rate": 0.1, "x": ' + nested(10 ** 4).encode() + b"}", "nested"),
]


@pytest.mark.parametrize("name,data,field", CALIBRATIONS, ids=[c[0] for c in CALIBRATIONS])
def test_calibration_file(base, tmp_path, name, data, field):
    bad = tmp_path / "calibration.json"
    bad.write_bytes(data)
    check_error(run("verify", base["signed"], "--receipt", base["receipt"], "--null-rate", bad),
                field)


@pytest.mark.parametrize("value", ["nan", "2", "-0.5", "inf"])
def test_null_rate_numbers(base, value):
    check_error(run("verify", base["signed"], "--receipt", base["receipt"], "--null-rate", value),
                "--null-rate")


# ---- torch checkpoints (convert, and verify of a .pt suspect) ------------------------------
def _saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _deflated(data: bytes) -> bytes:
    """The same zip with every entry compressed: torch reads it, and a few kilobytes expand
    to whatever the entries claim."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            entry = zipfile.ZipInfo(info.filename, info.date_time)
            entry.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(entry, src.read(info.filename))
    return out.getvalue()


def _legacy_claim(numel_bytes: bytes) -> Callable[[dict], bytes]:
    """A legacy (pre-zip) torch file whose storage claims another size than it holds."""

    def make(base: dict) -> bytes:
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(1)}, buf, _use_new_zipfile_serialization=False)
        return buf.getvalue().replace(b"cpuq\x06K\x01N", b"cpuq\x06" + numel_bytes + b"N")

    return make


def _with(extra: dict[str, Any]) -> Callable[[dict], bytes]:
    """The signed ticket's torch-prune export with crafted entries added."""
    return lambda b: _saved({**torch.load(b["signed_pt"], weights_only=True), **extra})


STRIDE0 = torch.zeros(1).expand(10 ** 9)  # 4 bytes of data, 4 GB once copied
OVERLAP = torch.zeros(2 ** 16).as_strided((2 ** 15, 2 ** 15), (1, 1))  # 256 KB, 4 GB copied

# name, file, what the convert error names, what verify makes of it as a suspect: a finding
# naming this beside the verdict (the signature sits in conv2, so the verdict stands), a
# one-line error naming this (nothing readable), or None (nothing to report: the checks
# that ran read none of the odd tensors)
TORCH_CASES: list[tuple[str, Callable[[dict], bytes], str, tuple[str, str] | None]] = [
    ("stride-0", _with({"junk": STRIDE0}), "junk", ("finding", "junk")),
    ("overlapping", _with({"junk": OVERLAP}), "junk", ("finding", "junk")),
    ("stride-0-weight", _with({"conv3.weight_orig": torch.zeros(1).expand(64, 32, 3, 3)}),
     "conv3.weight", ("finding", "conv3.weight")),
    ("deflated", lambda b: _deflated(_saved({"w": torch.zeros(10 ** 6)})), "compress",
     ("error", "compress")),
    ("bool-weight", _with({"conv3.weight_orig": torch.ones(64, 32, 3, 3, dtype=torch.bool)}),
     "conv3.weight", ("finding", "conv3.weight")),
    ("int-weight", _with({"conv3.weight_orig": torch.ones(64, 32, 3, 3, dtype=torch.int64)}),
     "conv3.weight", ("finding", "conv3.weight")),
    ("complex-weight", _with({"conv3.weight_orig": torch.ones(64, 32, 3, 3,
                                                              dtype=torch.complex64)}),
     "conv3.weight", ("finding", "conv3.weight")),
    ("scalar-conv1", _with({"conv1.weight": torch.tensor(1.0)}), "conv1.weight", None),
    ("vector-fc", _with({"fc.weight": torch.ones(10)}), "fc.weight", None),
    ("legacy-claim", _legacy_claim(b"J\x00\xca\x9a;"), "checkpoint",
     ("error", "checkpoint")),
    ("legacy-claim-huge", _legacy_claim(b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x40"),
     "checkpoint", ("error", "checkpoint")),
    ("top-level-list", lambda b: _saved([torch.zeros(3)]), "state dict", ("error", "state dict")),
    ("state_dict-list", lambda b: _saved({"state_dict": [torch.zeros(3)]}), "state dict",
     ("error", "state dict")),
]


@pytest.mark.parametrize("name,make,field,suspect", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_torch_checkpoint_convert(base, tmp_path, name, make, field, suspect):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(make(base))
    result = run("convert", bad, "--out", tmp_path / "t.safetensors", "--json")
    if name in WEIGHTS_ONLY:
        # any torch-prune state dict imports: tensors that fit no built-in make a ticket of
        # no known network, said so, its masks checked against their own weights
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["arch"] == "none"
        return
    check_error(result, field)
    assert not (tmp_path / "t.safetensors").exists()


# a torch-prune export whose unmasked tensors fit no built-in any more
WEIGHTS_ONLY = {"scalar-conv1", "vector-fc"}


@pytest.mark.parametrize("name,make,field,suspect", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_torch_checkpoint_suspect(base, tmp_path, name, make, field, suspect):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(make(base))
    result = run("verify", bad, "--receipt", base["unsigned"], "--json")
    if suspect is None:
        assert result.exit_code == 0, result.stderr
        assert "unexpected" not in result.stderr and "Traceback" not in result.stderr
    elif suspect[0] == "error":
        check_error(result, suspect[1])
    else:
        check_finding(result, suspect[1])


def test_inferring_an_architecture_builds_no_network(monkeypatch):
    """A plain state dict's architecture is guessed from names and shapes alone, against
    networks on the meta device: a crafted head of 50,000 classes (a few bytes in a file)
    would otherwise be built at full size for every registered network."""
    import ticketctl.artifacts.convert as convert
    from ticketctl.errors import TicketctlError
    from ticketctl.models import registry

    devices = []
    for name, builder in list(registry.ARCHS.items()):
        def recording(*args, _builder=builder, **kwargs):
            model = _builder(*args, **kwargs)
            devices.append(next(model.parameters()).device.type)
            return model

        monkeypatch.setitem(registry.ARCHS, name, recording)
    state = {"conv1.weight": torch.zeros(64, 3, 3, 3),
             "fc.weight": torch.zeros(1).expand(50_000, 2048)}
    with pytest.raises(TicketctlError, match="no registered architecture"):
        convert.infer_arch(state)
    assert len(devices) == len(registry.ARCHS) and set(devices) == {"meta"}
    good = make_ticket(width=8)
    assert convert.infer_arch(good.state) == ("digits_cnn", {"in_channels": 1, "width": 8}, 10)


def test_architecture_arguments_are_bounded_before_building():
    from ticketctl.errors import TicketctlError
    from ticketctl.models import build_model

    for args in ({"width": 10 ** 9}, {"width": 0}, {"in_channels": -1}, {"width": "8"},
                 {"width": True}):
        with pytest.raises(TicketctlError, match="width|in_channels"):
            build_model("digits_cnn", 10, **args)
    with pytest.raises(TicketctlError, match="classes"):
        build_model("digits_cnn", 10 ** 9)
