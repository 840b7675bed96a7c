"""Owner keys (Ed25519, `cryptography`) and signed receipts.

A receipt commits, before release, to what was embedded and where: the message's hash, the
code's version and mask pattern, the placements, the embedded matrix (and its hash), the
signed ticket's hash and the magnitude floor of its kept weights. The owner signs it; anyone
holding the owner's public key can check that it was not changed."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ticketctl.artifacts.io import check_output_path, write_bytes_atomic, write_text_atomic
from ticketctl.errors import CheckFailed, TicketctlError

RECEIPT_FORMAT = "ticketctl-receipt"
RECEIPT_VERSION = 1


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def write_keypair(prefix: str | Path, force: bool = False) -> tuple[Path, Path]:
    """PREFIX.key (PKCS8 PEM, mode 0600) and PREFIX.pub (PEM)."""
    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for p in (key_path, pub_path):
        check_output_path(p, force)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pub = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    write_bytes_atomic(key_path, pem, force=force)
    os.chmod(key_path, 0o600)
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


def make_receipt(fields: dict[str, Any], private: Ed25519PrivateKey | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"format": RECEIPT_FORMAT, "version": RECEIPT_VERSION,
                           "receipt": fields, "public_key": None, "signature": None}
    if private is not None:
        doc["public_key"] = base64.b64encode(public_raw(private.public_key())).decode()
        doc["signature"] = base64.b64encode(private.sign(canonical(fields))).decode()
    return doc


def save_receipt(doc: dict[str, Any], path: str | Path, force: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n", force)


def load_receipt(path: str | Path) -> dict[str, Any]:
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
    return doc


def check_receipt(doc: dict[str, Any], public: Ed25519PublicKey | None) -> bool:
    """True when the receipt is signed and unchanged. With a public key the signer must be
    that key's owner; without one only the receipt's own key is checked (integrity, not
    identity). Raises CheckFailed when the signature does not hold."""
    if not doc.get("signature") or not doc.get("public_key"):
        if public is not None:
            raise CheckFailed("the receipt is not signed, so it cannot be checked against "
                              "--public-key")
        return False
    embedded = base64.b64decode(doc["public_key"])
    if public is not None and public_raw(public) != embedded:
        raise CheckFailed("the receipt was signed by another key than --public-key")
    key = Ed25519PublicKey.from_public_bytes(embedded)
    try:
        key.verify(base64.b64decode(doc["signature"]), canonical(doc["receipt"]))
    except InvalidSignature:
        raise CheckFailed("the receipt's signature does not match its content: it was "
                          "altered after signing") from None
    return True


def add_trigger(doc: dict[str, Any] | None, trigger_sha256: str, n: int,
                private: Ed25519PrivateKey | None) -> dict[str, Any]:
    """Commit a trigger set to a receipt (an existing one from `sign`, or a new one) and sign
    it again; an existing signed receipt needs the same key."""
    fields = dict(doc["receipt"]) if doc else {"created": _now()}
    if doc and doc.get("signature") and private is not None:
        if doc.get("public_key") != base64.b64encode(public_raw(private.public_key())).decode():
            raise TicketctlError("the receipt was signed by another key than --signing-key")
    if doc and doc.get("signature") and private is None:
        raise TicketctlError("the receipt is signed: pass --signing-key to sign it again")
    fields.update({"trigger_sha256": trigger_sha256, "trigger_n": n,
                   "trigger_committed": _now()})
    return make_receipt(fields, private)


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
