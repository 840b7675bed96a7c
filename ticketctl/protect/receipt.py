"""Owner keys (Ed25519, `cryptography`) and signed receipts.

A receipt commits, before release, to what was embedded and where: the message's hash, the
code's version and mask pattern, the placements, the embedded matrix (and its hash), the
signed ticket's hash and the magnitude floor of its kept weights. The owner signs it; anyone
holding the owner's public key can check that it was not changed."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ticketctl.artifacts.io import (
    all_or_nothing,
    read_input,
    readable_json,
    write_bytes_atomic,
    write_text_atomic,
)
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.protect.embed import Placement
from ticketctl.protect.qr.layout import MAX_VERSION
from ticketctl.schema import (
    HEX64,
    Base64,
    Field,
    Float,
    Int,
    List,
    Map,
    Obj,
    Str,
    Table,
    check,
    parse_json,
    record_schema,
    spec,
)

RECEIPT_FORMAT = "ticketctl-receipt"
RECEIPT_VERSION = 1
# A receipt is kilobytes (fingerprints of a wide layer, megabytes); a key file is a few lines.
MAX_RECEIPT_BYTES = 64 << 20
MAX_KEY_BYTES = 64 << 10

MAX_MODULES = (17 + 4 * MAX_VERSION) ** 2
MATRIX_HEX = 2 * -(-MAX_MODULES // 8)
# the module grid (protect/blocks.py): absent in receipts written before blocks, which read
# the layer's kernel grid
PAIR = List(Int(1, 1 << 40), length=2)
PLACEMENT = Obj({"layer": Field(Str(256), required=True), "row": Field(Int(0, 1 << 31),
                 required=True), "col": Field(Int(0, 1 << 31), required=True),
                 "view": Field(PAIR), "block": Field(PAIR)})
# per channel of a signed layer: its largest |w| and sorted kernel counts (rows, cols), and
# the (channel, pattern, count) triples of its kernels' 0/1 patterns (protect/align.py)
FINGERPRINT = Obj({"rows": Field(Table(Float()), required=True),
                   "cols": Field(Table(Float()), required=True),
                   "row_patterns": Field(Table(Int(0, 1 << 62), width=3)),
                   "col_patterns": Field(Table(Int(0, 1 << 62), width=3))})


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def write_keypair(prefix: str | Path, force: bool = False) -> tuple[Path, Path]:
    """PREFIX.key (PKCS8 PEM, mode 0600 from its creation) and PREFIX.pub (PEM): both or
    neither."""
    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pub = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    with all_or_nothing(key_path, pub_path, force=force):
        write_bytes_atomic(key_path, pem, force=force, private=True)
        write_bytes_atomic(pub_path, pub, force=force)
    return key_path, pub_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    data = read_input(path, "key", MAX_KEY_BYTES,
                      hint="; make one with `ticketctl keygen`")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise TicketctlError(f"{path} is not an Ed25519 private key in unencrypted PEM, as "
                             f"`ticketctl keygen` writes ({_why(e, data)})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise TicketctlError(f"{path} is not an Ed25519 key; make one with `ticketctl keygen`")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    data = read_input(path, "public key", MAX_KEY_BYTES)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise TicketctlError(f"{path} is not an Ed25519 public key in PEM, as `ticketctl "
                             f"keygen` writes PREFIX.pub ({_why(e, data)})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise TicketctlError(f"{path} is not an Ed25519 public key")
    return key


def _why(e: Exception, data: bytes) -> str:
    """cryptography's reason, in a few words."""
    if b"-----BEGIN" not in data:
        return "not PEM text"
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if line.startswith("Unable to load PEM file"):
        return "malformed PEM"
    return line if len(line) <= 120 else line[:120] + "..."


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass
class Receipt:
    """What the owner commits to before release, and the signature over it. The fields a
    receipt does not hold are None: one made by `retrain --receipt` alone commits a trigger set
    and no code. Written as {"format", "version", "receipt": {fields}, "public_key",
    "signature"}; the signature covers the canonical JSON of the fields."""

    created: str | None = spec(Str(64))
    message_sha256: str | None = spec(HEX64)
    qr_version: int | None = spec(Int(1, MAX_VERSION))
    mask_pattern: int | None = spec(Int(0, 7))
    error_correction: str | None = spec(Str(choices=("L", "M", "Q", "H")))
    placements: list[Placement] = spec(List(PLACEMENT, max_len=1024), factory=list)
    # the embedded module matrix, row-major bits as hex
    matrix: str | None = spec(Str(MATRIX_HEX, pattern="[0-9a-f]*", named="hex digits"))
    matrix_sha256: str | None = spec(HEX64)
    data_modules: int | None = spec(Int(0, MAX_MODULES))
    support: int | None = spec(Int(1, 4096))
    signed_ticket_sha256: str | None = spec(HEX64)
    signed_masks_sha256: str | None = spec(HEX64)
    # the smallest kept |w| at signing (add-on defence)
    magnitude_floor: float | None = spec(Float(0))
    arch: str | None = spec(Str(64))
    ticketctl: str | None = spec(Str(64))
    # kept weights per signed layer (add-on defence)
    kept_counts: dict[str, int] | None = spec(Map(Int(0, 2 ** 62)))
    # per signed layer (permutation re-alignment)
    fingerprints: dict[str, Any] | None = spec(Map(FINGERPRINT))
    trigger_sha256: str | None = spec(HEX64)
    trigger_n: int | None = spec(Int(1, 10_000_000))
    trigger_committed: str | None = spec(Str(64))
    other: dict[str, Any] = field(default_factory=dict)  # fields of a newer ticketctl, kept
    public_key: str | None = None  # base64 raw Ed25519 key of the signer
    signature: str | None = None  # base64 Ed25519 signature of the fields
    _signed: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def has_code(self) -> bool:
        """Whether it commits a QR code (Scheme V2), not only a trigger set."""
        return self.qr_version is not None and self.matrix is not None

    def fields(self) -> dict[str, Any]:
        """The committed fields as written (and signed): those the receipt holds."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in _UNSIGNED:
                continue
            value = getattr(self, f.name)
            if f.name == "placements":
                value = [p.to_json() for p in value] or None
            if value is not None:
                out[f.name] = value
        return {**out, **self.other}

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECEIPT_FORMAT, "version": RECEIPT_VERSION, "receipt": self.fields(),
                "public_key": self.public_key, "signature": self.signature}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str = "the receipt") -> Receipt:
        """A receipt from its file's document, checked field by field (RECEIPT_FILE)."""
        check(RECEIPT_FILE, doc, where, "receipt")
        version = doc.get("version") or RECEIPT_VERSION
        if version > RECEIPT_VERSION:
            raise TicketctlError(f"{where} is receipt version {version}; this ticketctl reads up "
                                 f"to {RECEIPT_VERSION}: upgrade ticketctl")
        r = doc["receipt"]
        check(RECEIPT_FIELDS, r, where, "receipt")
        known = {f.name for f in dataclasses.fields(cls)} - _UNSIGNED
        values = {k: v for k, v in r.items() if k in known and k != "placements"}
        placements = [Placement(p["layer"], p["row"], p["col"], _pair(p.get("view")),
                                _pair(p.get("block"))) for p in r.get("placements") or []]
        receipt = cls(**values, placements=placements,
                      other={k: v for k, v in r.items() if k not in known},
                      public_key=doc.get("public_key"), signature=doc.get("signature"),
                      _signed=r)
        receipt._check_code(where)
        return receipt

    def _check_code(self, where: str) -> None:
        """A receipt that commits a code (a version and a matrix) says everything a reader
        needs: its mask pattern, at least one placement, and a matrix of the version's size."""
        if not self.has_code:
            return
        if self.mask_pattern is None:
            raise TicketctlError(f"{where}: receipt lacks field 'mask_pattern' (it commits a "
                                 "QR code)")
        if not self.placements:
            raise TicketctlError(f"{where}: receipt field 'placements' must list at least one "
                                 "placement (it commits a QR code)")
        for i, p in enumerate(self.placements):
            if (p.view is None) != (p.block is None):
                raise TicketctlError(f"{where}: receipt field 'placements[{i}]' must give both "
                                     "'view' and 'block', or neither")
            if p.view is not None and (p.block[0] > p.view[0] or p.block[1] > p.view[1]):
                raise TicketctlError(f"{where}: receipt field 'placements[{i}].block' must fit "
                                     f"inside its 'view' {list(p.view)}, got {list(p.block)}")
        n = 17 + 4 * int(self.qr_version)
        digits = 2 * -(-n * n // 8)
        if len(self.matrix) != digits:
            raise TicketctlError(f"{where}: receipt field 'matrix' must be {digits} hex digits "
                                 f"for a version-{self.qr_version} code, got {len(self.matrix)}")

    def sign(self, private: Ed25519PrivateKey | None) -> Receipt:
        """Sign the fields as they are now (None: leave it unsigned)."""
        self._signed = None
        if private is None:
            self.public_key = self.signature = None
        else:
            self.public_key = base64.b64encode(public_raw(private.public_key())).decode()
            self.signature = base64.b64encode(private.sign(canonical(self.fields()))).decode()
        return self

    def check(self, public: Ed25519PublicKey | None) -> bool:
        """True when the receipt is signed and unchanged. With a public key the signer must
        be that key's owner; without one only the receipt's own key is checked (integrity,
        not identity). Raises CheckFailed when the signature does not hold."""
        if not self.signature or not self.public_key:
            if public is not None:
                raise CheckFailed("the receipt is not signed, so it cannot be checked against "
                                  "--public-key")
            return False
        embedded = base64.b64decode(self.public_key)
        if public is not None and public_raw(public) != embedded:
            raise CheckFailed("the receipt was signed by another key than --public-key")
        try:
            key = Ed25519PublicKey.from_public_bytes(embedded)
        except ValueError:
            raise TicketctlError("the receipt's field 'public_key' is not an Ed25519 public "
                                 "key") from None
        # as read from the file, byte for byte: what was signed, whatever this version parses
        signed = self._signed if self._signed is not None else self.fields()
        try:
            key.verify(base64.b64decode(self.signature), canonical(signed))
        except InvalidSignature:
            raise CheckFailed("the receipt's signature does not match its content: it was "
                              "altered after signing") from None
        return True

    def with_trigger(self, trigger_sha256: str, n: int,
                     private: Ed25519PrivateKey | None) -> Receipt:
        """Commit a trigger set and sign again; a signed receipt needs the same key."""
        if self.signature and private is not None and self.public_key != \
                base64.b64encode(public_raw(private.public_key())).decode():
            raise TicketctlError("the receipt was signed by another key than --signing-key")
        if self.signature and private is None:
            raise TicketctlError("the receipt is signed: pass --signing-key to sign it again")
        out = dataclasses.replace(self, trigger_sha256=trigger_sha256, trigger_n=n,
                                  trigger_committed=_now())
        return out.sign(private)


_UNSIGNED = frozenset({"other", "public_key", "signature", "_signed"})

# The receipt file: the document around the fields, and the fields from Receipt's own specs.
RECEIPT_FIELDS = record_schema(Receipt)
RECEIPT_FILE = Obj({
    "format": Field(Str(choices=(RECEIPT_FORMAT,)), required=True),
    "version": Field(Int(1)),
    "receipt": Field(Obj({}), required=True),
    "public_key": Field(Base64(32, "a raw Ed25519 public key")),
    "signature": Field(Base64(64, "an Ed25519 signature")),
})


def _pair(value: list[int] | None) -> tuple[int, int] | None:
    return None if value is None else (int(value[0]), int(value[1]))


def trigger_receipt(trigger_sha256: str, n: int, private: Ed25519PrivateKey | None) -> Receipt:
    """A new receipt that commits a trigger set only."""
    return Receipt(created=_now()).with_trigger(trigger_sha256, n, private)


def save_receipt(receipt: Receipt, path: str | Path, force: bool = False) -> Path:
    """Owner-only: a receipt tells where the code sits, which a forger would want to know."""
    return write_text_atomic(path, readable_json(receipt.to_dict()) + "\n", force,
                             private=True)


def load_receipt(path: str | Path) -> Receipt:
    p = Path(path)
    text = read_input(p, "receipt", MAX_RECEIPT_BYTES)
    doc = parse_json(text, str(p), "receipt", MAX_RECEIPT_BYTES)
    if not isinstance(doc, dict) or doc.get("format") != RECEIPT_FORMAT:
        raise TicketctlError(f"{p} is not a ticketctl receipt (its field 'format' is not "
                             f"{RECEIPT_FORMAT!r})")
    return Receipt.from_dict(doc, str(p))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
