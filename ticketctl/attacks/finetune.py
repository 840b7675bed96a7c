"""Fine-tuning and transfer attacks: the thief trains the released model further, on the same
data or on another dataset with a new head, keeping the mask or (`dense`) letting pruned
weights grow back. Fine-tuning changes weights, not where they are, so the QR code and (on the
same classes) the trigger set should survive; `dense` revives every position, which the
owner's kept-count defence undoes before reading the code."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ticketctl.artifacts import Mask, Ticket
from ticketctl.attacks.checks import Checker
from ticketctl.attacks.runner import AttackReport, AttackRunner, compare, scored_row
from ticketctl.errors import TicketctlError
from ticketctl.models import build_model
from ticketctl.train import evaluate


def head_names(model: nn.Module) -> list[str]:
    """The parameters of the last linear layer: what a transfer replaces."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TicketctlError("this architecture has no linear head to replace for a transfer")
    return [f"{linears[-1]}.weight", f"{linears[-1]}.bias"]


def adapt(ticket: Ticket, num_classes: int, in_channels: int, dataset: dict[str, Any],
          class_names: list[str] | None = None, seed: int = 0) -> Ticket:
    """The thief's starting point: the released weights, with a freshly initialised dense
    head when the new dataset has another number of classes."""
    skel = ticket.skeleton()
    convs = [m for m in skel.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    # a network without convolutions (a transformer on patches): what it was trained on
    shape = (ticket.dataset or {}).get("input_shape") or [None]
    have = convs[0].in_channels if convs else shape[0]
    if have is not None and have != in_channels:
        raise TicketctlError(f"the model takes {have}-channel images, the dataset has "
                             f"{in_channels} channels")
    if num_classes == ticket.num_classes:
        return ticket
    fresh = build_model(ticket.arch, num_classes, seed=seed, **ticket.arch_args)
    head = set(head_names(fresh))
    state = {k: (v if k in head else ticket.state[k]) for k, v in fresh.state_dict().items()}
    mask = Mask({k: (torch.ones_like(m) if k in head else m) for k, m in ticket.mask.items()})
    return ticket.derive(state=state, mask=mask, num_classes=num_classes,
                         class_names=class_names, dataset=dataset, seed=seed,
                         extra={"transferred_from": ticket.tensors_sha256(),
                                "new_head": sorted(head)})


def finetune(runner: AttackRunner, released: Ticket, epochs: list[int], dense: bool = False,
             lr: float | None = None, checks: Checker | None = None,
             reference: float | None = None, seed: int = 0) -> AttackReport:
    """One row per number of epochs, each an independent (cached) job from the released
    weights. The reference is the released model on the same classes, else `reference`."""
    if not epochs or any(e < 1 for e in epochs):
        raise TicketctlError("--sweep-epochs needs one or more whole numbers of at least 1")
    data = runner.data
    start = adapt(released, data.num_classes, data.input_shape[0], data.info(),
                  data.class_names, seed)
    transfer = start is not released
    if transfer:
        how = "given" if reference is not None else "none (a transfer: pass --reference-accuracy)"
        ref = reference
    else:
        model = released.build_model(data.train_x.device)
        ref, how = evaluate(model, data.test_x, data.test_y), "the released model"
    base = replace(runner.cfg, lr=lr if lr is not None else runner.cfg.lr * 0.1,
                   warmup_epochs=0, milestones=[], seed=seed)
    rows = []
    cfgs = [replace(base, epochs=n) for n in epochs]
    done = runner.finetune_many(start, cfgs, dense, [f"{n} epochs" for n in epochs])
    for n, cfg, (res, state) in zip(epochs, cfgs, done, strict=True):
        rows.append(scored_row(n, res.accuracy, checks(state) if checks else None, dense=dense,
                               lr=cfg.lr, transfer=transfer, nonzero=res.nonzero))
    compare(rows, ref)
    return AttackReport("finetune-dense" if dense else "finetune", ref, how, rows,
                        {"train": base.to_dict(), "dataset": data.name, "transfer": transfer})
