"""Distillation, the attack that keeps a stolen model's behaviour and none of its weights: a
fresh network (the released architecture, or another the thief names) trained only to match
the released model's softened outputs over the training images (Hinton et al., "Distilling
the Knowledge in a Neural Network"). No labels, no masks: the student is dense and its weights
owe nothing to the ticket's, so the white-box signature is expected to vanish; what the
trigger set keeps is the question the attack answers."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ticketctl.artifacts import Ticket
from ticketctl.attacks.checks import Checker
from ticketctl.attacks.runner import (
    AttackReport,
    AttackRunner,
    JobResult,
    compare,
    job_id,
    scored_row,
)
from ticketctl.data import Dataset
from ticketctl.data.augment import augment_batch
from ticketctl.errors import TicketctlError
from ticketctl.models import build_model
from ticketctl.protect.blackbox_verify import predict
from ticketctl.protect.signature import masks_of
from ticketctl.protect.suspect import Suspect
from ticketctl.protect.verify import Marks, check_suspect
from ticketctl.train.config import TrainConfig
from ticketctl.train.engine import EpochStats, evaluate
from ticketctl.train.schedule import lr_at


@dataclass
class Distilled:
    """The student at its best-validation epoch (the last without a validation split)."""

    state: dict[str, torch.Tensor]
    accuracy: float  # test accuracy against the true labels (never used in training)
    agreement: float  # share of test images on which it answers as the released model does
    best_epoch: int
    seconds: float


def check_temperature(temperature: float) -> None:
    """Softening must be a positive, finite temperature."""
    if not 0.0 < temperature < math.inf:
        raise TicketctlError(f"--temperature must be positive and finite, got {temperature:g}")


def _outputs(model: nn.Module, x: torch.Tensor, what: str, classes: int) -> None:
    """Refuse a network and data that do not fit each other, with one line, before training."""
    try:
        with torch.no_grad():
            out = model.eval()(x[:2])
    except (RuntimeError, ValueError, TypeError) as exc:
        raise TicketctlError(f"{what} does not fit the data (images "
                             f"{tuple(x.shape[1:])}): {str(exc).splitlines()[0]}") from exc
    if out.dim() != 2 or out.shape[1] != classes:
        raise TicketctlError(f"{what} answers with shape {tuple(out.shape[1:])}, the data has "
                             f"{classes} classes")


def student_for(ticket: Ticket, data: Dataset, arch: str | None, seed: int,
                teacher: nn.Module | None = None) -> nn.Module:
    """A freshly initialised student: the ticket's own architecture (with its arguments), or
    the registered `arch`, checked against the data (as is `teacher`, the released network,
    built here when not given)."""
    if data.num_classes != ticket.num_classes:
        raise TicketctlError(f"the distillation data has {data.num_classes} classes, the "
                             f"released model {ticket.num_classes}")
    teacher = teacher if teacher is not None else ticket.build_model(data.device)
    _outputs(teacher, data.train_x, "the released model", data.num_classes)
    if arch is None or arch == ticket.arch:
        model = build_model(ticket.arch, ticket.num_classes, seed=seed, **ticket.arch_args)
        what = "the student"
    else:
        model = build_model(arch, data.num_classes, seed=seed,
                            in_channels=data.input_shape[0])
        what = f"--student {arch}"
    model = model.to(data.device)
    _outputs(model, data.train_x, what, data.num_classes)
    return model


def distill(teacher: nn.Module, student: nn.Module, data: Dataset, cfg: TrainConfig,
            temperature: float,
            on_epoch: Callable[[EpochStats], None] | None = None) -> Distilled:
    """Train `student` on `teacher`'s outputs at `temperature` over the (augmented) training
    images, with the schedule and optimiser settings of `cfg`. The training labels are never
    read: only the teacher's answers."""
    check_temperature(temperature)
    t0 = time.perf_counter()
    device = data.device
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(data.train_x)
    bs = min(cfg.batch_size, n)
    steps = max(1, n // bs)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov and cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    teacher.eval()
    fast = device.type == "cuda" and cfg.bf16  # CPU runs plain fp32, as the trainer does
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    for epoch in range(1, cfg.epochs + 1):
        student.train()
        order = torch.randperm(n, generator=gen)
        for b in range(steps):
            idx = order[b * bs:(b + 1) * bs].to(device)
            x = augment_batch(data.train_x[idx], data.augment, gen)
            with torch.autocast(device.type, torch.bfloat16, enabled=fast):
                with torch.no_grad():
                    target = F.log_softmax(teacher(x).float() / temperature, dim=1)
                out = F.log_softmax(student(x).float() / temperature, dim=1)
            loss = F.kl_div(out, target, log_target=True, reduction="batchmean") \
                * temperature ** 2
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, (epoch - 1) * steps + b, steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        student.eval()
        # the best epoch by agreement with the teacher on held-out images (the thief has no
        # labels either); without a validation split, the last epoch
        score = _agreement(student, teacher, data.val_x) if len(data.val_x) else float(epoch)
        if best is None or score > best[0]:
            # kept on the host, as a cached job's weights come back from the store: the checks
            # read them with numpy
            best = (score, epoch, {k: v.detach().to("cpu", copy=True) for k, v in
                                   student.state_dict().items()})
        if on_epoch is not None:  # no labels: no test accuracy to show
            on_epoch(EpochStats(epoch, opt.param_groups[0]["lr"], float(loss.detach()), None,
                                float("nan")))
    assert best is not None
    student.load_state_dict(best[2])
    student.eval()
    return Distilled(best[2], evaluate(student, data.test_x, data.test_y),
                     _agreement(student, teacher, data.test_x), best[1],
                     time.perf_counter() - t0)


@torch.no_grad()
def _agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Percent of images on which two networks give the same top answer."""
    return 100.0 * float((predict(a, x) == predict(b, x)).mean()) if len(x) else 100.0


def student_checks(ticket: Ticket, student: nn.Module, data: Dataset, marks: Marks
                   ) -> Checker | None:
    """The owner's checks on a student: the signature where the receipt says (a student
    without the signed layer, or with it in another shape, has no code to read: the row says
    so), and the trigger set through the student itself."""
    if marks.empty:
        return None
    names = dict(student.named_parameters())
    has_layer = marks.receipt is not None and marks.receipt.has_code and all(
        p.layer in names and names[p.layer].shape == ticket.state[p.layer].shape
        for p in marks.receipt.placements)
    usable = marks if has_layer or marks.receipt is None else replace(marks, receipt=None,
                                                                      defend=False)

    def check(state: dict[str, torch.Tensor], runs_as: Any = None) -> Any:
        suspect = Suspect(state, masks_of(state), "memory", "distilled student")
        return check_suspect(suspect, usable, data, network=student, compare_defence=True)

    return check if not usable.empty else None


def distill_attack(runner: AttackRunner, ticket: Ticket, temperature: float, marks: Marks,
                   student_arch: str | None = None) -> AttackReport:
    """One row: the student after the runner's schedule (`--epochs`) of distillation, scored
    on the test labels and checked by every mark; cached in the sweep folder like the other
    training attacks. The reference is the released model's own accuracy."""
    check_temperature(temperature)
    data, cfg = runner.data, runner.cfg
    marks.check_fits(ticket.arch, ticket.num_classes)
    teacher = ticket.build_model(data.device).eval()
    student = student_for(ticket, data, student_arch, cfg.seed, teacher)
    ref = evaluate(teacher, data.test_x, data.test_y)
    arch = student_arch or ticket.arch
    key = job_id("distill", ticket.tensors_sha256(), cfg.to_dict(), data.info(), temperature,
                 arch)

    def run() -> tuple[JobResult, dict[str, torch.Tensor]]:
        hook = runner.on_epoch
        got = distill(teacher, student, data, cfg, temperature,
                      (lambda stats: hook("distill", stats)) if hook else None)
        return JobResult(got.accuracy, got.seconds, best_epoch=got.best_epoch,
                         agreement=got.agreement), got.state

    res = runner.cached(key, run, keeps_state=True)
    state = runner.kept_state(key)
    student.load_state_dict(state)
    student.eval()
    checks = student_checks(ticket, student, data, marks)
    verdict = checks(state) if checks else None
    read = verdict is not None and verdict.signature is not None
    row = scored_row(cfg.epochs, res.accuracy, verdict, temperature=temperature,
                     agreement=res.agreement, best_epoch=res.best_epoch, student=arch,
                     signature=None if read or marks.receipt is None else
                     "not read: the student has no layer of the receipt's shape")
    compare([row], ref)
    return AttackReport("distill", ref, "the released model", [row],
                        {"train": cfg.to_dict(), "temperature": temperature, "student": arch,
                         "dataset": data.name})
