"""Level-H QR codes as bare module matrices: encode a message, and decode a damaged matrix
directly (no image processing), with a second pass made for one-sided damage.

Scheme V2 writes the owner's message into which kernels a pruned layer keeps. Further pruning
can only turn dark (kept) modules light, so a module observed dark is certain while a light one
may be damage. The first pass is the ordinary reader (unmask, de-interleave, Reed-Solomon per
block). The second pass uses the certain modules: Reed-Solomon over GF(2^8) is linear over
GF(2), so the observed-dark bits of a block are linear equations on its data bits; when they
leave at most a few candidate codewords, all of them are enumerated and kept only if exactly one
message survives. Blocks the certain bits cannot pin down fall back to GMD (erase the least
reliable codewords, decode with erasures). Every candidate must agree with every observed-dark
module and must parse as a well-formed byte-mode payload with standard padding, so a wrong
message needs many independent coincidences; when in doubt the decoder fails.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache

import numpy as np
import qrcode
import qrcode.util
import reedsolo

from ticketctl.errors import TicketctlError
from ticketctl.protect.qr.layout import (
    EC_LEVEL,
    MAX_VERSION,
    block_layout,
    capacity_bytes,
    check_mask_pattern,
    check_version,
    count_bits,
    data_module_order,
    mask_matrix,
    size,
)

MAX_FREE_BITS = 10
"""A block whose certain bits leave more than 2**10 codewords open is not enumerated."""
MAX_COMBINATIONS = 4096
"""Upper bound on whole-symbol candidates (product over blocks) checked for a unique message."""
PAD_BYTES = (0xEC, 0x11)
_BYTE_MODE = 0b0100
_RS_FAILURES = (reedsolo.ReedSolomonError, ValueError, ZeroDivisionError, IndexError)


@dataclass(frozen=True)
class QRCode:
    """An encoded symbol: the module matrix (True = dark, no quiet zone) and what made it."""

    version: int
    mask_pattern: int
    matrix: np.ndarray
    message: str


@dataclass
class DecodeResult:
    """Outcome of ``decode_matrix``; ``message`` is None when decoding failed."""

    message: str | None
    method: str  # "rs", "erasures" or "failed"
    corrected: int  # codeword symbols that differ between the read and the corrected stream
    codewords: bytes | None  # corrected codeword stream, interleaved as placed in the symbol


def _payload_data(message: str) -> qrcode.util.QRData:
    """Byte mode always, so the verifier never has to guess the segment mode."""
    return qrcode.util.QRData(message.encode("utf-8"), mode=qrcode.util.MODE_8BIT_BYTE)


def encode(message: str, version: int | None = None, mask_pattern: int = 0,
           max_version: int = 40) -> QRCode:
    """Encode ``message`` (UTF-8, byte mode) at level H with a fixed mask pattern, in the given
    version or the smallest one up to ``max_version`` that fits; the mask is fixed (not chosen
    by penalty score) because the verifier must know it."""
    if not isinstance(message, str):
        raise TicketctlError(f"QR message must be text, got {type(message).__name__}; pass a str")
    mask_pattern = check_mask_pattern(mask_pattern)
    max_version = check_version(max_version)
    length = len(message.encode("utf-8"))
    if version is None:
        version = next((v for v in range(1, max_version + 1) if length <= capacity_bytes(v)), None)
        if version is None:
            raise TicketctlError(
                f"message is {length} UTF-8 bytes but a level-H QR code up to version "
                f"{max_version} holds at most {capacity_bytes(max_version)} bytes; shorten the "
                f"message or allow a larger max_version (at most {MAX_VERSION})"
            )
    else:
        version = check_version(version)
        if length > capacity_bytes(version):
            raise TicketctlError(
                f"message is {length} UTF-8 bytes but a level-H QR code of version {version} "
                f"holds at most {capacity_bytes(version)} bytes; shorten the message or use a "
                "larger version"
            )
    builder = qrcode.QRCode(version=version, error_correction=EC_LEVEL,
                            mask_pattern=mask_pattern, border=0)
    builder.add_data(_payload_data(message))
    builder.make(fit=False)
    matrix = np.array(builder.modules, dtype=bool)
    if matrix.shape != (size(version), size(version)):
        raise TicketctlError(f"qrcode built a {matrix.shape} matrix for version {version}; "
                             "check the installed qrcode package")
    matrix.setflags(write=False)
    return QRCode(version=version, mask_pattern=mask_pattern, matrix=matrix, message=message)


def encoded_codewords(qr: QRCode) -> bytes:
    """The interleaved codeword stream (data then EC) the encoder placed, from qrcode itself."""
    version = check_version(qr.version)
    return bytes(qrcode.util.create_data(version, EC_LEVEL, [_payload_data(qr.message)]))


def _check_matrix(observed: np.ndarray, version: int) -> np.ndarray:
    """Accept any array of the right shape; nonzero reads as dark."""
    matrix = np.asarray(observed)
    n = size(version)
    if matrix.shape != (n, n):
        raise TicketctlError(f"QR matrix has shape {matrix.shape} but version {version} needs "
                             f"({n}, {n}); pass the module matrix without a quiet zone")
    return matrix != 0


def _data_bits(observed: np.ndarray, version: int, mask_pattern: int) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """Observed module values along the placement order and the unmasked codeword bits."""
    order = data_module_order(version)
    total_bits = 8 * block_layout(version).total_codewords
    rows, cols = order[:total_bits, 0], order[:total_bits, 1]
    dark = observed[rows, cols]
    bits = dark ^ mask_matrix(version, mask_pattern)[rows, cols]
    return dark, bits.astype(np.uint8)


def read_codewords(observed: np.ndarray, version: int, mask_pattern: int) -> bytes:
    """The unmasked codeword stream as read from a matrix (no correction), interleaved."""
    version, mask_pattern = check_version(version), check_mask_pattern(mask_pattern)
    _, bits = _data_bits(_check_matrix(observed, version), version, mask_pattern)
    return np.packbits(bits).tobytes()


def place_codewords(codewords: bytes, version: int, mask_pattern: int) -> np.ndarray:
    """bool [n, n]: the data modules for an interleaved codeword stream, masked as the encoder
    does (remainder bits are 0 before masking); function modules are left False."""
    version, mask_pattern = check_version(version), check_mask_pattern(mask_pattern)
    layout = block_layout(version)
    if len(codewords) != layout.total_codewords:
        raise TicketctlError(f"version {version} holds {layout.total_codewords} codewords, got "
                             f"{len(codewords)}; pass the full interleaved stream")
    order = data_module_order(version)
    bits = np.zeros(len(order), dtype=bool)
    bits[:8 * layout.total_codewords] = np.unpackbits(np.frombuffer(bytes(codewords), np.uint8))
    out = np.zeros((size(version), size(version)), dtype=bool)
    masked = bits ^ mask_matrix(version, mask_pattern)[order[:, 0], order[:, 1]]
    out[order[:, 0], order[:, 1]] = masked
    return out


def _to_int(bits: np.ndarray) -> int:
    """Big-endian bits to an integer (mode indicator, character count)."""
    return int("".join("1" if b else "0" for b in bits) or "0", 2)


def _parse_payload(data_codewords: bytes, version: int) -> str | None:
    """One byte-mode segment, then terminator, zero fill and alternating pad codewords, exactly
    as the standard (and ``encode``) writes them; anything else is treated as a failed decode."""
    bits = np.unpackbits(np.frombuffer(data_codewords, np.uint8))
    total = len(bits)
    width = count_bits(version)
    if total < 4 + width:
        return None
    if _to_int(bits[:4]) != _BYTE_MODE:
        return None
    count = _to_int(bits[4:4 + width])
    end = 4 + width + 8 * count
    if count > capacity_bytes(version) or end > total:
        return None
    payload = np.packbits(bits[4 + width:end]).tobytes()
    try:
        message = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    terminated = end + min(4, total - end)
    aligned = -(-terminated // 8) * 8
    if bits[end:aligned].any():
        return None
    pads = data_codewords[aligned // 8:]
    if any(b != PAD_BYTES[i % 2] for i, b in enumerate(pads)):
        return None
    return message


@cache
def _rs_codec(ec_count: int) -> reedsolo.RSCodec:
    """QR Reed-Solomon: GF(256) with polynomial 0x11d, generator 2, first root alpha^0."""
    return reedsolo.RSCodec(ec_count, nsize=255, fcr=0, prim=0x11D, generator=2)


@cache
def _binary_generator(data_count: int, ec_count: int) -> np.ndarray:
    """uint8 [8k, 8n]: the block code as a binary linear code (row i = codeword of data bit i),
    built with reedsolo's encoder since RS encoding is GF(2)-linear."""
    codec = _rs_codec(ec_count)
    rows = []
    for i in range(8 * data_count):
        unit = bytearray(data_count)
        unit[i // 8] = 0x80 >> (i % 8)
        rows.append(np.unpackbits(np.frombuffer(bytes(codec.encode(unit)), np.uint8)))
    out = np.array(rows, dtype=np.uint8)
    out.setflags(write=False)
    return out


def _solve_gf2(equations: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """All solutions of equations @ u = rhs over GF(2) as (particular, null-space basis);
    None when inconsistent."""
    rows, unknowns = equations.shape
    aug = np.concatenate([equations, rhs.reshape(-1, 1)], axis=1).astype(np.uint8)
    pivots: list[int] = []
    rank = 0
    for col in range(unknowns):
        hits = np.nonzero(aug[rank:, col])[0]
        if hits.size == 0:
            continue
        pivot = rank + int(hits[0])
        if pivot != rank:
            aug[[rank, pivot]] = aug[[pivot, rank]]
        others = np.nonzero(aug[:, col])[0]
        others = others[others != rank]
        aug[others] ^= aug[rank]
        pivots.append(col)
        rank += 1
        if rank == rows:
            break
    if aug[rank:, -1].any():
        return None
    particular = np.zeros(unknowns, dtype=np.uint8)
    particular[pivots] = aug[:rank, -1]
    pivot_set = set(pivots)
    free = [c for c in range(unknowns) if c not in pivot_set]
    basis = np.zeros((len(free), unknowns), dtype=np.uint8)
    for i, col in enumerate(free):
        basis[i, col] = 1
        basis[i, pivots] = aug[:rank, col]
    return particular, basis


def _certain_candidates(block: bytes, dark: np.ndarray, data_count: int,
                        ec_count: int) -> list[bytes] | None:
    """Every codeword of the block that keeps all observed-dark modules dark, or None when
    there are too many to list (or none: the damage was not one-sided)."""
    gen = _binary_generator(data_count, ec_count)
    bits = np.unpackbits(np.frombuffer(block, np.uint8))
    certain = np.nonzero(dark)[0]
    solved = _solve_gf2(gen[:, certain].T.copy(), bits[certain])
    if solved is None:
        return []
    particular, basis = solved
    if len(basis) > MAX_FREE_BITS:
        return None
    free = len(basis)
    choices = (np.arange(1 << free)[:, None] >> np.arange(free)[None, :]) & 1
    data = (particular[None, :] ^ (choices.astype(np.int64) @ basis % 2).astype(np.uint8))
    words = (data.astype(np.int64) @ gen % 2).astype(np.uint8)
    return [np.packbits(w).tobytes() for w in words]


def _keeps_darks(candidate: bytes, block: bytes, dark: np.ndarray) -> bool:
    """Under one-sided damage an observed-dark module is certain, so a candidate must agree
    with the read bits wherever the module was dark (same mask on both sides)."""
    cand = np.unpackbits(np.frombuffer(candidate, np.uint8))
    read = np.unpackbits(np.frombuffer(block, np.uint8))
    return bool(np.array_equal(cand[dark], read[dark]))


def _gmd_candidates(block: bytes, dark: np.ndarray, ec_count: int) -> list[bytes]:
    """GMD: erase the k codewords with the most observed-light modules (least reliable under
    one-sided damage), k = 2, 4, ..., EC count, decoding errors in the rest; keep candidates
    that keep every observed-dark module dark."""
    codec = _rs_codec(ec_count)
    lights = (~dark).reshape(-1, 8).sum(axis=1)
    order = np.argsort(-lights, kind="stable")
    found: list[bytes] = []
    steps = sorted(set(range(2, ec_count + 1, 2)) | {ec_count})
    for k in steps:
        try:
            _, full, _ = codec.decode(bytearray(block), erase_pos=[int(i) for i in order[:k]])
        except _RS_FAILURES:
            continue
        word = bytes(full)
        if word not in found and _keeps_darks(word, block, dark):
            found.append(word)
    return found


def _split(stream: bytes, positions: tuple[int, ...]) -> bytes:
    return bytes(stream[i] for i in positions)


def _join(blocks: list[bytes], version: int) -> bytes:
    """Re-interleave per-block codewords into the placed stream."""
    layout = block_layout(version)
    out = bytearray(layout.total_codewords)
    for word, positions in zip(blocks, layout.positions, strict=True):
        for value, index in zip(word, positions, strict=True):
            out[index] = value
    return bytes(out)


def _data_part(blocks: list[bytes], version: int) -> bytes:
    """Data codewords in message order: block by block, data before EC."""
    counts = block_layout(version).data_counts
    return b"".join(word[:count] for word, count in zip(blocks, counts, strict=True))


def _failed() -> DecodeResult:
    return DecodeResult(message=None, method="failed", corrected=0, codewords=None)


def _changed(read: bytes, corrected: bytes) -> int:
    return sum(a != b for a, b in zip(read, corrected, strict=True))


def decode_matrix(observed: np.ndarray, version: int, mask_pattern: int,
                  one_sided: bool = True) -> DecodeResult:
    """Decode a module matrix read back from a mask (function modules are ignored). First plain
    per-block Reed-Solomon; then, when ``one_sided`` and that fails or contradicts an observed
    dark module, the one-sided pass. Returns a failed result rather than a doubtful message;
    pass ``one_sided=False`` when damage may also turn light modules dark."""
    version, mask_pattern = check_version(version), check_mask_pattern(mask_pattern)
    matrix = _check_matrix(observed, version)
    layout = block_layout(version)
    dark_bits, bits = _data_bits(matrix, version, mask_pattern)
    stream = np.packbits(bits).tobytes()
    blocks = [_split(stream, pos) for pos in layout.positions]
    darks = [np.concatenate([dark_bits[8 * i:8 * i + 8] for i in pos]) for pos in layout.positions]

    corrected: list[bytes] = []
    for block in blocks:
        try:
            _, full, _ = _rs_codec(layout.ec_count).decode(bytearray(block))
        except _RS_FAILURES:
            break
        corrected.append(bytes(full))
    if len(corrected) == len(blocks):
        consistent = not one_sided or all(
            _keeps_darks(word, block, dark)
            for word, block, dark in zip(corrected, blocks, darks, strict=True)
        )
        message = _parse_payload(_data_part(corrected, version), version)
        if consistent and message is not None:
            final = _join(corrected, version)
            return DecodeResult(message, "rs", _changed(stream, final), final)
    if not one_sided:
        return _failed()

    options: list[list[bytes]] = []
    for block, dark, count in zip(blocks, darks, layout.data_counts, strict=True):
        listed = _certain_candidates(block, dark, count, layout.ec_count)
        if listed is None:
            listed = _gmd_candidates(block, dark, layout.ec_count)
            if len(listed) > 1:  # GMD alone cannot tell which one is right
                return _failed()
        if not listed:
            return _failed()
        options.append(listed)
    if np.prod([len(o) for o in options], dtype=np.float64) > MAX_COMBINATIONS:
        return _failed()
    found: tuple[str, bytes] | None = None
    for combo in itertools.product(*options):
        message = _parse_payload(_data_part(list(combo), version), version)
        if message is None:
            continue
        if found is not None:  # two well-formed messages fit what was observed: unsure
            return _failed()
        found = (message, _join(list(combo), version))
    if found is None:
        return _failed()
    message, final = found
    return DecodeResult(message, "erasures", _changed(stream, final), final)
