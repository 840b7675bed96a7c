"""QR codes as module matrices for scheme V2 (owner's message in a layer's kernel mask):
level-H encoding, the standard's module layout, and a decoder for one-sided damage."""

from ticketctl.protect.qr.codec import (
    DecodeResult,
    QRCode,
    decode_matrix,
    encode,
    encoded_codewords,
    place_codewords,
    read_codewords,
)
from ticketctl.protect.qr.layout import (
    block_layout,
    capacity_bytes,
    data_module_order,
    function_module_map,
)

__all__ = [
    "DecodeResult",
    "QRCode",
    "block_layout",
    "capacity_bytes",
    "data_module_order",
    "decode_matrix",
    "encode",
    "encoded_codewords",
    "function_module_map",
    "place_codewords",
    "read_codewords",
]
