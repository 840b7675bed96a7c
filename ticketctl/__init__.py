"""ticketctl: find, protect and verify lottery tickets (sparse masks found by IMP)."""

__version__ = "0.1.0"
