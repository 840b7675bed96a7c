"""The verification policy, in one place: what a suspect model shows (white box: the QR code in
its mask read against the owner's receipt; black box: its answers to the owner's trigger
set), and the one function, `decide`, that turns that evidence into a verdict. `verify`, the
attacks' checks and the demo all decide here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ticketctl.errors import TicketctlError
from ticketctl.records import Record

if TYPE_CHECKING:
    from ticketctl.protect.receipt import Receipt

# The decision level: a check passes when its p-value is below it. One in a million keeps the
# chance of calling an unrelated model stolen negligible even over many checks and attacks.
ALPHA = 1e-6

SIGNATURE_TEST = "binomial: bit matches over embedded data modules, null rate 0.5"
TRIGGER_TEST = "binomial: trigger labels matched, against the null rate"


def default_null_rate(num_classes: int) -> float:
    """Chance agreement of a model that never saw the trigger set: one class in `num_classes`
    (`calibrate` measures a higher, safer rate on independently trained models)."""
    return 1.0 / num_classes


def null_rate_for(given: float | None, num_classes: int) -> float:
    rate = given if given is not None else default_null_rate(num_classes)
    if not 0.0 < rate < 1.0:
        raise TicketctlError(f"--null-rate must be in (0, 1), got {rate}")
    return rate


@dataclass
class SignatureReading(Record):
    """The code read from a suspect's mask where a receipt says it is, tested against the
    committed matrix."""

    message: str | None  # decoded text, None when nothing decodes
    bit_match: float  # share of the data modules that match the committed matrix
    p_value: float  # of that many matches in an unrelated mask (Bonferroni over alignments)
    receipt_valid: bool  # the receipt is signed and its signature holds
    data_modules: int
    matches: int
    precision_p_value: float  # of the dark modules falling on the code's dark modules
    decoded_matches_receipt: bool  # the decoded message hashes to the committed one
    decode_method: str
    decode_min_count: int | None  # kept weights a kernel needed to read dark
    placements: list[dict[str, Any]]
    comparisons: int  # readings compared (as stored, re-aligned)
    alignment: str  # the reading that matched best
    floor_defence: bool  # read after the owner's add-on defence
    test: str = SIGNATURE_TEST
    # data modules in channels the suspect no longer has (structured pruning): not observed,
    # left out of `data_modules`, `matches` and the test
    unobserved_modules: int = 0

    def passes(self, alpha: float) -> bool:
        """A match no unrelated model reaches by chance, or the committed message itself."""
        return self.p_value < alpha or self.decoded_matches_receipt


@dataclass
class TriggerReading(Record):
    """A suspect's answers to the trigger set: how many labels it reproduces."""

    trigger_accuracy: float
    trigger_p_value: float
    matches: int
    n: int
    null_rate: float
    decoy_accuracy: float | None = None  # on ordinary test images mixed in (--predict-cmd)

    def passes(self, alpha: float) -> bool:
        return self.trigger_p_value < alpha

    def to_dict(self) -> dict[str, Any]:
        return {"trigger_accuracy": self.trigger_accuracy,
                "trigger_p_value": self.trigger_p_value, "trigger_matches": self.matches,
                "trigger_n": self.n, "null_rate": self.null_rate, "trigger_test": TRIGGER_TEST,
                "decoy_accuracy": self.decoy_accuracy}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TriggerReading:
        return cls(d["trigger_accuracy"], d["trigger_p_value"], d["trigger_matches"],
                   d["trigger_n"], d["null_rate"], d.get("decoy_accuracy"))


# What a receipt check established, for `receipt_check`.
SIGNER_CHECKED = "public-key"  # signed by the owner of --public-key, unchanged since
SELF_CONSISTENT = "self"  # unchanged since signed by the key it carries; signer not identified
UNSIGNED = "unsigned"  # nothing dates it or names its owner


@dataclass
class ReceiptStatus(Record):
    """What checking the receipt itself showed, apart from what the suspect shows: a verdict
    resting on a receipt is only as good as the receipt."""

    valid: bool  # signed, and the signature holds over its content
    checked: str  # SIGNER_CHECKED, SELF_CONSISTENT or UNSIGNED
    trigger_committed: bool | None = None  # the trigger set given is the receipt's (None: n/a)


