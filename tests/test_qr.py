"""Tests for the QR layer of scheme V2: layout from the standard, encoder/reader agreement,
Reed-Solomon decoding under random damage, the one-sided pass, and the zbar cross-check."""

from __future__ import annotations

import numpy as np
import pytest
import qrcode.base
import qrcode.constants
import qrcode.util
from PIL import Image

from ticketctl.errors import TicketctlError
from ticketctl.protect.qr import (
    QRCode,
    capacity_bytes,
    data_module_order,
    decode_matrix,
    encode,
    encoded_codewords,
    function_module_map,
    place_codewords,
    read_codewords,
)
from ticketctl.protect.qr.image import render_png, zbar_decode

H = qrcode.constants.ERROR_CORRECT_H

# ---------------------------------------------------------------- helpers


def damage_one_sided(qr: QRCode, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Turn a fraction of the dark data modules light, as further pruning would."""
    order = data_module_order(qr.version)
    observed = qr.matrix.copy()
    dark = order[observed[order[:, 0], order[:, 1]]]
    pick = dark[rng.choice(len(dark), int(round(fraction * len(dark))), replace=False)]
    observed[pick[:, 0], pick[:, 1]] = False
    return observed


def flip_random(qr: QRCode, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Flip a fraction of the data modules either way (two-sided damage)."""
    order = data_module_order(qr.version)
    observed = qr.matrix.copy()
    pick = order[rng.choice(len(order), int(round(fraction * len(order))), replace=False)]
    observed[pick[:, 0], pick[:, 1]] ^= True
    return observed


def message_for(version: int) -> str:
    """A message that needs exactly this version (longer than the previous one holds)."""
    return "".join(chr(ord("a") + i % 26) for i in range(capacity_bytes(version)))


# ---------------------------------------------------------------- encoder and reader agree


@pytest.mark.parametrize("version", range(1, 7))
def test_reader_matches_encoder_and_clean_decode(version: int):
    n = 17 + 4 * version
    blocks = qrcode.base.rs_blocks(version, H)
    total = sum(b.total_count for b in blocks)
    remainder = 0 if version == 1 else 7
    order = data_module_order(version)
    assert len(order) == n * n - function_module_map(version).sum() == 8 * total + remainder
    assert len({tuple(p) for p in order}) == len(order)
    message = message_for(version)
    for mask in range(8):
        qr = encode(message, mask_pattern=mask)
        assert (qr.version, qr.mask_pattern, qr.matrix.shape) == (version, mask, (n, n))
        expected = bytes(qrcode.util.create_data(
            version, H, [qrcode.util.QRData(message.encode(), mode=qrcode.util.MODE_8BIT_BYTE)]))
        assert encoded_codewords(qr) == expected
        assert read_codewords(qr.matrix, version, mask) == expected
        data = ~function_module_map(version)
        assert np.array_equal(place_codewords(expected, version, mask)[data], qr.matrix[data])
        result = decode_matrix(qr.matrix, version, mask)
        assert (result.message, result.method, result.corrected) == (message, "rs", 0)
        assert result.codewords == expected


def test_utf8_and_short_messages_round_trip():
    for message in ["", "é✓ owner", "0123456789"]:  # digits stay byte mode
        qr = encode(message, mask_pattern=5)
        assert decode_matrix(qr.matrix, qr.version, 5).message == message
    assert encode("signature").version == 2  # 9 bytes; version 1 holds 7
    assert encode("signature", version=4).version == 4


def test_function_modules_ignored_by_decoder():
    qr = encode("signature", version=3, mask_pattern=1)
    scribbled = qr.matrix.copy()
    fmap = function_module_map(3)
    scribbled[fmap] = np.random.default_rng(0).random(fmap.sum()) < 0.5
    assert decode_matrix(scribbled, 3, 1).message == "signature"
    assert decode_matrix(np.where(fmap, False, qr.matrix), 3, 1).method == "rs"


# ---------------------------------------------------------------- layout from the standard


def test_function_module_map_known_positions():
    for version in (1, 2, 7, 10):
        fmap = function_module_map(version)
        n = 17 + 4 * version
        for r, c in [(0, 0), (7, 7), (0, n - 1), (7, n - 8), (n - 1, 0), (n - 8, 7)]:
            assert fmap[r, c]  # finders with separators
        assert fmap[6, :].all() and fmap[:, 6].all()  # timing row and column
        assert fmap[n - 8, 8]  # the dark module
        assert fmap[8, :9].all() and fmap[:9, 8].all()  # format information copy 1
        assert fmap[8, n - 8:].all() and fmap[n - 7:, 8].all()  # format information copy 2
        for r, c in [(n - 1, n - 1), (9, 9), (n - 1, 9), (9, n - 1)]:
            assert not fmap[r, c]  # data modules
        assert fmap[n - 11, 0] == (version >= 7)  # version information only from v7
    fmap2 = function_module_map(2)
    assert fmap2[16:21, 16:21].all() and not fmap2[15, 15]  # alignment pattern at (18, 18)
    fmap7 = function_module_map(7)
    n7 = 45
    assert fmap7[:6, n7 - 11:n7 - 8].all() and fmap7[n7 - 11:n7 - 8, :6].all()
    assert not function_module_map(6)[:6, 41 - 11:41 - 8].any()
    assert fmap7[4:9, 20:25].all()  # alignment on the timing row (centre (6, 22))
    qr = encode("x" * 60, version=7, mask_pattern=0)
    assert decode_matrix(qr.matrix, 7, 0).message == "x" * 60


def test_data_module_order_starts_bottom_right():
    order = data_module_order(1)
    assert [tuple(p) for p in order[:4]] == [(20, 20), (20, 19), (19, 20), (19, 19)]
    assert 6 not in set(order[:, 1].tolist())  # the timing column carries no data


# ---------------------------------------------------------------- damage


def test_random_damage_below_capacity_decodes():
    for version, message in [(2, "signature"), (3, "owner: alice")]:
        qr = encode(message, version=version, mask_pattern=4)
        good = 0
        for seed in range(50):
            observed = flip_random(qr, 0.03, np.random.default_rng(seed))
            result = decode_matrix(observed, version, 4, one_sided=False)
            assert result.message in (None, message)
            good += result.message == message
            if result.message is not None:
                assert result.method == "rs" and result.corrected > 0
        assert good >= 45


def test_random_damage_far_above_capacity_never_wrong():
    for version, message in [(2, "signature"), (3, "owner: alice")]:
        qr = encode(message, version=version, mask_pattern=6)
        for seed in range(200):
            observed = flip_random(qr, 0.30, np.random.default_rng(1000 + seed))
            for one_sided in (False, True):
                result = decode_matrix(observed, version, 6, one_sided=one_sided)
                assert result.message in (None, message)
                assert (result.method == "failed") == (result.message is None)


ONE_SIDED_CASES = [(2, "signature"), (3, "owner: alice 2024")]


@pytest.mark.parametrize(("version", "message"), ONE_SIDED_CASES)
def test_one_sided_damage(version: int, message: str):
    qr = encode(message, version=version, mask_pattern=2)
    counts = {}
    for fraction in (0.05, 0.10, 0.15):
        plain = both = 0
        for seed in range(100):
            observed = damage_one_sided(qr, fraction, np.random.default_rng(seed))
            first = decode_matrix(observed, version, 2, one_sided=False)
            second = decode_matrix(observed, version, 2)
            assert first.message in (None, message) and second.message in (None, message)
            plain += first.message == message
            both += second.message == message
            if first.message is not None:
                assert second.message is not None and second.method == "rs"
            if second.method == "erasures":
                assert second.codewords == encoded_codewords(qr)
        counts[fraction] = (plain, both)
    assert counts[0.05][1] >= 95
    assert counts[0.10][1] >= counts[0.10][0] + 30
    assert counts[0.15][1] >= 90


def test_one_sided_heavy_damage_never_wrong():
    for version in (1, 2, 4):
        for message in ("ab", message_for(version)):  # padded and full-capacity payloads
            qr = encode(message, version=version, mask_pattern=7)
            for fraction in (0.3, 0.4, 0.6):
                for seed in range(15):
                    observed = damage_one_sided(qr, fraction, np.random.default_rng(seed))
                    assert decode_matrix(observed, version, 7).message in (None, message)


def test_wrong_mask_or_version_fails_cleanly():
    qr = encode("signature", version=2, mask_pattern=0)
    assert decode_matrix(qr.matrix, 2, 1).message is None
    with pytest.raises(TicketctlError, match="shape"):
        decode_matrix(qr.matrix, 3, 0)


# ---------------------------------------------------------------- errors


def test_encode_errors():
    limit = capacity_bytes(3)
    with pytest.raises(TicketctlError, match=f"at most {limit} bytes"):
        encode("x" * (limit + 1), max_version=3)
    assert encode("x" * limit, max_version=3).version == 3
    with pytest.raises(TicketctlError, match="at most 7 bytes"):
        encode("é" * 4, version=1)
    with pytest.raises(TicketctlError, match="mask pattern"):
        encode("signature", mask_pattern=9)
    with pytest.raises(TicketctlError, match="version"):
        encode("signature", version=41)
    with pytest.raises(TicketctlError, match="version"):
        capacity_bytes(0)
    assert [capacity_bytes(v) for v in (1, 2, 10, 40)] == [7, 14, 119, 1273]


# ---------------------------------------------------------------- image and zbar


def test_png_and_zbar_cross_check(tmp_path):
    qr = encode("owner: alice ✓", mask_pattern=3)
    path = render_png(qr.matrix, tmp_path / "qr.png", scale=4, border=4)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == ((qr.matrix.shape[0] + 8) * 4,) * 2
        assert image.getpixel((0, 0)) == 255 and image.getpixel((16, 16)) == 0
    assert zbar_decode(qr.matrix) == qr.message
    damaged = flip_random(qr, 0.45, np.random.default_rng(0))
    assert zbar_decode(damaged) is None
    with pytest.raises(TicketctlError, match="square"):
        render_png(np.zeros((5, 7), dtype=bool), tmp_path / "bad.png")
