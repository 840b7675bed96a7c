"""Training speed of ResNet-20 on CIFAR-shaped data: the paper authors' pipeline against ticketctl.

Runs in one process and times whole training epochs (no evaluation inside the timed region) of
ResNet-20 under a fixed 20%-density mask, for each batch size and each of:

(a) eager fp32 with a ``torch.utils.data.DataLoader`` (2 workers, pinned memory) and per-sample
    CPU transforms (random crop with 4-pixel padding, horizontal flip, to-tensor, normalise),
    i.e. what the paper authors' code does; torchvision transforms when torchvision is
    importable, an equivalent hand-written version otherwise (the row's label says which);
(b) eager fp32 with the whole training set resident on the device, batches gathered with a
    per-epoch ``torch.randperm`` and augmented on the device by ``ticketctl.data.augment_batch``;
(c) ticketctl's ``Trainer`` (bf16 autocast, channels-last, ``torch.compile``, CUDA graphs);
    ``--variants`` adds rows with one of those switched off at a time, and one compiled with
    ``max-autotune-no-cudagraphs`` (kernels picked by timing), with the network compiled alone
    instead of the whole step (``c-unfused``, ``c-autotune-unfused``), NCHW, with the
    trainer's combo kernels (``c-combo``, ``c-combo-autotune``) and under Inductor's
    coordinate-descent tuning (``c-coord``; the autotuned and coordinate-descent rows spend
    minutes compiling). Each (c) row also times scoring the validation and the test
    split once (``eval_val_s``, ``eval_test_s``) and records its flags and Inductor settings.

Every config re-applies the mask after each optimizer step, as IMP code does. The first epoch
of every config is a warm-up: it is reported apart (its excess over the median, and for (c) the
trainer's own ``compile_seconds``) and the table shows the median of the remaining epochs.
Speed-ups are against (a) at the same batch size, plus (c) against (b). For (c) the script
also times the start of a second IMP round (prune, rewind, new Trainer, first epoch), and for
every run the between-round step alone: global magnitude pruning at rate 0.2 of the trained
weights plus an in-place rewind of all parameters and buffers (median of 5).

Each config runs in its own try/except: a failure is printed on stderr, recorded as an error
row, and the remaining configs still run. With ``--json-out`` the JSON file is rewritten after
every row, so a run killed by a time limit still leaves what it measured. ``--budget-s`` stops
starting new rows once that many seconds have passed (the rows left are recorded as skipped).

Run from the repository root::

    python benchmarks/train_speed.py                          # GPU: batch 128 and 512, a,b,c
    python benchmarks/train_speed.py --variants --json-out speed.json --md-out speed.md
    python benchmarks/train_speed.py --data-dir ~/data/cifar10   # real CIFAR-10 instead
    python benchmarks/train_speed.py --smoke --configs a,b     # tiny CPU check

Without ``--data-dir`` the data are synthetic (uniform pixels, random labels): fine for speed,
meaningless for accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ticketctl.artifacts import Mask
from ticketctl.data import Dataset, augment_batch, load_dataset
from ticketctl.device import configure_cuda, resolve_device
from ticketctl.models import build_model, prunable_names
from ticketctl.prune import magnitude_prune
from ticketctl.train import TrainConfig, Trainer

try:  # torchvision is optional: (a) falls back to hand-written transforms without it
    import torchvision
    from torchvision import transforms as tv_transforms
except ImportError:  # pragma: no cover - depends on the machine
    torchvision = None
    tv_transforms = None

ARCH = "resnet20"
DENSITY = 0.2  # the fixed mask every config trains under
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
PAD = 4
LOADER_WORKERS = 2
PRUNE_REWIND_REPEATS = 5

LABELS = {
    "a": "(a) DataLoader + per-sample CPU transforms (torchvision)",
    "a-hand": "(a) DataLoader + per-sample CPU transforms (hand-written, torchvision absent)",
    "b": "(b) eager fp32, data on device",
    "c": "(c) ticketctl Trainer",
    "c-nograph": "(c) no graph",
    "c-nocompile": "(c) graph, no compile",
    "c-eager": "(c) eager bf16 (no compile, no graph)",
    "c-fp32": "(c) fp32",
    "c-autotune": "(c) compile mode max-autotune-no-cudagraphs",
    "c-nchw": "(c) NCHW (channels_last off)",
    "c-autotune-nchw": "(c) NCHW, compile mode max-autotune-no-cudagraphs",
    "c-unfused": "(c) network compiled alone (fuse_step off: as before 2026-11-30)",
    "c-autotune-unfused": "(c) network compiled alone, max-autotune-no-cudagraphs",
    "c-combo": "(c) Inductor combo kernels (independent kernels launched as one)",
    "c-combo-autotune": "(c) combo kernels, compile mode max-autotune-no-cudagraphs",
    "c-coord": "(c) Inductor coordinate-descent tuning of its kernels' launch settings",
}
# Trainer flags each (c) variant switches off.
C_VARIANTS: dict[str, dict[str, Any]] = {
    "c": {},
    "c-nograph": {"cuda_graph": False},
    "c-nocompile": {"compile": False},
    "c-eager": {"compile": False, "cuda_graph": False},
    "c-fp32": {"bf16": False},
    "c-autotune": {"compile_mode": "max-autotune-no-cudagraphs"},
    # ResNet-20's 16-64 channel convolutions at batch 128 are small; whether cuDNN's NHWC
    # kernels or its NCHW ones are faster there is what these rows show
    "c-nchw": {"channels_last": False},
    "c-autotune-nchw": {"channels_last": False, "compile_mode": "max-autotune-no-cudagraphs"},
    # the step's gather, augmentation, loss and SGD update outside the compiled network
    "c-unfused": {"fuse_step": False},
    "c-autotune-unfused": {"fuse_step": False, "compile_mode": "max-autotune-no-cudagraphs"},
    # the trainer's --combo-kernels
    "c-combo": {"combo_kernels": True},
    "c-combo-autotune": {"combo_kernels": True, "compile_mode": "max-autotune-no-cudagraphs"},
    "c-coord": {},
}
# Inductor settings (not trainer settings) a (c) variant compiles under, for the row only:
# whether they would be worth a trainer option is what the rows show.
C_INDUCTOR: dict[str, dict[str, Any]] = {
    "c-coord": {"coordinate_descent_tuning": True},
}


# --------------------------------------------------------------------------------------------
# helpers


def log(msg: str) -> None:
    """Progress on stderr, so stdout holds only the results."""
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def backend_flags() -> dict[str, Any]:
    """Global numeric switches that change eager speed (recorded, and restored after a row)."""
    flags: dict[str, Any] = {"cudnn_benchmark": torch.backends.cudnn.benchmark,
                             "float32_matmul_precision": torch.get_float32_matmul_precision()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            flags["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
            flags["matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        except Exception:  # noqa: BLE001 - newer torch may refuse the legacy read
            pass
    return flags


def restore_backend_flags(saved: dict[str, Any]) -> None:
    """Undo global switches a config changed (the (c) rows set ticketctl's, as its CLI does)."""
    if torch.backends.cudnn.benchmark != saved["cudnn_benchmark"]:
        torch.backends.cudnn.benchmark = saved["cudnn_benchmark"]
    if torch.get_float32_matmul_precision() != saved["float32_matmul_precision"]:
        torch.set_float32_matmul_precision(saved["float32_matmul_precision"])


def fixed_mask(model: nn.Module) -> Mask:
    """The 20%-density mask all configs train under: global magnitude pruning at init."""
    ones = Mask.ones(model, prunable_names(model))
    return magnitude_prune(dict(model.named_parameters()), ones, 1.0 - DENSITY)


def device_masks(model: nn.Module, mask: Mask) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, float mask on its device) pairs for re-masking after each step."""
    params = dict(model.named_parameters())
    return [(params[n], m.to(device=params[n].device, dtype=params[n].dtype))
            for n, m in mask.items()]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent of an eager model (a sanity check, outside the timed region)."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train()
    return 100.0 * correct / max(1, len(y))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer (a rewind point)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def rewind_(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy a rewind point back into the model's own tensors, in place."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t.copy_(saved[name])


def epoch_summary(times: list[float]) -> dict[str, Any]:
    """First epoch = warm-up; the median of the rest is the reported s/epoch."""
    timed = times[1:]
    med = statistics.median(timed)
    return {"epoch_seconds": [round(t, 4) for t in times], "median_s": med,
            "epochs_timed": len(timed), "warmup_s": times[0],
            "warmup_excess_s": max(0.0, times[0] - med)}


def run_epochs(n_epochs: int, device: torch.device, one_epoch: Callable[[int], Any]) -> list[float]:
    """Time ``n_epochs`` calls of ``one_epoch(epoch)`` (epochs from 1), synchronising the GPU."""
    times = []
    for epoch in range(1, n_epochs + 1):
        sync(device)
        t0 = time.perf_counter()
        one_epoch(epoch)
        sync(device)
        times.append(time.perf_counter() - t0)
        log(f"    epoch {epoch}: {times[-1]:.3f} s")
    return times


# --------------------------------------------------------------------------------------------
# (a) the authors' pipeline: DataLoader + per-sample CPU transforms


class HandTransform:
    """RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize, by hand."""

    def __init__(self, mean: Iterable[float], std: Iterable[float]) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(img)  # H x W x C uint8
        h, w = arr.shape[:2]
        padded = np.pad(arr, ((PAD, PAD), (PAD, PAD), (0, 0)))  # zero fill, like torchvision
        top, left = random.randint(0, 2 * PAD), random.randint(0, 2 * PAD)
        crop = padded[top:top + h, left:left + w]
        if random.random() < 0.5:
            crop = crop[:, ::-1]
        t = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float().div_(255.0)
        return t.sub_(self.mean).div_(self.std)


class UInt8Images(torch.utils.data.Dataset):
    """N x H x W x C uint8 images and labels; each item goes through PIL and a transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def to_uint8_hwc(data: Dataset, x: torch.Tensor) -> np.ndarray:
    """Un-normalise device images back to uint8 H x W x C on the CPU (what files would hold)."""
    pixels = data.denormalize(x).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def make_cpu_transform(data: Dataset) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    if tv_transforms is not None:
        return tv_transforms.Compose([
            tv_transforms.RandomCrop(32, padding=PAD),
            tv_transforms.RandomHorizontalFlip(),
            tv_transforms.ToTensor(),
            tv_transforms.Normalize(data.mean, data.std),
        ]), LABELS["a"]
    return HandTransform(data.mean, data.std), LABELS["a-hand"]


