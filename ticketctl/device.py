"""Resolving `--device auto|cpu|cuda` once, with a clear error where CUDA is missing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ticketctl.errors import TicketctlError
from ticketctl.records import Choice


class Device(Choice):
    """`--device`: a GPU when there is one, or the one named."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def configure_cuda() -> None:
    """Process-wide CUDA switches, set once at program start (the CLI's, a benchmark's): every
    training step has fixed shapes, so cuDNN's autotuner picks the fastest convolution once,
    and fp32 matmuls may use TF32 (training runs in bf16 anyway)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True


@dataclass(frozen=True)
class CudaSwitches:
    """The process-wide switches a spawned worker takes from its parent. A spawned process
    starts from PyTorch's defaults (no cuDNN autotuning, no TF32 matmuls): without them a
    sweep worker's convolutions were chosen by heuristics and frozen into its CUDA graph, 12%
    slower an epoch than the parent's (ResNet-20 packs on an H200). `matmul_precision` is
    the matmul TF32 state as PyTorch records it ("none" until set, then "ieee" or "tf32";
    None where this torch has no such record): Inductor's cache key includes it, so a worker
    must end with the parent's exact value to share its compiled code."""

    cudnn_benchmark: bool
    cudnn_tf32: bool
    matmul_tf32: bool
    threads: int
    matmul_precision: str | None = None

    @classmethod
    def current(cls) -> CudaSwitches:
        return cls(cudnn_benchmark=torch.backends.cudnn.benchmark,
                   cudnn_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
                   threads=torch.get_num_threads(),
                   matmul_precision=getattr(torch.backends.cuda.matmul, "fp32_precision",
                                            None))

    def apply(self) -> None:
        """Set what differs from this process's state. A TF32 flag set to the value it
        already has is not the same state: PyTorch then records an explicit precision
        ("ieee" where the parent has "none"), and a worker that did so compiled under
        another cache key than its parent's."""
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        if torch.backends.cudnn.allow_tf32 != self.cudnn_tf32:
            torch.backends.cudnn.allow_tf32 = self.cudnn_tf32
        # Through the flag, as the parent sets it: PyTorch refuses to read the flag once
        # the two ways of setting TF32 have been mixed in one process.
        matmul = torch.backends.cuda.matmul
        here = getattr(matmul, "fp32_precision", None)
        if here is not None and self.matmul_precision is not None:
            if here != self.matmul_precision and self.matmul_precision != "none":
                matmul.allow_tf32 = self.matmul_precision == "tf32"
        elif matmul.allow_tf32 != self.matmul_tf32:
            matmul.allow_tf32 = self.matmul_tf32
        torch.set_num_threads(self.threads)


def configure_threads(threads: int | None) -> None:
    """The CPU threads one operation may use (None: PyTorch's default, one per core). The
    digits networks gain little from a second thread and lose much when the cores are
    shared, where OpenMP threads wait on each other (docs/BENCHMARKS.md: the demo)."""
    if threads is None:
        return
    if threads < 1:
        raise TicketctlError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def resolve_device(name: str = "auto") -> torch.device:
    name = str(name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TicketctlError("--device cuda was asked for but this machine has no usable "
                                 "CUDA GPU; use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise TicketctlError(f"unknown device {name!r}; use auto, cpu or cuda")
