"""Hostile trigger sets: a folder's labels.txt naming files outside the folder, images that
decode to gigabytes, and .npz arrays of the wrong type, shape, values or size. Each is one
clear error (exit 2 through the CLI) before anything large is read."""

import io
import struct
import warnings
import zipfile
import zlib

import numpy as np
import pytest
from helpers import assert_one_line_error, make_ticket, run
from PIL import Image

from ticketctl.artifacts import save_ticket
from ticketctl.data import images as image_io
from ticketctl.data.images import read_rgb
from ticketctl.errors import TicketctlError
from ticketctl.protect import trigger as trigger_mod
from ticketctl.protect.trigger import load_trigger_set


def png(path, size=(8, 8), value=0):
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def png_claiming(path, w, h):
    """A tiny PNG whose header claims w x h grey pixels (one row of data): what a
    decompression bomb looks like before it is decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                     chunk(b"IDAT", zlib.compress(b"\0" * (w + 1))) + chunk(b"IEND", b""))
    return path


def folder(tmp_path, lines, name="set"):
    d = tmp_path / name
    d.mkdir()
    png(d / "a.png", value=10)
    png(d / "b.png", value=200)
    (d / "labels.txt").write_text("".join(line + "\n" for line in lines))
    return d


@pytest.fixture
def ticket_file(tmp_path):
    return save_ticket(make_ticket(seed=5), tmp_path / "t.safetensors")


# ---- a folder's labels.txt ---------------------------------------------------------------------

def test_a_folder_set_loads_with_links_that_stay_inside(tmp_path):
    d = folder(tmp_path, ["a.png 3", "", "sub/c.png 1", "link.png 7"])
    (d / "sub").mkdir()
    png(d / "sub" / "c.png", size=(16, 16), value=60)  # resized to the first image's size
    (d / "link.png").symlink_to(d / "b.png")
    ts = load_trigger_set(d)
    assert ts.labels.tolist() == [3, 1, 7]
    assert ts.images.shape == (3, 8, 8, 3)
    assert [int(ts.images[i].max()) for i in range(3)] == [10, 60, 200]


@pytest.mark.parametrize("line, message", [
    ("{outside} 1", "line 2: .* points outside the trigger folder"),
    ("../outside.png 1", "line 2: '../outside.png' points outside the trigger folder"),
    ("sub/../../outside.png 1", "line 2: .* points outside"),
    ("escape.png 1", "line 2: 'escape.png' is a link to a file outside the trigger folder"),
    ("a.png", "line 2: expected 'filename label'"),
    ("a.png three", "line 2: label 'three' is not an integer"),
    ("a.png -1", "line 2: label -1 is negative"),
    ("missing.png 1", "line 2: no image file 'missing.png'"),
    ("notes.txt 1", "line 2 \\(notes.txt\\) is not a readable image"),
])
def test_labels_naming_files_outside_or_bad_lines_are_refused(tmp_path, line, message):
    outside = png(tmp_path / "outside.png")
    d = folder(tmp_path, ["a.png 0", line.format(outside=outside)])
    (d / "escape.png").symlink_to(outside)
    (d / "notes.txt").write_text("not an image")
    with pytest.raises(TicketctlError, match=message):
        load_trigger_set(d)


def test_a_labels_file_linked_from_outside_is_refused(tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    png(d / "a.png")
    (tmp_path / "elsewhere.txt").write_text("a.png 1\n")
    (d / "labels.txt").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(TicketctlError, match="labels.txt is a link to a file outside"):
        load_trigger_set(d)


def test_an_outside_name_through_the_cli_is_one_line(tmp_path, ticket_file):
    d = folder(tmp_path, ["a.png 0", "/etc/passwd 1"])
    result = run("verify", ticket_file, "--trigger", d)
    assert_one_line_error(result, 2, "labels.txt line 2: '/etc/passwd' points outside the "
                                     "trigger folder")


# ---- images that decode to gigabytes -----------------------------------------------------------

@pytest.mark.parametrize("side", [5000, 12000, 20000])
def test_an_image_claiming_too_many_pixels_is_refused_before_decoding(tmp_path, side):
    """5000: where Pillow (its bound set to ours) only warns; 12000 and 20000: where it
    refuses. Each is the same error, with or without the warning filter."""
    bomb = png_claiming(tmp_path / "bomb.png", side, side)
    assert bomb.stat().st_size < 20_000
    for action in ("error", "ignore"):  # a caller may have reset the filters
        with warnings.catch_warnings():
            warnings.simplefilter(action, Image.DecompressionBombWarning)
            with pytest.raises(TicketctlError, match=f"the image claims ({side}x{side}|"
                               f"{side * side:,}) pixels, more than the 4096x4096 pixels"):
                read_rgb(bomb)


def test_an_image_at_the_bound_is_read(tmp_path):
    ok = png(tmp_path / "ok.png", size=(4096, 1), value=7)
    assert read_rgb(ok).shape == (1, 4096, 3)


def test_a_bomb_in_a_trigger_folder_names_its_line(tmp_path, ticket_file):
    d = folder(tmp_path, ["a.png 0", "bomb.png 1"])
    png_claiming(d / "bomb.png", 12000, 12000)
    result = run("verify", ticket_file, "--trigger", d)
    assert_one_line_error(result, 2, "labels.txt line 2 (bomb.png): the image claims "
                                     "144,000,000 pixels, more than the 4096x4096")


def test_a_bomb_in_an_image_dataset_is_refused(tmp_path):
    """The imagefolder dataset reads its files through the same bounded reader."""
    from ticketctl.data import load_dataset

    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        png(tmp_path / split / "cat" / "a.png")
    png_claiming(tmp_path / "train" / "cat" / "b.png", 20000, 20000)
    with pytest.raises(TicketctlError, match="b.png: the image claims 400,000,000 pixels"):
        load_dataset("imagefolder", tmp_path, val_size=0)


def test_an_image_file_too_large_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(image_io, "MAX_FILE_BYTES", 64)
    with pytest.raises(TicketctlError, match="the file holds"):
        read_rgb(png(tmp_path / "a.png", size=(32, 32)))


def test_only_raster_formats_are_opened(tmp_path):
    eps = tmp_path / "x.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(TicketctlError, match="is not a readable image"):
        read_rgb(eps)


# ---- .npz arrays -------------------------------------------------------------------------------

def npz(path, images, labels, compressed=True):
    (np.savez_compressed if compressed else np.savez)(path, images=images, labels=labels)
    return path


def npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def npz_claiming(path, shape, descr="|u1", n_labels=4):
    """An .npz whose images header claims `shape`, followed by a few bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", buf.getvalue() + b"\0" * 64)
        z.writestr("labels.npy", npy_bytes(np.zeros(n_labels, np.int64)))
    return path


