"""The sparse layout of a Scheme V1 key file (ticket format version 2).

A key holds n weights and zeros everywhere else, so its file stores only those: for each masked
parameter the flat positions of its key weights and their values, and the dtype of every state
tensor (all the others are zero). Read back, it is rebuilt into the same dense key, bit for
bit, so everything past the file (hashes, merge) is unchanged. `docs/FORMAT.md` is the
specification."""

from __future__ import annotations

from typing import Any

import torch

from ticketctl.errors import TicketctlError

INDEX_SUFFIX = ".key_index"
VALUE_SUFFIX = ".key_value"
MASK_SUFFIX = ".mask"

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


def _all_zero(t: torch.Tensor) -> bool:
    """Every byte zero: -0.0 is not, since the rebuilt file would hold +0.0 there."""
    return not bool(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).any())


def sparse_key(state: dict[str, torch.Tensor],
               mask: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                        dict[str, Any]] | None:
    """(the tensors a sparse key file holds, its `sparse` metadata entry), or None when the
    state is not zero outside the mask and must be written densely."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = mask.get(name)
        if m is None:
            if not _all_zero(t):
                return None
            continue
        t = t.detach().to("cpu")
        if not _all_zero(t.masked_fill(m.to("cpu"), 0)):
            return None
        flat = m.to("cpu").reshape(-1)
        index = torch.nonzero(flat).reshape(-1)  # ascending
        tensors[name + INDEX_SUFFIX] = index.to(
            torch.int32 if flat.numel() <= torch.iinfo(torch.int32).max else torch.int64)
        tensors[name + VALUE_SUFFIX] = t.reshape(-1)[index].contiguous()
    layout = {"dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}}
    return tensors, layout


def is_sparse(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith((INDEX_SUFFIX, VALUE_SUFFIX)) for k in tensors)


def dense_key(tensors: dict[str, torch.Tensor], layout: Any,
              expected: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The dense tensors (state and `.mask`) of a sparse key file, every entry checked:
    `expected` is the architecture's state dict (names and shapes)."""
    dtypes = layout.get("dtypes") if isinstance(layout, dict) else None
    if not isinstance(dtypes, dict) or set(dtypes) != set(expected):
        raise TicketctlError(f"{where}: the sparse key's `sparse.dtypes` must name the dtype of "
                             "every tensor of the architecture")
    bad = [k for k, d in dtypes.items() if d not in DTYPES]
    if bad:
        raise TicketctlError(f"{where}: tensor {bad[0]!r} has unknown dtype {dtypes[bad[0]]!r}")
    names = set()
    for k in tensors:
        if k.endswith(INDEX_SUFFIX):
            names.add(k[: -len(INDEX_SUFFIX)])
        elif k.endswith(VALUE_SUFFIX):
            names.add(k[: -len(VALUE_SUFFIX)])
        else:
            raise TicketctlError(f"{where}: a sparse key holds only `{INDEX_SUFFIX}` and "
                                 f"`{VALUE_SUFFIX}` tensors, not {k!r}")
    out = {k: torch.zeros(v.shape, dtype=DTYPES[dtypes[k]]) for k, v in expected.items()}
    for name in sorted(names):
        index, values = tensors.get(name + INDEX_SUFFIX), tensors.get(name + VALUE_SUFFIX)
        if index is None or values is None:
            raise TicketctlError(f"{where}: {name!r} needs both {name + INDEX_SUFFIX!r} and "
                                 f"{name + VALUE_SUFFIX!r}")
        if name not in out:
            raise TicketctlError(f"{where}: key weights of {name!r}, which the architecture "
                                 "does not have")
        dense = out[name]
        if index.dtype not in (torch.int32, torch.int64) or index.ndim != 1:
            raise TicketctlError(f"{where}: {name + INDEX_SUFFIX!r} must be a list of int32 or "
                                 "int64 positions")
        if values.ndim != 1 or len(values) != len(index) or values.dtype != dense.dtype:
            raise TicketctlError(f"{where}: {name + VALUE_SUFFIX!r} must hold one "
                                 f"{dense.dtype} value per position ({len(index)})")
        index = index.to(torch.int64)
        if len(index) and (int(index[0]) < 0 or int(index[-1]) >= dense.numel()
                           or not bool((index[1:] > index[:-1]).all())):
            raise TicketctlError(f"{where}: {name + INDEX_SUFFIX!r} must be increasing "
                                 f"positions within the {dense.numel()} weights of {name!r}")
        mask = torch.zeros(dense.numel(), dtype=torch.uint8)
        mask[index] = 1
        dense.reshape(-1)[index] = values
        out[name + MASK_SUFFIX] = mask.reshape(dense.shape)
    return out