def bench_a(data: Dataset, bs: int, epochs: int, device: torch.device,
            eval_n: int) -> tuple[dict[str, Any], nn.Module]:
    torch.manual_seed(0)
    transform, label = make_cpu_transform(data)
    images = to_uint8_hwc(data, data.train_x)
    labels = data.train_y.cpu().numpy()
    loader = torch.utils.data.DataLoader(
        UInt8Images(images, labels, transform), batch_size=bs, shuffle=True,
        num_workers=LOADER_WORKERS, pin_memory=device.type == "cuda", drop_last=False)
    model = build_model(ARCH, num_classes=data.num_classes, seed=0).to(device).train()
    pairs = device_masks(model, fixed_mask(model))
    with torch.no_grad():
        for p, m in pairs:
            p.mul_(m)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)

    def one_epoch(_: int) -> None:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p, m in pairs:
                    p.mul_(m)

    row = {"label": label, "steps_per_epoch": len(loader), "images_per_epoch": len(labels),
           "loader_workers": LOADER_WORKERS,
           **epoch_summary(run_epochs(epochs, device, one_epoch))}
    row["test_acc"] = accuracy(model, data.test_x[:eval_n], data.test_y[:eval_n])
    return row, model


# --------------------------------------------------------------------------------------------
# (b) eager fp32 with the data resident on the device