GOOD_IMAGES = np.zeros((4, 8, 8, 1), np.uint8)
GOOD_LABELS = np.array([0, 1, 2, 3])


@pytest.mark.parametrize("images, labels, message", [
    (np.full((4, 8, 8, 1), np.nan, np.float32), GOOD_LABELS, "`images` holds float32 values"),
    (np.zeros((4, 8, 8, 1), np.float64), GOOD_LABELS, "`images` holds float64 values"),
    (np.zeros((4, 8, 8, 1), np.complex64), GOOD_LABELS, "`images` holds complex64 values"),
    (np.zeros((4, 8, 8, 1), bool), GOOD_LABELS, "`images` holds bool values"),
    (np.full((4, 8, 8, 1), -1, np.int16), GOOD_LABELS, "pixels run from -1 to -1"),
    (np.full((4, 8, 8, 1), 300, np.int32), GOOD_LABELS, "pixels run from 300 to 300"),
    (np.zeros((4, 8), np.uint8), GOOD_LABELS, "images have shape \\[4, 8\\]"),
    (np.zeros((4, 0, 8, 1), np.uint8), GOOD_LABELS, "images have shape \\[4, 0, 8, 1\\]"),
    (GOOD_IMAGES, np.array([0.0, 1.0, 2.0, np.nan]), "`labels` holds float64 values"),
    (GOOD_IMAGES, np.array([0, 1, 2, 3], np.complex128), "`labels` holds complex128"),
    (GOOD_IMAGES, np.array([0, -1, 2, 3]), "trigger label -1 is negative"),
    (GOOD_IMAGES, np.array([[0, 1], [2, 3]]), "labels have shape \\[2, 2\\]"),
    (GOOD_IMAGES, np.array([0, 1, 2]), "4 trigger images but 3 labels"),
    (GOOD_IMAGES, np.array(["0", "1", "2", "3"]), "`labels` holds <U1 values"),
])
def test_npz_values_of_the_wrong_kind_are_refused(tmp_path, images, labels, message):
    with pytest.raises(TicketctlError, match=message):
        load_trigger_set(npz(tmp_path / "set.npz", images, labels))


