"""Typed errors: the CLI turns each into one line and an exit code."""

# Where a data-parallel rank that fails writes its error (`rank<R>.json`), for the command
# that started the ranks to report once in place of every rank printing its own.
RANK_ERRORS_ENV = "TICKETCTL_RANK_ERRORS"


class TicketctlError(Exception):
    """Bad usage or bad input: exit status 2."""

    exit_code = 2


class CheckFailed(TicketctlError):
    """A verification or integrity check failed: exit status 1."""

    exit_code = 1


def first_line(e: BaseException, limit: int = 160) -> str:
    """An exception's message for a one-line error: its first line, cut at `limit`
    characters, or its type's name when it has no message."""
    text = str(e)
    return text.splitlines()[0][:limit] if text.strip() else type(e).__name__


class Terminated(BaseException):
    """SIGTERM arrived while a command waited for the data-parallel ranks it started (they
    are stopped first); the command exits 143, as SIGTERM itself would end it."""

    code = 143
