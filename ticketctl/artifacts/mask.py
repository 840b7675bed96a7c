"""The Mask type: which weights of which parameters a ticket keeps."""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ticketctl.errors import TicketctlError
from ticketctl.threads import map_on_cores


def _encoding(name: str, dtype: torch.dtype, shape: tuple[int, ...] | torch.Size) -> bytes:
    """A tensor's name, dtype and shape as the hashes encode them."""
    return (name.encode("utf-8") + b"\0" + str(dtype).removeprefix("torch.").encode() + b"\0"
            + ",".join(str(s) for s in shape).encode() + b"\0")


def tensor_digest(h: hashlib._Hash, name: str, t: torch.Tensor) -> None:
    """Feed a canonical encoding of one named tensor to a hash: name, dtype, shape, raw bytes
    (the hashes of format versions 1 and 2, which stream every byte into one hash)."""
    t = t.detach().to("cpu").contiguous()
    h.update(_encoding(name, t.dtype, t.shape))
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # the bytes, not a copy


def _layout(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.stride())


def raw_sha256(t: torch.Tensor) -> bytes:
    """SHA-256 of one tensor's raw bytes, cached on the tensor until it changes (another
    storage, layout or in-place version): a ticket derived from another (signed, merged)
    hashes only the tensors it changed."""
    rec = getattr(t, "_ticketctl_sha256", None)
    if rec is not None and rec[0] == _layout(t):
        return rec[1]
    c = t.detach().to("cpu").contiguous()
    digest = hashlib.sha256(memoryview(c.reshape(-1).view(torch.uint8).numpy())).digest()
    remember_sha256(t, digest)
    return digest


def raw_sha256_all(tensors: list[torch.Tensor]) -> list[bytes]:
    """`raw_sha256` of each tensor, those not yet cached hashed on every core (hashlib
    releases the GIL while it hashes): signing rehashes the layers it changed, a library
    load every tensor."""
    todo = [t for t in tensors if getattr(t, "_ticketctl_sha256", (None,))[0] != _layout(t)]
    if sum(t.numel() * t.element_size() for t in todo) > PARALLEL_HASH_BYTES:
        map_on_cores(raw_sha256, sorted(todo, key=lambda t: -t.numel()))
    return [raw_sha256(t) for t in tensors]


PARALLEL_HASH_BYTES = 32 << 20  # below this, threads cost more than they save


def remember_sha256(t: torch.Tensor, digest: bytes) -> None:
    """Record a digest of `t`'s bytes computed elsewhere (from the file they were read from)."""
    t._ticketctl_sha256 = (_layout(t), digest)  # type: ignore[attr-defined]


def kept_count(t: torch.Tensor) -> int:
    """How many entries of a mask are set, cached on the tensor until it changes (a ticket's
    density and kept count are asked for many times)."""
    rec = getattr(t, "_ticketctl_kept", None)
    if rec is not None and rec[0] == _layout(t):
        return rec[1]
    n = int(torch.count_nonzero(t))
    t._ticketctl_kept = (_layout(t), n)  # type: ignore[attr-defined]
    return n


def kept_floor(weight: torch.Tensor, mask: torch.Tensor) -> float | None:
    """The smallest kept |w| of one layer (None when it keeps nothing): the receipt's
    magnitude floor is the least of these. Cached on the weight for this very mask until
    either changes; `remember_floor` records one found while doing other work."""
    rec = getattr(weight, "_ticketctl_floor", None)
    if rec is not None and rec[0]() is mask and rec[1] == (_layout(weight), _layout(mask)):
        return rec[2]
    if not kept_count(mask):
        value = None
    else:  # |w| with the pruned positions at +inf: faster than gathering the kept weights
        value = float(weight.abs().masked_fill_(~mask, float("inf")).min())
    remember_floor(weight, mask, value)
    return value


def remember_floor(weight: torch.Tensor, mask: torch.Tensor, value: float | None) -> None:
    weight._ticketctl_floor = (weakref.ref(mask), (_layout(weight), _layout(mask)), value)  # type: ignore[attr-defined]


def listed_sha256(entries: Iterable[tuple[str, torch.dtype, Any, bytes]]) -> str:
    """The hash of format version 3: SHA-256 over each tensor in name order as its name,
    dtype, shape and the SHA-256 of its raw bytes (so unchanged tensors need no rehash)."""
    h = hashlib.sha256()
    for name, dtype, shape, digest in sorted(entries, key=lambda e: e[0]):
        h.update(_encoding(name, dtype, shape))
        h.update(digest)
    return h.hexdigest()


