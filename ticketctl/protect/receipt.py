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

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ticketctl.artifacts.io import all_or_nothing, write_bytes_atomic, write_text_atomic
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.protect.embed import Placement

RECEIPT_FORMAT = "ticketctl-receipt"
RECEIPT_VERSION = 1


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
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise TicketctlError(f"{path}: no such key file; make one with `ticketctl keygen`") \
            from None
    except (ValueError, TypeError) as e:
        raise TicketctlError(f"{path} is not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise TicketctlError(f"{path} is not an Ed25519 key; make one with `ticketctl keygen`")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise TicketctlError(f"{path}: no such public key file") from None
    except (ValueError, TypeError) as e:
        raise TicketctlError(f"{path} is not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise TicketctlError(f"{path} is not an Ed25519 public key")
    return key


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass
class Receipt:
    """What the owner commits to before release, and the signature over it. The fields a
    receipt does not hold are None: one made by `retrain --receipt` alone commits a trigger set
    and no code. Written as {"format", "version", "receipt": {fields}, "public_key",
    "signature"}; the signature covers the canonical JSON of the fields."""

    created: str | None = None
    message_sha256: str | None = None
    qr_version: int | None = None
    mask_pattern: int | None = None
    error_correction: str | None = None
    placements: list[Placement] = field(default_factory=list)
    matrix: str | None = None  # the embedded module matrix, row-major bits as hex
    matrix_sha256: str | None = None
    data_modules: int | None = None
    support: int | None = None
    signed_ticket_sha256: str | None = None
    signed_masks_sha256: str | None = None
    magnitude_floor: float | None = None  # the smallest kept |w| at signing (add-on defence)
    arch: str | None = None
    ticketctl: str | None = None
    kept_counts: dict[str, int] | None = None  # kept weights per signed layer (add-on defence)
    fingerprints: dict[str, Any] | None = None  # per signed layer (permutation re-alignment)
    trigger_sha256: str | None = None
    trigger_n: int | None = None
    trigger_committed: str | None = None
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
                value = [{"layer": p.layer, "row": p.row, "col": p.col} for p in value] or None
            if value is not None:
                out[f.name] = value
        return {**out, **self.other}

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECEIPT_FORMAT, "version": RECEIPT_VERSION, "receipt": self.fields(),
                "public_key": self.public_key, "signature": self.signature}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str = "the receipt") -> Receipt:
        r = doc["receipt"]
        known = {f.name for f in dataclasses.fields(cls)} - _UNSIGNED
        try:
            values = {k: v for k, v in r.items() if k in known and k != "placements"}
            placements = [Placement(p["layer"], int(p["row"]), int(p["col"]))
                          for p in r.get("placements") or []]
            return cls(**values, placements=placements,
                       other={k: v for k, v in r.items() if k not in known},
                       public_key=doc.get("public_key"), signature=doc.get("signature"),
                       _signed=r)
        except (KeyError, TypeError, ValueError) as e:
            raise TicketctlError(f"{where} is not a readable receipt ({e})") from None

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
        key = Ed25519PublicKey.from_public_bytes(embedded)
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


def trigger_receipt(trigger_sha256: str, n: int, private: Ed25519PrivateKey | None) -> Receipt:
    """A new receipt that commits a trigger set only."""
    return Receipt(created=_now()).with_trigger(trigger_sha256, n, private)


def save_receipt(receipt: Receipt, path: str | Path, force: bool = False) -> Path:
    """Owner-only: a receipt tells where the code sits, which a forger would want to know."""
    return write_text_atomic(path, json.dumps(receipt.to_dict(), indent=2, sort_keys=True) +
                             "\n", force, private=True)


def load_receipt(path: str | Path) -> Receipt:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise TicketctlError(f"{p}: no such receipt file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TicketctlError(f"{p} is not a readable receipt (invalid JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != RECEIPT_FORMAT or \
            not isinstance(doc.get("receipt"), dict):
        raise TicketctlError(f"{p} is not a ticketctl receipt")
    if int(doc.get("version", 0)) > RECEIPT_VERSION:
        raise TicketctlError(f"{p} is a newer receipt version; upgrade ticketctl")
    return Receipt.from_dict(doc, str(p))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
