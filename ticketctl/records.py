"""Typed records that cross modules: each is a dataclass, converted to and from JSON in one
place (its `to_dict` / `from_dict`), so a misspelt field fails where it is written, not where a
dict is read three modules away."""

from __future__ import annotations

from dataclasses import asdict, fields, replace
from enum import Enum
from typing import Any, TypeVar

from ticketctl.errors import TicketctlError

R = TypeVar("R", bound="Record")
S = TypeVar("S")
C = TypeVar("C", bound="Choice")


class Record:
    """Mixin for flat dataclasses: JSON-able dicts out, and back in. Keys a dict holds that
    the record does not know (written by a newer ticketctl) are ignored on reading; fields a
    dict lacks (written by an older one) take their defaults."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], d: dict[str, Any]) -> R:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in known})


class Overrides:
    """Mixin for dataclasses of optional settings (what a user gave explicitly): each field
    that is not None replaces the same-named field of a settings dataclass (a preset's)."""

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}  # type: ignore[call-overload]

    def apply(self, settings: S) -> S:
        return replace(settings, **self.given())  # type: ignore[type-var]


class Choice(str, Enum):
    """A closed set of names (a kind, a preset, a score...): a str, so it compares with,
    prints as and serialises as its name; the CLI shows the set in --help and checks it."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls: type[C], value: str, what: str = "") -> C:
        try:
            return cls(value)
        except ValueError:
            raise TicketctlError(f"unknown {what or cls.__name__.lower()} {value!r}; known: "
                                 f"{', '.join(m.value for m in cls)}") from None
