"""The Mask type: which weights of which parameters a ticket keeps."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ticketctl.errors import TicketctlError


def tensor_digest(h: hashlib._Hash, name: str, t: torch.Tensor) -> None:
    """Feed a canonical encoding of one named tensor to a hash: name, dtype, shape, raw bytes."""
    t = t.detach().to("cpu").contiguous()
    h.update(name.encode("utf-8") + b"\0")
    h.update(str(t.dtype).removeprefix("torch.").encode() + b"\0")
    h.update(",".join(str(s) for s in t.shape).encode() + b"\0")
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # the bytes, not a copy


class Mask(Mapping[str, torch.Tensor]):
    """A validated set of 0/1 masks keyed by parameter name (bool tensors on the CPU)."""

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self._m: dict[str, torch.Tensor] = {}
        for name, t in masks.items():
            t = t.detach().to("cpu")
            if t.dtype != torch.bool:
                if not bool(((t == 0) | (t == 1)).all()):
                    raise TicketctlError(f"mask {name!r} holds values other than 0 and 1")
                t = t != 0
            self._m[name] = t.clone()

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
        return int(sum(int(t.sum()) for t in self._m.values()))

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
            kept, total = int(t.sum()), t.numel()
            rows.append({"name": name, "shape": list(t.shape), "kept": kept, "total": total,
                         "density": kept / total if total else 1.0})
        return rows

    def sha256(self) -> str:
        """Content hash of the masks alone, independent of how they were stored."""
        h = hashlib.sha256()
        for name in sorted(self._m):
            tensor_digest(h, name, self._m[name].to(torch.uint8))
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
        """A copy of a state dict with pruned weights zeroed."""
        out = dict(state)
        for name, t in self._m.items():
            w = state[name]
            # where, not multiply: a pruned weight is +0.0, never -0.0, so equal tickets
            # are equal bit for bit
            out[name] = torch.where(t.to(w.device), w, torch.zeros_like(w))
        return out
