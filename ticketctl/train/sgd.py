"""SGD with momentum and weight decay that knows the mask.

Written with foreach kernels over static buffers and a tensor learning rate so that a whole
step can be captured in one CUDA graph and replayed with a new rate. The update equals
`torch.optim.SGD` (dampening 0): d = g + wd*w; b = m*b + d; d = d + m*b (Nesterov) or b;
w -= lr*d. Gradients of pruned weights are zeroed first, so their momentum never grows, and
the weights are re-masked after the update, so nothing revives."""

from __future__ import annotations

import torch


class MaskedSGD:
    def __init__(
        self,
        params: list[torch.Tensor],
        masks: list[torch.Tensor | None],
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = False,
    ) -> None:
        self.params = params
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.nesterov = nesterov and momentum > 0
        self.bufs = [torch.zeros_like(p) for p in params]
        self.masked_params = [p for p, m in zip(params, masks, strict=True) if m is not None]
        self.masks = [m for m in masks if m is not None]

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        grads = [p.grad for p in self.params]
        if self.masks:
            torch._foreach_mul_([p.grad for p in self.masked_params], self.masks)
        if self.weight_decay:
            torch._foreach_add_(grads, self.params, alpha=self.weight_decay)
        if self.momentum:
            torch._foreach_mul_(self.bufs, self.momentum)
            torch._foreach_add_(self.bufs, grads)
            if self.nesterov:
                torch._foreach_add_(grads, self.bufs, alpha=self.momentum)
                update = grads
            else:
                update = self.bufs
        else:
            update = grads
        scaled = torch._foreach_mul(update, lr)
        torch._foreach_sub_(self.params, scaled)
        if self.masks:
            torch._foreach_mul_(self.masked_params, self.masks)

    @torch.no_grad()
    def reset_(self) -> None:
        """Zero the momentum in place (the buffers stay the ones a CUDA graph captured)."""
        for b in self.bufs:
            b.zero_()
