"""Interoperability at the edges: `torch.nn.utils.prune` state dicts and the paper authors'
`.pth.tar` checkpoints in, torch-prune state dicts out. Pickled files are read only through
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from ticketctl.artifacts.io import atomic_path
from ticketctl.artifacts.mask import Mask
from ticketctl.artifacts.ticket import Kind, Ticket, check_finite
from ticketctl.errors import TicketctlError
from ticketctl.models import ARCHS, prunable_names
from ticketctl.models.registry import ARCH_ARGS, skeleton
from ticketctl.records import Choice
from ticketctl.schema import brief

ORIG, MASK = "_orig", "_mask"


class Weights(Choice):
    """Which weights an imported checkpoint gives: the authors' rewind weights (`init_weight`,
    a ticket) when present (`auto`), always (`rewind`), or the trained ones (`trained`)."""

    AUTO = "auto"
    REWIND = "rewind"
    TRAINED = "trained"


class ExportFormat(Choice):
    """Formats `convert --to` writes."""

    TORCH_PRUNE = "torch-prune"


# torch.save writes its zip entries uncompressed; entries that expand to more than this many
# times the file's size are a zip bomb, refused before torch reads them.
MAX_ZIP_EXPANSION = 4


def load_torch_checkpoint(path: str | Path) -> Any:
    """A torch.save file read with `weights_only=True`, after checking that its zip entries
    do not expand beyond the file (the tensors it holds are checked by `tensor_problems`)."""
    p = Path(path)
    if p.is_dir():
        raise TicketctlError(f"{p} is a folder, not a checkpoint file")
    if not p.is_file():
        raise TicketctlError(f"{p}: no such file")
    _check_zip(p)
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise TicketctlError(
                f"{p} holds Python objects besides tensors and was refused (ticketctl never "
                f"fully unpickles files): {first}"
            ) from None
        raise TicketctlError(f"{p} is not a readable PyTorch checkpoint ({first})") from None


def _check_zip(p: Path) -> None:
    with open(p, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return  # a legacy torch.save file: its storages are checked against the file
    size = p.stat().st_size
    try:
        with zipfile.ZipFile(p) as z:
            total = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise TicketctlError(f"{p} is not a readable PyTorch checkpoint (a broken zip: "
                             f"{brief(str(e))})") from None
    if total > MAX_ZIP_EXPANSION * size:
        raise TicketctlError(f"{p}: its zip entries expand to {total:,} bytes from a "
                             f"{size:,}-byte file (compressed entries, which torch.save never "
                             "writes); refused")


def tensor_problems(tensors: dict[str, torch.Tensor], file_size: int) -> dict[str, str]:
    """Why each tensor that would take more memory than the file gave it is refused: a view
    whose elements share bytes (a stride-0 or overlapping tensor: 4 bytes in the file, gigabytes
    once copied), or more tensor bytes in all than twice the file (views sharing data)."""
    problems: dict[str, str] = {}
    budget = 2 * file_size + (1 << 20)
    total = 0
    for name, t in tensors.items():
        need = t.numel() * t.element_size()
        have = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
        if need > have:
            problems[name] = (f"tensor {name!r} of shape {list(t.shape)} needs {need:,} bytes but "
                              f"the file holds {max(have, 0):,} for it (a stride-0 or overlapping "
                              "view)")
            continue
        total += need
        if total > budget:
            problems[name] = (f"tensor {name!r}: the tensors add up to more than twice the "
                              f"file's {file_size:,} bytes (views sharing data)")
    return problems


def _tensor_dict(obj: Any, where: str, file_size: int) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise TicketctlError(f"{where}: expected a state dict (names to tensors)")
    out = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    problems = tensor_problems(out, file_size)
    if problems:
        raise TicketctlError(f"{where}: {next(iter(problems.values()))}; refused")
    out = {k.removeprefix("module."): v for k, v in out.items()}
    if not out:
        raise TicketctlError(f"{where}: holds no tensors")
    return out


def split_pruned_state(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Fold `x_orig`/`x_mask` pairs back into `x` plus a mask for `x`."""
    state, masks = {}, {}
    for k, v in sd.items():
        if k.endswith(MASK):
            masks[k[: -len(MASK)]] = v
        elif k.endswith(ORIG):
            state[k[: -len(ORIG)]] = v
        else:
            state[k] = v
    return state, masks


def infer_arch(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any], int]:
    """Find the registered architecture whose state dict has exactly these names and shapes,
    comparing against each network built on the meta device (a crafted head of a million
    classes costs nothing there)."""
    if "fc.weight" not in state or "conv1.weight" not in state:
        raise TicketctlError("cannot infer the architecture (no conv1/fc weights); pass --arch")
    conv1, fc = state["conv1.weight"], state["fc.weight"]
    for name, t, dims, what in (("conv1.weight", conv1, 4, "a convolution's"),
                                ("fc.weight", fc, 2, "a linear layer's")):
        if t.dim() != dims:
            raise TicketctlError(f"cannot infer the architecture: tensor {name!r} has shape "
                                 f"{list(t.shape)}, but {what} weight has {dims} dimensions")
    num_classes = int(fc.shape[0])
    in_ch = int(conv1.shape[1])
    for arch in ARCHS:
        args: dict[str, Any] = {"in_channels": in_ch}
        if "width" in ARCH_ARGS[arch]:
            args["width"] = int(conv1.shape[0])
        try:
            expected = skeleton(arch, num_classes, **args).state_dict()
        except TicketctlError:  # sizes this network cannot take
            continue
        if _fits(expected, state):
            return arch, args, num_classes
    raise TicketctlError("no registered architecture matches these tensors; pass --arch")


