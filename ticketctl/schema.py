"""What the JSON in a file must hold, declared once per file kind (ticket metadata, receipts,
calibrations): each field is a spec that says what it must be (a type, its bounds, what its
items must be). Reading a file checks the whole document against its schema at the boundary,
so a wrong type, a negative count, a huge number or a missing field is one line that names
the field and what it should be, and the code behind the boundary can trust what it reads.

Parsing is bounded too (`parse_json`): the text's length, and how deeply it may nest (a
crafted document 10,000 levels deep would otherwise exhaust Python's recursion)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ticketctl.errors import TicketctlError

MAX_DEPTH = 32  # containers within containers: every file ticketctl writes stays under 10


class Invalid(Exception):
    """A value that does not fit its spec, at a path inside the document (internal: `check`
    turns it into a TicketctlError naming the file)."""

    def __init__(self, path: str, what: str, value: Any = None, *, missing: bool = False,
                 reason: str | None = None) -> None:
        super().__init__(path)
        self.path, self.what, self.value, self.missing, self.reason = \
            path, what, value, missing, reason


def brief(value: Any, limit: int = 60) -> str:
    """A value for a message, cut short: one readable line whatever a file holds (strings
    quoted as Python does, containers and null as JSON)."""
    if isinstance(value, str):
        if len(value) > limit:
            return f"{value[:limit]!r}... ({len(value):,} characters)"
        return repr(value)
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class Spec:
    """What one value must be. `check` returns the value (numbers as their Python type) or
    raises Invalid; `what` says it in words, for the message."""

    what = "a value"

    def check(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def fail(self, value: Any, path: str, reason: str | None = None) -> Invalid:
        return Invalid(path, self.what, value, reason=reason)


def _num(x: float) -> str:
    """A bound as people read it: 2^62 rather than 4611686018427387904."""
    if isinstance(x, int) and abs(x) >= 1 << 20:
        for k in range(20, 128):
            for sign in (1, -1):
                if x == sign * (1 << k):
                    return f"{'-' if sign < 0 else ''}2^{k}"
                if x == sign * ((1 << k) - 1):
                    return f"{'-' if sign < 0 else ''}2^{k}-1"
        return f"{x:,}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range(lo: float | None, hi: float | None, lo_open: bool = False,
           hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        if lo_open or hi_open:
            return f" in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
        return f" from {_num(lo)} to {_num(hi)}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {_num(hi)}"
    return ""


@dataclass(frozen=True)
class Int(Spec):
    lo: int | None = None
    hi: int | None = None

    @property
    def what(self) -> str:  # type: ignore[override]
        return "an integer" + _range(self.lo, self.hi)

    def check(self, value: Any, path: str) -> int:
        if type(value) is not int or (self.lo is not None and value < self.lo) or \
                (self.hi is not None and value > self.hi):
            raise self.fail(value, path)
        return value


@dataclass(frozen=True)
class Float(Spec):
    """A finite number (an integer is one too)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @property
    def what(self) -> str:  # type: ignore[override]
        return "a finite number" + _range(self.lo, self.hi, self.lo_open, self.hi_open)

    def check(self, value: Any, path: str) -> float:
        if type(value) not in (int, float):
            raise self.fail(value, path)
        try:
            x = float(value)
        except OverflowError:
            raise self.fail(value, path) from None
        low = self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo)
        high = self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi)
        if not math.isfinite(x) or low or high:
            raise self.fail(value, path)
        return x


@dataclass(frozen=True)
class Bool(Spec):
    what = "true or false"

    def check(self, value: Any, path: str) -> bool:
        if type(value) is not bool:
            raise self.fail(value, path)
        return value


