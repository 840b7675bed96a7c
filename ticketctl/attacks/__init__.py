"""Attacks a thief would try, run against protected tickets."""

from ticketctl.attacks.keymask import fake1, forge_key, nokey
from ticketctl.attacks.runner import AttackReport, AttackRow, AttackRunner

__all__ = ["AttackReport", "AttackRow", "AttackRunner", "fake1", "forge_key", "nokey"]