def receipt_status(receipt: Receipt, public_key: Any = None,
                   trigger_sha256: str | None = None) -> ReceiptStatus:
    """Check a receipt itself: its signature (against `public_key` when given; raises
    CheckFailed when it does not hold) and whether the trigger set with `trigger_sha256` is
    the one it commits."""
    valid = receipt.check(public_key)
    checked = UNSIGNED if not valid else \
        SIGNER_CHECKED if public_key is not None else SELF_CONSISTENT
    committed = None
    if trigger_sha256 is not None and receipt.trigger_sha256:
        committed = trigger_sha256 == receipt.trigger_sha256
    return ReceiptStatus(valid, checked, committed)


@dataclass
class Verdict:
    """A suspect model's verdict and the evidence behind it."""

    alpha: float
    verified: bool
    signature: SignatureReading | None = None
    defended: SignatureReading | None = None  # read again behind the add-on defence
    trigger: TriggerReading | None = None
    found: list[dict[str, Any]] | None = None  # codes a scan found (no receipt to check)
    findings: list[str] = field(default_factory=list)  # what the suspect file claims falsely
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. an independent ZBar reading
    receipt: ReceiptStatus | None = None  # the receipt's own check (None: no receipt)

    @property
    def message(self) -> str | None:
        if self.signature is not None:
            return self.signature.message
        return self.found[0]["message"] if self.found else None

    @property
    def p_value(self) -> float | None:
        return self.signature.p_value if self.signature else None

    @property
    def bit_match(self) -> float | None:
        return self.signature.bit_match if self.signature else None

    @property
    def trigger_accuracy(self) -> float | None:
        return self.trigger.trigger_accuracy if self.trigger else None

    @property
    def trigger_p_value(self) -> float | None:
        return self.trigger.trigger_p_value if self.trigger else None

    def to_dict(self) -> dict[str, Any]:
        """The document `verify --json` prints: the contract's keys, then the details."""
        out: dict[str, Any] = {
            "verified": self.verified, "message": self.message, "bit_match": self.bit_match,
            "p_value": self.p_value, "trigger_accuracy": self.trigger_accuracy,
            "trigger_p_value": self.trigger_p_value, "alpha": self.alpha,
            "receipt_valid": self.receipt.valid if self.receipt else None,
            "receipt_check": self.receipt.checked if self.receipt else None,
            "trigger_committed": self.receipt.trigger_committed if self.receipt else None}
        if self.signature is not None:
            out.update({k: v for k, v in self.signature.to_dict().items() if k not in out})
        if self.defended is not None:
            out["defended"] = self.defended.to_dict()
        if self.trigger is not None:
            out.update(self.trigger.to_dict())
        if self.found is not None:
            out["found"] = self.found
        out["findings"] = self.findings
        return {**out, **self.notes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        signature = SignatureReading.from_dict(d) if "data_modules" in d else None
        trigger = TriggerReading.from_dict(d) if "trigger_n" in d else None
        defended = SignatureReading.from_dict(d["defended"]) if d.get("defended") else None
        receipt = ReceiptStatus(d["receipt_valid"], d["receipt_check"],
                                d.get("trigger_committed")) if d.get("receipt_check") else None
        known = {"verified", "message", "bit_match", "p_value", "trigger_accuracy",
                 "trigger_p_value", "alpha", "receipt_valid", "receipt_check",
                 "trigger_committed", "defended", "found",
                 "trigger_matches", "trigger_n", "null_rate", "trigger_test", "decoy_accuracy",
                 "findings", *(SignatureReading.__dataclass_fields__)}
        return cls(d["alpha"], d["verified"], signature, defended, trigger, d.get("found"),
                   list(d.get("findings") or []), {k: v for k, v in d.items() if k not in known},
                   receipt)


def decide(alpha: float, signature: SignatureReading | None = None,
           trigger: TriggerReading | None = None, defended: SignatureReading | None = None,
           found: list[dict[str, Any]] | None = None) -> Verdict:
    """Verified when any check the owner brought passes at `alpha`: the signature as read, the
    signature behind the add-on defence, or the trigger set. Each is strong alone (a p-value
    below alpha); combining them by "any" keeps one removed mark from clearing a thief."""
    if not 0.0 < alpha < 1.0:
        raise TicketctlError(f"--alpha must be in (0, 1), got {alpha}")
    checks = [r.passes(alpha) for r in (signature, defended, trigger) if r is not None]
    return Verdict(alpha, any(checks), signature, defended, trigger, found)


def matches_needed(n: int, null_rate: float, alpha: float = ALPHA) -> int | None:
    """The fewest of n trigger labels a model must reproduce to verify at `alpha` (None if
    even all n do not suffice: the set is too small)."""
    from ticketctl.protect.stats import binomial_tail

    for k in range(n + 1):
        if binomial_tail(k, n, null_rate) < alpha:
            return k
    return None