@dataclass(frozen=True)
class Str(Spec):
    """A string of at most `max_len` characters, one of `choices`, or matching `pattern`
    (described by `named`)."""

    max_len: int = 256
    choices: tuple[str, ...] | None = None
    pattern: str | None = None
    named: str | None = None

    @property
    def what(self) -> str:  # type: ignore[override]
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        return self.named or f"a string of at most {self.max_len} characters"

    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or len(value) > self.max_len or \
                (self.choices is not None and value not in self.choices) or \
                (self.pattern is not None and not re.fullmatch(self.pattern, value)):
            raise self.fail(value, path)
        return value


@dataclass(frozen=True)
class Scalar(Spec):
    """A number, a boolean or a short string: a builder's argument."""

    what = "a number, true, false or a string of at most 256 characters"

    def check(self, value: Any, path: str) -> Any:
        if type(value) in (int, bool, str) or (type(value) is float and math.isfinite(value)):
            if not isinstance(value, str) or len(value) <= 256:
                return value
        raise self.fail(value, path)


HEX64 = Str(max_len=64, pattern="[0-9a-f]{64}", named="a SHA-256 (64 lowercase hex digits)")


@dataclass(frozen=True)
class Base64(Spec):
    """Base64 text of exactly `size` bytes (a raw key or signature)."""

    size: int
    of: str = "bytes"

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"base64 of {self.size} bytes ({self.of})"

    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or len(value) > 4 * self.size:
            raise self.fail(value, path)
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise self.fail(value, path) from None
        if len(raw) != self.size:
            raise self.fail(value, path, f"{len(raw)} bytes")
        return value