def test_npz_of_other_integer_types_in_range_loads(tmp_path):
    images = np.arange(4 * 8 * 8, dtype=np.int64).reshape(4, 8, 8) % 256
    ts = load_trigger_set(npz(tmp_path / "set.npz", images, np.array([0, 9, 2, 3], np.uint8),
                              compressed=False))
    assert ts.images.dtype == np.uint8 and ts.images.shape == (4, 8, 8, 1)
    assert np.array_equal(ts.images[..., 0], images.astype(np.uint8))
    assert ts.labels.dtype == np.int64 and ts.labels.tolist() == [0, 9, 2, 3]


def test_npz_claiming_a_huge_array_is_refused_before_reading(tmp_path):
    """The header claims 100,000 images of 1024 x 1024 (100 GB) in a file of a few hundred
    bytes: the claim is refused from the header, nothing is allocated."""
    path = npz_claiming(tmp_path / "bomb.npz", (100_000, 1024, 1024, 1))
    assert path.stat().st_size < 2_000
    with pytest.raises(TicketctlError, match="would take 104,857,600,000 bytes"):
        load_trigger_set(path)
    path = npz_claiming(tmp_path / "wide.npz", (1, 8192, 8192, 1))
    with pytest.raises(TicketctlError, match="8192x8192 pixels are more than the 4096x4096"):
        load_trigger_set(path)


def test_npz_member_expanding_past_the_bound_is_refused_unread(tmp_path, monkeypatch):
    """A compressed member whose directory entry says it expands past the bound is refused
    from the directory alone (the zeros below compress about a thousandfold)."""
    monkeypatch.setattr(trigger_mod, "MAX_SET_BYTES", 1000)
    path = npz(tmp_path / "big.npz", np.zeros((100, 32, 32, 1), np.uint8), np.zeros(100, int))
    assert path.stat().st_size < 5_000
    with pytest.raises(TicketctlError, match="`images` decompresses to 102,528 bytes"):
        load_trigger_set(path)


def test_npz_that_lies_about_its_data_is_refused(tmp_path):
    path = npz_claiming(tmp_path / "short.npz", (4, 8, 8, 1))  # 256 pixels, 64 bytes of data
    with pytest.raises(TicketctlError, match="cannot read `images`.*truncated"):
        load_trigger_set(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"not a zip at all"), "is not a trigger set .npz"),
    (lambda p: np.savez(p, pictures=GOOD_IMAGES, labels=GOOD_LABELS), "no `images` array"),
    (lambda p: np.save(p, GOOD_IMAGES), "is not a trigger set .npz"),
    (lambda p: zipfile.ZipFile(p, "w").writestr("images.npy", b"\x93NUMPY garbage"),
     "`images` is not a readable .npy array"),
])
def test_files_that_are_not_trigger_sets(tmp_path, make, message):
    path = tmp_path / "x.npz"
    make(path)
    if not path.exists():  # np.save appends .npy
        path = tmp_path / "x.npz.npy"
    with pytest.raises(TicketctlError, match=message):
        load_trigger_set(path)


def test_a_nan_set_through_the_cli_is_one_line(tmp_path, ticket_file):
    path = npz(tmp_path / "nan.npz", np.full((4, 8, 8, 1), np.nan), GOOD_LABELS)
    assert_one_line_error(run("verify", ticket_file, "--trigger", path), 2,
                          "`images` holds float64 values; trigger images must be uint8")


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "-n must be at least 1"),
    (["--size", "0"], "--size must be 1..4096"),
    (["--size", "100000"], "--size must be 1..4096"),
    (["--channels", "2"], "--channels must be 1 (grey) or 3 (RGB)"),
    (["--classes", "1"], "--classes must be at least 2"),
    (["-n", "100000", "--size", "64"], "would take more than the 256 MiB"),
])
def test_trigger_new_refuses_sets_it_could_not_read_back(tmp_path, args, message):
    assert run("keygen", "--out", tmp_path / "owner").exit_code == 0
    result = run("trigger", "new", "--signing-key", tmp_path / "owner.key", "--out",
                 tmp_path / "set.npz", *args)
    assert_one_line_error(result, 2, message)
    assert not (tmp_path / "set.npz").exists()
