"""The demo pipeline on the embedded digits dataset, runnable on any CPU in seconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ticketctl.artifacts import Mask, Ticket, save_ticket
from ticketctl.artifacts.describe import describe_file
from ticketctl.data import load_dataset
from ticketctl.device import resolve_device
from ticketctl.errors import TicketctlError
from ticketctl.models import build_model, prunable_names
from ticketctl.prune import magnitude_prune
from ticketctl.train import EpochStats, TrainConfig, evaluate, train

DEMO_TRAIN = TrainConfig(epochs=8, batch_size=64, lr=0.05, momentum=0.9, nesterov=True,
                         weight_decay=5e-4, schedule="cosine", warmup_epochs=1, seed=0)


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")


def run_demo(
    out_dir: Path,
    force: bool = False,
    device: str = "cpu",
    on_epoch: Callable[[str, EpochStats], None] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the digits CNN, prune half of its prunable weights by magnitude, save the sparse
    model as a ticket file and describe it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise TicketctlError(f"{out_dir} exists and is not empty; pass --force or another "
                             "--out-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    data = load_dataset("digits", device=dev, split_seed=0)
    model = build_model("digits_cnn", data.num_classes, seed=seed,
                        in_channels=data.input_shape[0])
    cfg = TrainConfig(**{**DEMO_TRAIN.to_dict(), "seed": seed})
    dense = train(model, data, cfg, on_epoch=(lambda s: on_epoch("dense", s)) if on_epoch else None)
    names = prunable_names(model)
    mask = magnitude_prune(dict(model.named_parameters()), Mask.ones(model, names), 0.5)
    mask.apply_(model)
    pruned_acc = evaluate(model, data.test_x, data.test_y)
    ticket = Ticket.from_model(
        model, mask, kind="trained", arch="digits_cnn",
        arch_args={"in_channels": data.input_shape[0]}, num_classes=data.num_classes,
        class_names=data.class_names, dataset=data.info(), seed=seed,
        extra={"note": "demo: dense training then one-shot 50% global magnitude pruning"},
    )
    path = save_ticket(ticket, out_dir / "digits_trained.safetensors", force=force)
    return {
        "out_dir": str(out_dir),
        "dense_accuracy": dense.test_accuracy,
        "pruned_accuracy": pruned_acc,
        "density": ticket.density,
        "files": [str(path)],
        "inspect": describe_file(path),
        "seconds": time.perf_counter() - t0,
    }