@dataclass(frozen=True)
class List(Spec):
    item: Spec
    max_len: int = 10_000
    length: int | None = None  # exactly this many items

    @property
    def what(self) -> str:  # type: ignore[override]
        n = f"{self.length}" if self.length is not None else f"at most {self.max_len}"
        return f"a list of {n} items, each {self.item.what}"

    def check(self, value: Any, path: str) -> list:
        if not isinstance(value, list) or len(value) > self.max_len or \
                (self.length is not None and len(value) != self.length):
            raise self.fail(value, path)
        return [self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class Table(Spec):
    """A list of rows of equal length (`width` when given), each cell `cell`."""

    cell: Spec
    width: int | None = None
    max_rows: int = 1 << 16
    max_width: int = 1 << 16

    @property
    def what(self) -> str:  # type: ignore[override]
        w = f"{self.width} items" if self.width is not None else "equal length"
        return f"a list of rows of {w}, each item {self.cell.what}"

    def check(self, value: Any, path: str) -> list:
        if not isinstance(value, list) or len(value) > self.max_rows:
            raise self.fail(value, path)
        width = self.width
        for i, row in enumerate(value):
            if not isinstance(row, list) or len(row) > self.max_width or \
                    (width is not None and len(row) != width):
                raise self.fail(row, f"{path}[{i}]")
            width = len(row)
            for j, v in enumerate(row):
                self.cell.check(v, f"{path}[{i}][{j}]")
        return value


@dataclass(frozen=True)
class Map(Spec):
    """An object with free keys (layer names, argument names), each value `value`."""

    value: Spec
    max_len: int = 10_000
    key_len: int = 256

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"an object whose values are each {self.value.what}"

    def check(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict) or len(value) > self.max_len:
            raise self.fail(value, path)
        out = {}
        for k, v in value.items():
            if len(k) > self.key_len:
                raise Invalid(path, f"an object with keys of at most {self.key_len} "
                                    "characters", k)
            out[k] = self.value.check(v, f"{path}[{json.dumps(k)}]")
        return out


class AnyJSON(Spec):
    """Anything JSON can hold (the depth is bounded when the text is parsed)."""

    what = "any JSON value"

    def check(self, value: Any, path: str) -> Any:
        return value


@dataclass(frozen=True)
class Field:
    """One named field of an object: its spec, whether it must be present, whether null is
    allowed (null stands for 'not recorded')."""

    spec: Spec
    required: bool = False
    null: bool = True


@dataclass(frozen=True)
class Obj(Spec):
    """An object with named fields; keys it does not name (written by a newer ticketctl, or
    free provenance) are kept, checked against `others`."""

    fields: Mapping[str, Field]
    others: Spec | None = field(default_factory=AnyJSON)
    named: str = "an object"

    @property
    def what(self) -> str:  # type: ignore[override]
        return self.named

    def check(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(value, path)
        for name, f in self.fields.items():
            sub = f"{path}.{name}" if path else name
            if name not in value:
                if f.required:
                    raise Invalid(sub, f.spec.what, missing=True)
                continue
            if value[name] is None:
                if f.null and not f.required:
                    continue
                raise Invalid(sub, f.spec.what, None)
            f.spec.check(value[name], sub)
        if self.others is not None:
            for k, v in value.items():
                if k not in self.fields:
                    self.others.check(v, f"{path}.{k}" if path else k)
        elif set(value) - set(self.fields):
            extra = sorted(set(value) - set(self.fields))[0]
            raise Invalid(f"{path}.{extra}" if path else extra, "absent (unknown field)",
                          value[extra])
        return value


@dataclass(frozen=True)
class Lazy(Spec):
    """A spec named before it exists (a ticket's metadata holds its parent's)."""

    get: Callable[[], Spec]

    @property
    def what(self) -> str:  # type: ignore[override]
        return self.get().what

    def check(self, value: Any, path: str) -> Any:
        return self.get().check(value, path)


def spec(s: Spec, default: Any = None, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field carrying its spec: `record_schema` reads them back, so a record
    declares its file format where it declares its fields."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"spec": s})
    return dataclasses.field(default=default, metadata={"spec": s})


def record_schema(cls: type, named: str = "an object") -> Obj:
    """The schema of a dataclass record from its fields' specs (fields without one are not
    part of the file)."""
    return Obj({f.name: Field(f.metadata["spec"]) for f in dataclasses.fields(cls)
                if "spec" in f.metadata}, named=named)


def check(schema: Spec, value: Any, where: str, label: str) -> Any:
    """`value` checked against `schema`; a misfit raises TicketctlError naming `where` (the
    file), `label` (what it holds), the field and what it should be."""
    try:
        return schema.check(value, "")
    except Invalid as e:
        raise TicketctlError(describe(e, where, label)) from None


def describe(e: Invalid, where: str, label: str) -> str:
    """The one line for a misfit."""
    prefix = f"{where}: " if where else ""
    if not e.path:
        return f"{prefix}{label} must be {e.what}, got {brief(e.value)}"
    if e.missing:
        return f"{prefix}{label} lacks field '{e.path}' ({e.what})"
    got = brief(e.value) + (f" ({e.reason})" if e.reason else "")
    return f"{prefix}{label} field '{e.path}' must be {e.what}, got {got}"


def depth(value: Any) -> int:
    """How deeply containers nest (iteratively: the point is to refuse what recursion cannot
    handle)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > MAX_DEPTH:
                return deepest
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(text: str | bytes, where: str, label: str, max_bytes: int) -> Any:
    """JSON from a file, bounded: at most `max_bytes` long and MAX_DEPTH containers deep."""
    prefix = f"{where}: " if where else ""
    if len(text) > max_bytes:
        raise TicketctlError(f"{prefix}{label} is {len(text):,} bytes; at most {max_bytes:,} "
                             "are allowed")
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        nested = True
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise TicketctlError(f"{prefix}{label} is not valid JSON ({reason})") from None
    except ValueError as e:  # an integer of thousands of digits
        raise TicketctlError(f"{prefix}{label} is not readable JSON ({brief(str(e))})") \
            from None
    else:
        nested = depth(value) > MAX_DEPTH
    if nested:
        raise TicketctlError(f"{prefix}{label} is nested more than {MAX_DEPTH} levels deep; "
                             "no file ticketctl writes is")
    return value