def _fits(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> bool:
    keys = set(expected) - {k for k in expected if k.endswith("num_batches_tracked")}
    return keys <= set(state) <= set(expected) and all(
        tuple(state[k].shape) == tuple(expected[k].shape) for k in state
    )


def import_checkpoint(
    path: str | Path,
    arch: str | None = None,
    num_classes: int | None = None,
    arch_args: dict[str, Any] | None = None,
    weights: str = "auto",
    dataset: str | None = None,
) -> Ticket:
    """Turn a torch-prune state dict or an authors' checkpoint into a Ticket.

    weights: `rewind` takes the authors' `init_weight` (a `ticket`), `trained` the trained
    weights (a `trained` model), `auto` the former when present."""
    where = str(path)
    obj = load_torch_checkpoint(path)
    size = Path(path).stat().st_size
    authors = isinstance(obj, dict) and "state_dict" in obj
    sd = _tensor_dict(obj["state_dict"] if authors else obj, where, size)
    # The authors' ResNets carry an input-normalisation module their forward never calls.
    skipped_normalize = any(k.startswith("normalize.") for k in sd)
    sd = {k: v for k, v in sd.items() if not k.startswith("normalize.")}
    state, masks = split_pruned_state(sd)

    weights = Weights.parse(str(weights), "--weights")
    init = obj.get("init_weight") if authors else None
    if weights == "rewind" and init is None:
        raise TicketctlError(f"{where} has no rewind weights (init_weight); use --weights trained")
    use_rewind = init is not None and weights in ("auto", "rewind")
    if use_rewind:
        rewind, _ = split_pruned_state(_tensor_dict(init, where + " init_weight", size))
        rewind = {k: v for k, v in rewind.items() if not k.startswith("normalize.")}
        state = {**state, **rewind}

    if arch is None:
        arch, inferred_args, inferred_classes = infer_arch(state)
        arch_args = {**inferred_args, **(arch_args or {})}
        num_classes = num_classes or inferred_classes
    elif num_classes is None:
        fc = state.get("fc.weight")
        num_classes = int(fc.shape[0]) if fc is not None and fc.dim() == 2 else 10
    model = skeleton(arch, num_classes, **(arch_args or {}))  # names and shapes, no memory
    expected = model.state_dict()
    if not _fits(expected, state):
        missing = sorted(set(expected) - set(state) - {k for k in expected
                                                       if k.endswith("num_batches_tracked")})
        extra = sorted(set(state) - set(expected))
        raise TicketctlError(
            f"{where}: tensors do not fit {arch} (missing: {', '.join(missing[:3]) or '-'}; "
            f"unexpected: {', '.join(extra[:3]) or '-'}); check --arch and --num-classes"
        )
    for k, v in state.items():
        if expected[k].is_floating_point() and not v.is_floating_point():
            raise TicketctlError(f"{where}: tensor {k!r} is {str(v.dtype).removeprefix('torch.')}"
                                 "; weights must be floating point")
    # a missing entry can only be a BatchNorm's num_batches_tracked: a fresh one is 0
    full = {k: state[k].to(expected[k].dtype).clone() if k in state else
            torch.zeros(expected[k].shape, dtype=expected[k].dtype) for k in expected}
    check_finite(full, where)
    params = dict(model.named_parameters())
    if masks:
        mask = Mask({k: v for k, v in masks.items()})
    else:  # a plain state dict: its zeros are the mask
        mask = Mask({n: full[n] != 0 for n in prunable_names(model)})
    mask.check_shapes({k: v.shape for k, v in params.items()}, where=f"{where}: ")
    return Ticket(
        state=mask.apply_state(full),
        mask=mask,
        kind=Kind.TICKET if use_rewind else Kind.TRAINED,
        arch=arch,
        arch_args=arch_args or {},
        num_classes=num_classes,
        dataset={"name": dataset, "normalize": not skipped_normalize},
        extra={"imported_from": Path(path).name,
               "source_format": "authors-pth-tar" if authors else "torch-prune"},
    )


def export_torch_prune(ticket: Ticket) -> dict[str, torch.Tensor]:
    """A state dict as `torch.nn.utils.prune` leaves it: `w_orig` and a float `w_mask`."""
    out: dict[str, torch.Tensor] = {}
    for k, v in ticket.state.items():
        if k in ticket.mask:
            out[k + ORIG] = v.clone()
            out[k + MASK] = ticket.mask[k].to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def save_torch_prune(ticket: Ticket, path: str | Path, force: bool = False) -> Path:
    with atomic_path(path, force) as tmp:
        torch.save(export_torch_prune(ticket), str(tmp))
    return Path(path)