def mark_clean(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Record that every pruned position of `weight` holds +0.0 under `mask`, so applying
    the mask again (a derived ticket sharing the tensors) can be skipped. Any in-place change
    to either tensor bumps its version and voids the record."""
    weight._ticketctl_clean = (weakref.ref(mask), mask._version, weight._version)  # type: ignore[attr-defined]


def is_clean(weight: torch.Tensor, mask: torch.Tensor) -> bool:
    rec = getattr(weight, "_ticketctl_clean", None)
    return (rec is not None and rec[0]() is mask and rec[1] == mask._version
            and rec[2] == weight._version)


def as_bool(name: str, t: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask tensor as bool: a uint8 one (as files store them) is checked with one
    reduction and viewed, not copied."""
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.dtype == torch.bool:
        return t
    if t.dtype == torch.uint8:
        if t.numel() and int(t.max()) > 1:
            raise TicketctlError(f"mask {name!r} holds values other than 0 and 1")
        b = t.contiguous().view(torch.bool)
        rec = getattr(t, "_ticketctl_sha256", None)
        if rec is not None and rec[0] == _layout(t):  # the same bytes: the same digest
            remember_sha256(b, rec[1])
        return b
    if not bool(((t == 0) | (t == 1)).all()):
        raise TicketctlError(f"mask {name!r} holds values other than 0 and 1")
    return t != 0


class Mask(Mapping[str, torch.Tensor]):
    """A validated set of 0/1 masks keyed by parameter name (bool tensors on the CPU).

    By default the tensors are copied, so the Mask never shares memory with its caller;
    `copy=False` takes them as they are, for a caller that hands them over (a file just read,
    or a derived ticket that leaves a layer's mask unchanged)."""

    def __init__(self, masks: Mapping[str, torch.Tensor], copy: bool = True) -> None:
        self._m: dict[str, torch.Tensor] = {}
        for name, t in masks.items():
            b = as_bool(name, t)
            # a bool or uint8 mask comes back as (a view of) the caller's tensor
            shared = t.dtype in (torch.bool, torch.uint8) and t.device.type == "cpu"
            self._m[name] = b.clone() if copy and shared else b

    # Mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._m[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._m)

    def __len__(self) -> int:
        return len(self._m)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask) or set(self) != set(other):
            return False
        return all(torch.equal(self[n], other[n]) for n in self)

    def __repr__(self) -> str:
        return f"Mask({len(self)} layers, density={self.density:.4%})"

    @classmethod
    def ones(cls, model: nn.Module, names: list[str]) -> Mask:
        params = dict(model.named_parameters())
        return cls({n: torch.ones_like(params[n], dtype=torch.bool) for n in names})

    @property
    def num_kept(self) -> int:
        return sum(kept_count(t) for t in self._m.values())

    @property
    def num_total(self) -> int:
        return int(sum(t.numel() for t in self._m.values()))

    @property
    def density(self) -> float:
        total = self.num_total
        return self.num_kept / total if total else 1.0

    def layer_report(self) -> list[dict]:
        rows = []
        for name, t in self._m.items():
            kept, total = kept_count(t), t.numel()
            rows.append({"name": name, "shape": list(t.shape), "kept": kept, "total": total,
                         "density": kept / total if total else 1.0})
        return rows

    def sha256(self) -> str:
        """Content hash of the masks alone, independent of how they were stored: each mask
        as uint8, listed as in `listed_sha256`."""
        digests = raw_sha256_all(list(self._m.values()))
        return listed_sha256((n, torch.uint8, t.shape, d)
                             for (n, t), d in zip(self._m.items(), digests, strict=True))

    def legacy_sha256(self) -> str:
        """The masks' hash as format versions 1 and 2 record it (every byte streamed)."""
        h = hashlib.sha256()
        for name in sorted(self._m):
            tensor_digest(h, name, self._m[name].view(torch.uint8))
        return h.hexdigest()

    def is_subset_of(self, other: Mask) -> bool:
        return set(self) == set(other) and all(
            bool((self[n] & ~other[n]).sum() == 0) for n in self
        )

    def check_shapes(self, shapes: Mapping[str, torch.Size], where: str = "") -> None:
        for name, t in self._m.items():
            if name not in shapes:
                raise TicketctlError(f"{where}mask {name!r} names no parameter of the model")
            if tuple(t.shape) != tuple(shapes[name]):
                raise TicketctlError(
                    f"{where}mask {name!r} has shape {list(t.shape)} but the parameter has "
                    f"{list(shapes[name])}"
                )

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Zero the pruned weights of a model in place."""
        params = dict(model.named_parameters())
        for name, t in self._m.items():
            p = params[name]
            p.mul_(t.to(device=p.device, dtype=p.dtype))

    def apply_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of a state dict with pruned weights zeroed (a weight already known to be
        zero where pruned under this very mask tensor is taken as it is)."""
        out = dict(state)
        for name, t in self._m.items():
            w = state[name]
            if is_clean(w, t):
                continue
            # where, not multiply: a pruned weight is +0.0, never -0.0, so equal tickets
            # are equal bit for bit
            out[name] = torch.where(t.to(w.device), w, torch.zeros_like(w))
            if out[name].device.type == "cpu":
                mark_clean(out[name], t)
        return out
