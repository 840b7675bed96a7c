"""Typed errors: the CLI turns each into one line and an exit code."""


class TicketctlError(Exception):
    """Bad usage or bad input: exit status 2."""

    exit_code = 2


class CheckFailed(TicketctlError):
    """A verification or integrity check failed: exit status 1."""

    exit_code = 1
