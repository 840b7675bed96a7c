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
        self.masked_at = [i for i, m in enumerate(masks) if m is not None]
        self.masked_params = [params[i] for i in self.masked_at]
        self.masks = [m for m in masks if m is not None]

    @torch.no_grad()
    def step(self, lr: torch.Tensor, grads: list[torch.Tensor | None] | None = None) -> None:
        """One update from `grads` (default: the parameters' `.grad`), which are only read:
        data-parallel training passes views of the all-reduce's flat buffer, which is then
        never copied back into `.grad`. A parameter without a gradient (frozen, or not used
        by the network's forward) is left as it is, momentum included, as `torch.optim.SGD`
        leaves it."""
        grads = [p.grad for p in self.params] if grads is None else list(grads)
        live = [i for i, g in enumerate(grads) if g is not None]
        where = {i: k for k, i in enumerate(live)}
        params = [self.params[i] for i in live]
        bufs = [self.bufs[i] for i in live]
        grads = [grads[i] for i in live]
        masked = [(where[i], m) for i, m in zip(self.masked_at, self.masks, strict=True)
                  if i in where]
        if masked:  # zero the pruned weights' gradients (out of place: grads are read)
            zeroed = torch._foreach_mul([grads[k] for k, _ in masked], [m for _, m in masked])
            for (k, _), g in zip(masked, zeroed, strict=True):
                grads[k] = g
        if not params:
            return
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.momentum:
            torch._foreach_mul_(bufs, self.momentum)
            torch._foreach_add_(bufs, grads)
            update = torch._foreach_add(grads, bufs, alpha=self.momentum) \
                if self.nesterov else bufs
        else:
            update = grads
        scaled = torch._foreach_mul(update, lr)
        torch._foreach_sub_(params, scaled)
        if self.masks:
            torch._foreach_mul_(self.masked_params, self.masks)

    @torch.no_grad()
    def reset_(self) -> None:
        """Zero the momentum in place (the buffers stay the ones a CUDA graph captured)."""
        for b in self.bufs:
            b.zero_()