def bench_b(data: Dataset, bs: int, epochs: int, device: torch.device,
            eval_n: int) -> tuple[dict[str, Any], nn.Module]:
    torch.manual_seed(0)
    model = build_model(ARCH, num_classes=data.num_classes, seed=0).to(device).train()
    pairs = device_masks(model, fixed_mask(model))
    with torch.no_grad():
        for p, m in pairs:
            p.mul_(m)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)
    n = len(data.train_y)

    def batches() -> Iterator[torch.Tensor]:
        order = torch.randperm(n, device=device)
        for i in range(0, n, bs):  # keep the last partial batch, like (a)
            yield order[i:i + bs]

    def one_epoch(_: int) -> None:
        for idx in batches():
            x = augment_batch(data.train_x[idx], "crop_flip")
            loss = F.cross_entropy(model(x), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p, m in pairs:
                    p.mul_(m)

    row = {"label": LABELS["b"], "steps_per_epoch": math.ceil(n / bs), "images_per_epoch": n,
           **epoch_summary(run_epochs(epochs, device, one_epoch))}
    row["test_acc"] = accuracy(model, data.test_x[:eval_n], data.test_y[:eval_n])
    return row, model


# --------------------------------------------------------------------------------------------
# (c) ticketctl's trainer


def reset_compiler() -> None:
    """Forget compiled code from earlier rows, so each (c) row compiles for its own batch size
    (a shape change would otherwise recompile with a dynamic batch dimension). Inductor's
    on-disk cache still helps later rows, which shows in their compile time."""
    try:
        torch._dynamo.reset()
    except Exception as exc:  # noqa: BLE001 - best effort
        log(f"    torch._dynamo.reset() failed: {exc}")


def bench_c(data: Dataset, bs: int, epochs: int, device: torch.device, variant: str,
            round2: bool, profile: bool = False) -> tuple[dict[str, Any], nn.Module]:
    """One (c) row; a variant with Inductor settings compiles under them, for its row only
    (every row starts from a reset compiler, so no later row reuses that code)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(C_INDUCTOR.get(variant, {})):  # every compilation of the row
        return _bench_c(data, bs, epochs, device, variant, round2, profile)


def inductor_settings() -> dict[str, Any]:
    """The Inductor settings the (c) variants change, as they are now (recorded per row)."""
    import torch._inductor.config as inductor_config

    return {k: getattr(inductor_config, k) for v in C_INDUCTOR.values() for k in v}


def _bench_c(data: Dataset, bs: int, epochs: int, device: torch.device, variant: str,
             round2: bool, profile: bool = False) -> tuple[dict[str, Any], nn.Module]:
    reset_compiler()
    configure_cuda()  # what the ticketctl CLI sets at start; undone after the row
    torch.manual_seed(0)
    flags = {"bf16": True, "channels_last": True, "compile": True, "cuda_graph": True,
             "fuse_step": True}
    flags.update(C_VARIANTS[variant])
    cfg = TrainConfig(epochs=epochs, batch_size=bs, lr=LR, momentum=MOMENTUM,
                      weight_decay=WEIGHT_DECAY, schedule="multistep", milestones=[], seed=0,
                      **flags)
    model = build_model(ARCH, num_classes=data.num_classes, seed=0).to(device)
    init_state = snapshot(model)
    mask = fixed_mask(model)
    trainer = Trainer(model, data, cfg, mask=mask)
    summary = epoch_summary(run_epochs(epochs, device, trainer.train_epoch))
    steps = trainer.steps_per_epoch
    row: dict[str, Any] = {"label": LABELS[variant], "flags": flags, "steps_per_epoch": steps,
                           "images_per_epoch": steps * bs, **summary}
    row["compile_seconds"] = trainer.compile_seconds
    row["inductor"] = inductor_settings()
    row.update(eval_seconds(trainer, device))
    try:
        row["test_acc"] = float(trainer.evaluate("test"))
    except Exception as exc:  # noqa: BLE001 - timing stands without the sanity check
        row["eval_error"] = f"{type(exc).__name__}: {exc}"
    if profile:  # after the accuracy, which then is that of as many epochs as other rows'
        row["profile"] = profile_epoch(trainer, device, epoch=epochs + 1)
    if round2:
        row["round2"] = next_round(trainer, model, mask, init_state, summary, device)
    return row, model


def profile_epoch(trainer: Trainer, device: torch.device, epoch: int, top: int = 25
                  ) -> dict[str, Any]:
    """Where one more epoch's device time goes, from `torch.profiler`: kernels per step and
    their device time, and the kernels that take most of it (a step bound by many small
    kernels and one bound by a few large ones need different fixes). On a GPU, `graph_launches`
    counts the CUDA graph replays beside the kernels: with a graph, kernels per step near
    the eager row's mean the profiler saw inside it; near 1, that it saw only the launches.
    On a CPU the rows are operators."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        trainer.train_epoch(epoch)
        sync(device)
    steps = trainer.steps_per_epoch
    averages = prof.key_averages()
    launches = sum(e.count for e in averages if e.key == "cudaGraphLaunch")
    events = [e for e in averages if e.device_type.name == "CUDA"
              or (device.type != "cuda" and e.self_cpu_time_total > 0)]
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events.sort(key=lambda e: getattr(e, key, 0.0), reverse=True)
    total_us = sum(getattr(e, key, 0.0) for e in events)
    return {
        "steps": steps, "unit": "kernel" if device.type == "cuda" else "operator",
        "graph_launches": launches,
        "kernels_per_step": sum(e.count for e in events) / steps,
        "device_ms_per_step": total_us / steps / 1000,
        "top": [{"name": e.key[:120], "per_step": e.count / steps,
                 "us_per_step": getattr(e, key, 0.0) / steps,
                 "share": getattr(e, key, 0.0) / total_us if total_us else 0.0}
                for e in events[:top]],
    }


def eval_seconds(trainer: Trainer, device: torch.device) -> dict[str, float]:
    """What scoring costs after an epoch (median of 3 after a warm-up): the validation split,
    which every epoch needs, and the test split, which `test_eval` "best" scores only at new
    best-validation epochs."""
    out = {}
    for split in ("val", "test"):
        times = []
        for i in range(4):
            sync(device)
            t0 = time.perf_counter()
            trainer.evaluate_models(split)
            sync(device)
            if i:
                times.append(time.perf_counter() - t0)
        out[f"eval_{split}_s"] = statistics.median(times)
    return out


def next_round(trainer: Trainer, model: nn.Module, mask: Mask,
               init_state: dict[str, torch.Tensor], summary: dict[str, Any],
               device: torch.device) -> dict[str, Any]:
    """Start the next IMP round: prune, then rewind, re-mask and reset momentum in place
    (`Trainer.restart`, which keeps the compiled model and captured graph), then one epoch.
    Reports the set-up time and the first epoch's time."""
    sync(device)
    t0 = time.perf_counter()
    new_mask = magnitude_prune(dict(model.named_parameters()), mask, 0.2)
    trainer.restart(init_state, mask=new_mask)
    sync(device)
    setup = time.perf_counter() - t0
    compile_before = trainer.compile_seconds
    log("    round 2 (same Trainer, in place):")
    first = run_epochs(1, device, trainer.train_epoch)[0]
    return {
        "path": "same Trainer, in place", "setup_s": setup, "first_epoch_s": first,
        "excess_over_median_s": first - summary["median_s"],
        "compile_seconds": trainer.compile_seconds - compile_before,
    }


# --------------------------------------------------------------------------------------------
# between rounds: prune + rewind


def bench_prune_rewind(model: nn.Module, source: str, device: torch.device) -> dict[str, Any]:
    """Global magnitude pruning (rate 0.2) of trained weights + in-place rewind + re-zeroing."""
    model = model.to(device)
    trained = snapshot(model)
    mask = fixed_mask(build_model(ARCH, seed=0))  # a 20%-density mask on matching names
    gen = torch.Generator().manual_seed(1)
    rewind_point = {k: (v + 0.01 * torch.randn(v.shape, generator=gen).to(v.device, v.dtype))
                    if v.is_floating_point() else v.clone() for k, v in trained.items()}
    times = []
    for i in range(PRUNE_REWIND_REPEATS + 1):  # the first is a warm-up
        rewind_(model, trained)  # untimed: start every repeat from the trained weights
        sync(device)
        t0 = time.perf_counter()
        new_mask = magnitude_prune(dict(model.named_parameters()), mask, 0.2)
        rewind_(model, rewind_point)
        new_mask.apply_(model)
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "seconds": [round(t, 5) for t in times],
            "model_from": source, "density_after": new_mask.density}


