"""Artifacts: the Mask and Ticket types and the ticket file format."""

from ticketctl.artifacts.mask import Mask
from ticketctl.artifacts.ticket import (
    FORMAT_VERSION,
    KINDS,
    Kind,
    Ticket,
    load_ticket,
    read_header,
    save_ticket,
)

__all__ = ["FORMAT_VERSION", "KINDS", "Kind", "Mask", "Ticket", "load_ticket", "read_header",
           "save_ticket"]
