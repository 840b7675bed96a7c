"""Attacks that keep which weights exist but change what they hold: post-training quantization
(how a stolen ticket is usually deployed) and Gaussian noise on the kept weights. Neither
trains. Quantization keeps a zero at zero, so the mask survives, except for kept weights too
small for the coarsest step, which round to zero; noise leaves the mask exactly as it was."""

from __future__ import annotations

import torch

from ticketctl.artifacts import Ticket
from ticketctl.attacks.removal import attack_mask
from ticketctl.errors import TicketctlError

FP8 = "fp8"  # float8 e4m3 (torch.float8_e4m3fn), per-channel scaled
FP8_MAX = 448.0  # the largest finite e4m3fn value
MIN_BITS, MAX_BITS = 2, 16


def parse_formats(text: str) -> list[str]:
    """`--bits 8,6,4,fp8` as row labels `int8`, `int6`, `int4`, `fp8`; bits outside 2-16 and
    unknown words are refused, naming the value."""
    out = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        if word.lower() == FP8:
            if not hasattr(torch, "float8_e4m3fn"):
                raise TicketctlError("--bits fp8 needs a PyTorch with float8 (2.1 or newer)")
            out.append(FP8)
            continue
        try:
            bits = int(word)
        except ValueError:
            raise TicketctlError(f"--bits takes whole numbers of bits from {MIN_BITS} to "
                                 f"{MAX_BITS} or 'fp8', got {word!r}") from None
        if not MIN_BITS <= bits <= MAX_BITS:
            raise TicketctlError(f"--bits must be from {MIN_BITS} to {MAX_BITS}, got {bits}")
        out.append(f"int{bits}")
    if not out:
        raise TicketctlError("--bits needs at least one value")
    return out


def quantize_weight(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """One weight quantized per output channel (row) and dequantized: symmetric integers of
    `intN` (2^(N-1) - 1 steps a side, so at most 2^N - 1 values a channel, zero among them),
    or float8 e4m3 scaled so the channel's largest |w| maps to 448."""
    flat = w.detach().reshape(w.shape[0], -1).double()
    amax = flat.abs().amax(dim=1, keepdim=True)
    if fmt == FP8:
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        q = (flat / scale).to(torch.float32).to(torch.float8_e4m3fn).to(torch.float64)
    else:
        levels = 2 ** (int(fmt.removeprefix("int")) - 1) - 1
        scale = torch.where(amax > 0, amax / levels, torch.ones_like(amax))
        q = torch.round(flat / scale).clamp(-levels, levels)
    # (+0.0 stays +0.0: zero times a positive scale)
    return (q * scale).to(w.dtype).reshape(w.shape)


def quantized(ticket: Ticket, fmt: str) -> dict[str, torch.Tensor]:
    """The released state with every conv and linear weight (the attacker's view: all of
    them, the first conv too) quantized in `fmt`; biases and BatchNorm kept in float, as
    int8 deployments keep them."""
    state = dict(ticket.state)
    for k in attack_mask(ticket):
        state[k] = quantize_weight(ticket.state[k], fmt)
    return state


def check_sigmas(sigmas: list[float]) -> None:
    """Noise strengths must be positive and finite (a fraction of a layer's spread)."""
    for s in sigmas:
        if not 0 < s < float("inf"):
            raise TicketctlError(f"--sigmas must be positive and finite, got {s}")


def noised(ticket: Ticket, sigma: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gaussian noise on every kept weight of every conv and linear layer, of `sigma` times
    the standard deviation of that layer's kept weights; pruned weights stay exactly zero."""
    check_sigmas([sigma])
    gen = torch.Generator().manual_seed(seed)
    state = dict(ticket.state)
    for k, m in attack_mask(ticket).items():
        w = ticket.state[k]
        kept = w[m]
        std = float(kept.double().std()) if kept.numel() > 1 else 0.0
        noise = torch.randn(w.shape, generator=gen, dtype=torch.float64) * (sigma * std)
        state[k] = torch.where(m, w + noise.to(w.dtype), torch.zeros_like(w))
    return state
