"""Named bundles of settings; explicit options override them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ticketctl.errors import TicketctlError
from ticketctl.prune.imp import FindSettings
from ticketctl.prune.search import SearchConfig, SearchOverrides
from ticketctl.records import Choice
from ticketctl.train import TrainConfig
from ticketctl.train.config import TrainOverrides


class Preset(Choice):
    """The presets' names."""

    DEMO = "demo"
    FAST = "fast"
    PAPER = "paper"


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipe (Section 4.1): 182 epochs, drops at 91/136, late rewinding to epoch 3.
    # The test split is scored only at new best-validation epochs: the results are the same,
    # and 182 epochs x 20 trainings of test scoring are most of the evaluation time.
    Preset.PAPER.value: {
        "train": dict(epochs=182, batch_size=128, lr=0.1, momentum=0.9, nesterov=False,
                      weight_decay=1e-4, schedule="multistep", milestones=[91, 136],
                      warmup_epochs=0, test_eval="best"),
        "search": dict(rewind_epoch=3),
    },
    # A short GPU schedule: large batch, Nesterov, warm-up then cosine; see docs/FIND.md.
    Preset.FAST.value: {
        "train": dict(epochs=40, batch_size=512, lr=0.4, momentum=0.9, nesterov=True,
                      weight_decay=5e-4, schedule="cosine", milestones=[], warmup_epochs=2),
        "search": dict(rewind_epoch=3),
    },
    # The embedded digits on a CPU: the whole search in about a minute.
    Preset.DEMO.value: {
        "arch": "digits_cnn", "dataset": "digits",
        "train": dict(epochs=8, batch_size=64, lr=0.05, momentum=0.9, nesterov=True,
                      weight_decay=5e-4, schedule="cosine", milestones=[], warmup_epochs=1),
        "search": dict(rewind_epoch=1, rates=[0.5, 0.2, 0.1], tolerance=1.0),
    },
}


def default_preset(dataset: str) -> str:
    return "demo" if dataset == "digits" else "paper"


def resolve_settings(
    preset: str | None,
    *,
    arch: str | None = None,
    dataset: str | None = None,
    train: TrainOverrides | None = None,
    search: SearchOverrides | None = None,
    **data: Any,
) -> FindSettings:
    """Preset values first, then every option the user gave explicitly (non-None)."""
    name = str(preset) if preset is not None else default_preset(dataset or "digits")
    if name not in PRESETS:
        raise TicketctlError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[name]
    train, search = train or TrainOverrides(), search or SearchOverrides()
    arch = arch or p.get("arch") or ("resnet20" if (dataset or p.get("dataset")) not in
                                     (None, "digits") else "digits_cnn")
    dataset = dataset or p.get("dataset") or "digits"
    t = train.apply(replace(TrainConfig(), **p["train"]))
    if name == "paper" and arch == "resnet50" and train.weight_decay is None:
        t = replace(t, weight_decay=5e-4)  # the paper's ResNet-50 setting
    s = search.apply(replace(SearchConfig(), **p["search"]))
    # A preset's settings that depend on its length follow a shorter --epochs (the user's own
    # settings are kept, and refused if they cannot work): warm-up and the rewind point
    # must come before the last epoch.
    last = max(0, t.epochs - 1)
    if train.warmup_epochs is None and t.warmup_epochs > last:
        t = replace(t, warmup_epochs=last)
    if search.rewind_epoch is None and s.rewind_epoch > last:
        s = replace(s, rewind_epoch=last)
    settings = FindSettings(arch=arch, dataset=dataset, train=t, search=s)
    for k, v in data.items():
        if v is not None:
            setattr(settings, k, v)
    return settings