# --------------------------------------------------------------------------------------------
# output


def fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up vs (a) at the same batch size (median_a / median_row), and (c) vs (b)."""
    def base(kind: str, bs: int) -> float | None:
        for r in rows:
            if r["config"] == kind and r["batch"] == bs and "median_s" in r:
                return r["median_s"]
        return None

    for r in rows:
        if "median_s" not in r:
            continue
        a, b = base("a", r["batch"]), base("b", r["batch"])
        r["speedup_vs_a"] = a / r["median_s"] if a else None
        if r["config"].startswith("c"):
            r["speedup_vs_b"] = b / r["median_s"] if b else None


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]],
                    prune: dict[str, Any] | None) -> str:
    lines = [
        f"ResNet-20 training speed on {meta['gpu']} | torch {meta['torch']} | "
        f"torchvision {meta['torchvision'] or 'absent'} | data {meta['data']} "
        f"({meta['train_size']} train images) | mask density {DENSITY:.0%} | "
        f"TF32 conv {meta['flags'].get('cudnn_allow_tf32', '?')}, "
        f"matmul {meta['flags'].get('matmul_allow_tf32', '?')}",
        "",
        "| config | batch | s/epoch (median) | epochs timed | compile/warm-up s | "
        "speed-up vs (a) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        label = r.get("label", LABELS.get(r["config"], r["config"]))
        if "median_s" not in r:
            why = f"error: {r['error']}" if "error" in r else f"skipped ({r.get('skipped')})"
            lines.append(f"| {label} | {r['batch']} | {why[:140]} | | | |")
            continue
        warm = fmt(r["warmup_excess_s"], 2)
        if not math.isnan(r.get("compile_seconds", float("nan"))):
            warm += f" (compile {fmt(r['compile_seconds'], 2)})"
        speed = r.get("speedup_vs_a")
        lines.append(f"| {label} | {r['batch']} | {fmt(r['median_s'])} | {r['epochs_timed']} | "
                     f"{warm} | {fmt(speed, 2) + 'x' if speed else 'n/a'} |")
    lines.append("")
    for r in rows:
        if r.get("speedup_vs_b"):
            lines.append(f"- {r['label']} vs (b) at batch {r['batch']}: "
                         f"{r['speedup_vs_b']:.2f}x")
    for r in rows:
        if "round2" in r:
            r2 = r["round2"]
            lines.append(
                f"- {r['label']}, next IMP round at batch {r['batch']} ({r2['path']}): "
                f"prune + rewind + re-mask {r2['setup_s']:.3f} s, then first epoch "
                f"{r2['first_epoch_s']:.3f} s (steady {r['median_s']:.3f} s; compile in it "
                f"{fmt(r2['compile_seconds'], 2)} s)")
    short = sorted({(r["batch"], r["images_per_epoch"]) for r in rows
                    if r.get("images_per_epoch", meta["train_size"]) != meta["train_size"]})
    for bs, n_img in short:
        lines.append(f"- at batch {bs} some rows drop the last partial batch: {n_img} of "
                     f"{meta['train_size']} images per epoch (see JSON images_per_epoch)")
    if prune is not None:
        if "error" in prune:
            lines.append(f"- prune + rewind: error: {prune['error']}")
        else:
            verdict = "under" if prune["median_s"] < 1.0 else "NOT under"
            lines.append(
                f"- prune + rewind between rounds (global magnitude rate 0.2 of trained "
                f"ResNet-20 + in-place rewind + re-zero, model from {prune['model_from']}): "
                f"{prune['median_s']:.4f} s median of {len(prune['seconds'])} ({verdict} 1 s)")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# main


def load_data(args: argparse.Namespace, device: torch.device, test_n: int) -> Dataset:
    if args.data_dir:
        data = load_dataset("cifar10", args.data_dir, device=device)
    else:
        size = math.ceil(args.train_size / 0.9)  # the synthetic registry holds out 10% for val
        while size - size // 10 < args.train_size:
            size += 1
        data = load_dataset("synthetic", device=device, synthetic_size=max(size, 2))
    if len(data.train_y) < args.train_size:
        raise SystemExit(f"only {len(data.train_y)} training images; lower --train-size")
    return dataclasses.replace(
        data, train_x=data.train_x[:args.train_size], train_y=data.train_y[:args.train_size],
        test_x=data.test_x[:test_n], test_y=data.test_y[:test_n])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="128,512", help="comma-separated (default 128,512)")
    ap.add_argument("--configs", default="a,b,c",
                    help=f"comma-separated from a, b, {', '.join(C_VARIANTS)}")
    ap.add_argument("--profile", default="",
                    help="comma-separated (c) configs to profile one more epoch of with "
                         "torch.profiler: kernels per step and the top kernels (JSON 'profile')")
    ap.add_argument("--variants", action="store_true",
                    help="add every (c) variant's row (the autotuned and coordinate-descent "
                         "ones compile for minutes)")
    ap.add_argument("--epochs", type=int, default=4,
                    help="epochs per config; the first is warm-up (default 4: 3 timed)")
    ap.add_argument("--train-size", type=int, default=45000)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--data-dir", default=None, help="real CIFAR-10 folder (default: synthetic)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny CPU check: train-size 512, 3 epochs (2 timed), batch 64")
    ap.add_argument("--round2", action=argparse.BooleanOptionalAction, default=True,
                    help="for (c), also time a second IMP round's new Trainer (default on)")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="start no new row after this many seconds (0: no limit; default 240)")
    ap.add_argument("--json-out", default=None, help="write all results as JSON here")
    ap.add_argument("--md-out", default=None, help="write the Markdown table here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.train_size, args.epochs, args.batch_sizes = 512, 3, "64"
    if args.epochs < 2:
        ap.error("--epochs must be at least 2 (the first is warm-up)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    device = resolve_device(args.device)
    batch_sizes = [int(b) for b in parse_list(args.batch_sizes)]
    configs = parse_list(args.configs)
    if args.variants:
        configs += [v for v in C_VARIANTS if v != "c" and v not in configs]
    unknown = [c for c in configs if c not in ("a", "b") and c not in C_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown config(s) {', '.join(unknown)}")
    profiled = parse_list(args.profile)
    stray = [c for c in profiled if c not in configs or c in ("a", "b")]
    if stray:
        raise SystemExit(f"--profile names (c) configs of this run; not: {', '.join(stray)}")
    if args.epochs < 4 and not args.smoke:
        log(f"warning: --epochs {args.epochs} times fewer than 3 epochs")

    test_n = 512 if args.smoke else 10_000
    t0 = time.perf_counter()
    data = load_data(args, device, test_n)
    sync(device)
    load_s = time.perf_counter() - t0
    meta = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads)",
        "device": str(device), "torch": torch.__version__,
        "torchvision": getattr(torchvision, "__version__", None),
        "python": platform.python_version(), "data": data.name,
        "train_size": int(len(data.train_y)), "test_size_eval": int(len(data.test_y)),
        "data_load_s": load_s, "epochs_per_config": args.epochs, "warmup_epochs": 1,
        "batch_sizes": batch_sizes, "configs": configs, "density": DENSITY,
        "flags": backend_flags(), "smoke": args.smoke,
    }
    log(f"data {data.name}: {meta['train_size']} train images on {device} "
        f"(loaded in {load_s:.1f} s); {meta['gpu']}; torch {torch.__version__}")

    rows: list[dict[str, Any]] = []
    prune: dict[str, Any] | None = None
    trained: dict[str, nn.Module] = {}

    def dump() -> None:
        if args.json_out:
            add_ratios(rows)
            out = {"meta": meta, "rows": rows, "prune_rewind": prune,
                   "elapsed_s": time.perf_counter() - start}
            Path(args.json_out).write_text(json.dumps(out, indent=2, default=str) + "\n")

    for config in configs:  # config-major: baselines first, before anything compiles
        for bs in batch_sizes:
            key = "a-hand" if config == "a" and tv_transforms is None else config
            row: dict[str, Any] = {"config": config, "batch": bs, "label": LABELS[key]}
            rows.append(row)
            elapsed = time.perf_counter() - start
            if args.budget_s and elapsed > args.budget_s:
                row["skipped"] = f"budget: {elapsed:.0f} s > --budget-s {args.budget_s:.0f}"
                log(f"skip {config} @ {bs}: {row['skipped']}")
                continue
            log(f"{row['label']} @ batch {bs}:")
            saved_flags = backend_flags()
            try:
                if config == "a":
                    result, model = bench_a(data, bs, args.epochs, device, test_n)
                elif config == "b":
                    result, model = bench_b(data, bs, args.epochs, device, test_n)
                else:
                    result, model = bench_c(data, bs, args.epochs, device, config,
                                            args.round2 and config == "c",
                                            profile=config in profiled)
                row.update(result)
                row["flags_after"] = backend_flags()
                trained[config] = model
                log(f"  median {row['median_s']:.3f} s/epoch")
            except Exception as exc:  # noqa: BLE001 - one failure must not lose the rest
                row["error"] = f"{type(exc).__name__}: {exc}"
                print(f"[train_speed] {config} @ batch {bs} failed:", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
            finally:
                restore_backend_flags(saved_flags)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            dump()

    try:
        source = next((c for c in ("b", "a", "c") if c in trained), None)
        model = trained[source] if source else build_model(ARCH, seed=0)
        prune = bench_prune_rewind(model, source or "untrained", device)
    except Exception as exc:  # noqa: BLE001
        prune = {"error": f"{type(exc).__name__}: {exc}"}
        traceback.print_exc(file=sys.stderr)

    add_ratios(rows)
    dump()
    md = render_markdown(meta, rows, prune)
    print(md, end="", flush=True)
    if args.md_out:
        Path(args.md_out).write_text(md)
    log(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
