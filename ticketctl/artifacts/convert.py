"""Interoperability at the edges: `torch.nn.utils.prune` state dicts and the paper authors'
`.pth.tar` checkpoints in, torch-prune state dicts out. Pickled files are read only through
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.

An export carries the ticket's metadata (kind, rewind epoch, dataset, ...) as a plain dict of
strings and numbers in the state dict's `_metadata["ticketctl"]`: PyTorch's own slot for a
state dict's metadata, which `load_state_dict` ignores and `torch.load(weights_only=True)`
reads back, so the export still loads into a pruned model as it is and an import restores
what the ticket said."""

from __future__ import annotations

import json
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ticketctl.artifacts.io import atomic_path
from ticketctl.artifacts.mask import Mask
from ticketctl.artifacts.ticket import (
    FORMAT_NAME,
    FORMAT_VERSION,
    KINDS,
    TICKET_METADATA,
    Kind,
    Ticket,
    check_finite,
    file_format,
    read_header,
)
from ticketctl.errors import TicketctlError, first_line
from ticketctl.models import ARCHS
from ticketctl.models.registry import ARCH_ARGS, matching, required_prunable, skeleton
from ticketctl.models.sources import (
    FACTORY,
    NO_NETWORK,
    NetworkInfo,
    current_factory,
    fingerprint,
    source_of,
)
from ticketctl.records import Choice
from ticketctl.schema import Field, Obj, brief, check, parse_json

ORIG, MASK = "_orig", "_mask"


class Weights(Choice):
    """Which weights an imported checkpoint gives: the authors' rewind weights (`init_weight`,
    a ticket) when present (`auto`), always (`rewind`), or the trained ones (`trained`)."""

    AUTO = "auto"
    REWIND = "rewind"
    TRAINED = "trained"


class ExportFormat(Choice):
    """Formats `convert --to` writes: a ticket (importing a checkpoint) or a torch-prune
    state dict (exporting a ticket)."""

    TICKET = "ticket"
    TORCH_PRUNE = "torch-prune"


# What `convert` writes when --to is not given, from the output's name.
SUFFIX_FORMATS = {".safetensors": ExportFormat.TICKET, ".pt": ExportFormat.TORCH_PRUNE,
                  ".pth": ExportFormat.TORCH_PRUNE}
# The key of an export's metadata in its state dict's `_metadata`.
META_KEY = "ticketctl"
# Bound on each JSON text read back from an export's metadata.
MAX_META_TEXT = 1 << 20


def output_format(out: str | Path, to: ExportFormat | str | None = None) -> ExportFormat:
    """`--to`, or else what the output's extension says (.safetensors a ticket, .pt or .pth
    a torch-prune state dict)."""
    if to is not None:
        return ExportFormat.parse(str(to), "--to")
    fmt = SUFFIX_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        choices = " or ".join(f"--to {f.value}" for f in ExportFormat)
        raise TicketctlError(f"cannot tell the output format from the name {str(out)!r}; pass "
                             f"{choices} (or end the name in {', '.join(SUFFIX_FORMATS)})")
    return fmt


def is_ticket(path: str | Path) -> bool:
    """Whether a file is already a ticketctl ticket (its header says so), so that importing
    it is a mistake worth naming."""
    p = Path(path)
    try:
        return p.is_file() and file_format(p) == "safetensors" and \
            read_header(p).get("format") == FORMAT_NAME
    except TicketctlError:
        return False


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
        first = first_line(e)
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


def infer_arch(state: dict[str, torch.Tensor], smaller: bool = False
               ) -> tuple[str, dict[str, Any], int]:
    """Find the registered architecture whose state dict has exactly these names and shapes,
    comparing against each network built on the meta device (a crafted head of a million
    classes costs nothing there). `smaller`: a tensor may also be smaller along any axis (a
    channel-pruned copy, which `attacks.channels.shrink_model` can run)."""
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
        if _fits(expected, state, smaller):
            return arch, args, num_classes
    raise TicketctlError("no registered architecture matches these tensors; pass --arch")


def _fits(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
          smaller: bool = False) -> bool:
    keys = set(expected) - {k for k in expected if k.endswith("num_batches_tracked")}

    def fits(have: torch.Size, want: torch.Size) -> bool:
        if smaller and len(have) == len(want):
            return all(0 < h <= w for h, w in zip(have, want, strict=True))
        return tuple(have) == tuple(want)

    return keys <= set(state) <= set(expected) and all(
        fits(state[k].shape, expected[k].shape) for k in state)


def _read_state(path: str | Path) -> tuple[Any, dict[str, torch.Tensor], bool]:
    """(the loaded object, its state dict, whether it is an authors' checkpoint), from a
    torch.save file or a safetensors state dict that is not a ticket."""
    p = Path(path)
    if p.is_file() and file_format(p) == "safetensors":
        read_header(p)  # a safetensors file, its header of a sane size
        try:
            sd = safetensors.torch.load_file(str(p))
        except Exception as e:
            raise TicketctlError(f"{p} is not a readable safetensors file "
                                 f"({brief(str(e), 160)})") from None
        return sd, _tensor_dict(sd, str(p), p.stat().st_size), False
    obj = load_torch_checkpoint(p)
    authors = isinstance(obj, dict) and "state_dict" in obj
    return obj, _tensor_dict(obj["state_dict"] if authors else obj, str(p),
                             p.stat().st_size), authors


def import_checkpoint(
    path: str | Path,
    arch: str | None = None,
    num_classes: int | None = None,
    arch_args: dict[str, Any] | None = None,
    weights: str = "auto",
    dataset: str | None = None,
    masks_from_zeros: bool = False,
    prunable: str | None = None,
    prune_linear: bool = False,
) -> Ticket:
    """Turn a torch-prune state dict, a plain or safetensors state dict, or an authors'
    checkpoint into a Ticket: of a built-in when its tensors fit one (or `arch` says so), of
    the --model-factory network when one is in use, else of no known network (weights and
    masks only; enough to inspect, split, sign and verify).

    weights: `rewind` takes the authors' `init_weight` (a `ticket`), `trained` the trained
    weights (a `trained` model), `auto` the former when present."""
    where = str(path)
    obj, sd, authors = _read_state(path)
    size = Path(path).stat().st_size
    # The authors' ResNets carry an input-normalisation module their forward never calls.
    skipped_normalize = any(k.startswith("normalize.") for k in sd)
    sd = {k: v for k, v in sd.items() if not k.startswith("normalize.")}
    state, masks = split_pruned_state(sd)

    recorded = {} if authors else read_export_metadata(obj, where)
    weights = Weights.parse(str(weights), "--weights")
    init = obj.get("init_weight") if authors else None
    if weights == "rewind" and init is None:
        raise TicketctlError(f"{where} has no rewind weights (init_weight); use --weights trained")
    use_rewind = init is not None and weights in ("auto", "rewind")
    if use_rewind:
        rewind, _ = split_pruned_state(_tensor_dict(init, where + " init_weight", size))
        rewind = {k: v for k, v in rewind.items() if not k.startswith("normalize.")}
        state = {**state, **rewind}

    if arch is None and source_of(str(recorded.get("arch", ""))) != "builtin" and \
            current_factory() is None:
        arch = recorded["arch"]  # an export of a ticket of a network from outside
        arch_args = arch_args if arch_args is not None else recorded.get("arch_args")
    if arch is None and current_factory() is not None:
        arch = FACTORY
    if arch is None:
        try:
            arch, inferred_args, inferred_classes = infer_arch(state)
        except TicketctlError:
            arch = NO_NETWORK
        else:
            num_classes = num_classes or inferred_classes
            if arch_args is None:  # the export's own spelling, when it fits
                arch_args = _recorded_arch_args(recorded, arch, num_classes, state)
            arch_args = arch_args if arch_args is not None else inferred_args
    if num_classes is None:
        num_classes = _guess_classes(state)
    if arch == NO_NETWORK:
        return _weights_only(state, masks, where, num_classes, recorded, masks_from_zeros,
                             prunable, use_rewind, weights, dataset, authors, path)
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
        names = required_prunable(model, prune_linear, prunable)
        mask = Mask({n: full[n] != 0 for n in names})
    mask.check_shapes({k: v.shape for k, v in params.items()}, where=f"{where}: ")
    kind = Kind.TICKET if use_rewind else Kind.TRAINED
    if "kind" in recorded and weights == "auto":  # a ticketctl export says what it is
        kind = Kind(recorded["kind"])
    if "dataset" in recorded:
        recorded_dataset = recorded["dataset"]
        data = {**recorded_dataset, **({"name": dataset} if dataset else {})}
    else:
        data = {"name": dataset, "normalize": not skipped_normalize}
    class_names = recorded.get("class_names")
    network = None
    if source_of(arch) != "builtin":
        factory = current_factory()
        network = NetworkInfo(source_of(arch), fingerprint(model),
                              factory.spec if arch == FACTORY and factory else None, prunable)
    return Ticket(
        network=network,
        state=mask.apply_state(full),
        mask=mask,
        kind=kind,
        arch=arch,
        arch_args=arch_args or {},
        num_classes=num_classes,
        class_names=class_names if class_names and len(class_names) == num_classes else None,
        dataset=data,
        rewind_epoch=recorded.get("rewind_epoch"),
        seed=recorded.get("seed"),
        extra={**recorded.get("extra", {}), "imported_from": Path(path).name,
               "source_format": "authors-pth-tar" if authors else "torch-prune"},
    )


def _guess_classes(state: dict[str, torch.Tensor]) -> int:
    """The classifier's rows: the last 2-D weight of the state dict (a head is the last layer
    in nearly every network); --num-classes overrides."""
    heads = [v for k, v in state.items() if v.dim() == 2 and v.is_floating_point()]
    return int(heads[-1].shape[0]) if heads else 1


def _weights_only(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], where: str,
                  num_classes: int, recorded: dict[str, Any], masks_from_zeros: bool,
                  prunable: str | None, use_rewind: bool, weights: str, dataset: str | None,
                  authors: bool, path: str | Path) -> Ticket:
    """A ticket of no known network: the weights as they are, the masks from torch-prune's
    `_mask` tensors or, with `masks_from_zeros`, from the zeros of the weights."""
    # half-precision checkpoints are read as float32 (ticketctl computes in float32)
    state = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v.clone()
             for k, v in state.items()}
    fmt = "authors-pth-tar" if authors else "torch-prune" if masks else "state-dict"
    weights_2d = [k for k, v in state.items() if v.dim() >= 2 and v.is_floating_point()]
    if not masks:
        if not masks_from_zeros and prunable is None:
            raise TicketctlError(
                f"{where}: no known network matches these tensors and they carry no masks "
                "(no `*_mask`): pass --masks-from-zeros to take each weight's zeros as its "
                "mask, --model-factory FILE.py:FUNCTION for your network, or --arch")
        if prunable is not None:
            names = matching(prunable, weights_2d)
        else:  # the weights that were pruned: those holding some zeros (all zeros is a
            # parameter initialised so, a position embedding, not a pruned layer)
            names = [k for k in weights_2d if bool((state[k] == 0).any())
                     and bool((state[k] != 0).any())]
            if not names:
                raise TicketctlError(f"{where}: no weight holds a zero, so no mask can be "
                                     "taken from zeros; pass --prunable REGEX")
        masks = {k: state[k] != 0 for k in names}
    for k in masks:
        if k not in state:
            raise TicketctlError(f"{where}: mask {k + MASK!r} has no weight {k!r}")
        if not state[k].is_floating_point():
            raise TicketctlError(f"{where}: tensor {k!r} is "
                                 f"{str(state[k].dtype).removeprefix('torch.')}; weights must be "
                                 "floating point")
    mask = Mask(dict(masks))
    mask.check_shapes({k: state[k].shape for k in masks}, where=f"{where}: ")
    check_finite(state, where)
    kind = Kind.TICKET if use_rewind else Kind.TRAINED
    if "kind" in recorded and weights == "auto":
        kind = Kind(recorded["kind"])
    data = {**recorded.get("dataset", {}), **({"name": dataset} if dataset else {})}
    return Ticket(
        state=mask.apply_state(state), mask=mask, kind=kind, arch=NO_NETWORK, arch_args={},
        num_classes=num_classes, dataset=data, rewind_epoch=recorded.get("rewind_epoch"),
        seed=recorded.get("seed"), network=NetworkInfo("none", prunable=prunable),
        extra={**recorded.get("extra", {}), "imported_from": Path(path).name,
               "source_format": fmt},
    )


def export_metadata(ticket: Ticket) -> dict[str, str | int | float]:
    """The ticket's metadata as a flat dict of strings and numbers (containers as JSON text,
    absent values left out): what `torch.load(weights_only=True)` reads back anywhere."""
    meta = ticket.metadata()
    out: dict[str, str | int | float] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, (dict, list)):
            out[key] = json.dumps(value, sort_keys=True)
        elif isinstance(value, (str, int, float)):
            out[key] = value
    return out


def export_torch_prune(ticket: Ticket) -> OrderedDict[str, torch.Tensor]:
    """A state dict as `torch.nn.utils.prune` leaves it: `w_orig` and a float `w_mask`; the
    ticket's metadata rides in its `_metadata` (see the module's note)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in ticket.state.items():
        if k in ticket.mask:
            out[k + ORIG] = v.clone()
            out[k + MASK] = ticket.mask[k].to(v.dtype)
        else:
            out[k] = v.clone()
    out._metadata = OrderedDict({META_KEY: export_metadata(ticket)})  # type: ignore[attr-defined]
    return out


def _json_field(meta: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_META_TEXT:
        raise TicketctlError(f"{where}: exported metadata field {key!r} must be JSON text of "
                             f"at most {MAX_META_TEXT:,} characters")
    parsed = parse_json(value, where, f"exported metadata field {key!r}", MAX_META_TEXT)
    if not isinstance(parsed, kind):
        raise TicketctlError(f"{where}: exported metadata field {key!r} must be a JSON "
                             f"{'object' if kind is dict else 'list'}")
    return parsed


def _int_field(meta: dict[str, Any], key: str, where: str, low: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < 2**63:
        raise TicketctlError(f"{where}: exported metadata field {key!r} must be an integer "
                             f"from {low}, got {value!r}")
    return value


def read_export_metadata(obj: Any, where: str) -> dict[str, Any]:
    """What a ticketctl export recorded of its ticket (empty for any other checkpoint), each
    field checked: `kind`, `arch`, `arch_args`, `class_names`, `dataset`, `rewind_epoch`,
    `seed`, `extra`."""
    stored = getattr(obj, "_metadata", None)
    meta = stored.get(META_KEY) if isinstance(stored, dict) else None
    if meta is None:
        return {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise TicketctlError(f"{where}: its `_metadata[{META_KEY!r}]` is not ticketctl export "
                             "metadata (a dict with format 'ticketctl')")
    out: dict[str, Any] = {}
    kind = meta.get("kind")
    if kind is not None:
        if kind not in KINDS:
            raise TicketctlError(f"{where}: exported metadata field 'kind' must be one of "
                                 f"{', '.join(KINDS)}, got {str(kind)[:40]!r}")
        out["kind"] = kind
    arch = meta.get("arch")
    if arch is not None:
        if not isinstance(arch, str) or (arch not in ARCHS and source_of(arch) == "builtin"):
            raise TicketctlError(f"{where}: exported metadata field 'arch' must be one of "
                                 f"{', '.join(sorted(ARCHS))}, torchvision:NAME, timm:NAME, "
                                 f"factory or none, got {str(arch)[:40]!r}")
        out["arch"] = arch
    for key, kind_ in (("arch_args", dict), ("dataset", dict), ("extra", dict),
                       ("class_names", list), ("network", dict)):
        value = _json_field(meta, key, kind_, where)
        if value is not None:
            out[key] = value
    if "class_names" in out and not all(isinstance(c, str) for c in out["class_names"]):
        raise TicketctlError(f"{where}: exported metadata field 'class_names' must be a list "
                             "of strings")
    for key, low in (("rewind_epoch", 0), ("seed", -(2**63))):
        value = _int_field(meta, key, where, low)
        if value is not None:
            out[key] = value
    # what a ticket's metadata may hold, field by field (none required here)
    return check(EXPORT_METADATA, out, where, "exported metadata")


EXPORT_METADATA = Obj({k: Field(f.spec) for k, f in TICKET_METADATA.fields.items()})


def _recorded_arch_args(recorded: dict[str, Any], arch: str, num_classes: int,
                        state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """The export's architecture arguments, when they name this architecture and fit the
    tensors (checked on the meta device: nothing is allocated)."""
    args = recorded.get("arch_args")
    if recorded.get("arch") != arch or args is None:
        return None
    if set(args) - ARCH_ARGS[arch] or not all(isinstance(v, int) and not isinstance(v, bool)
                                              for v in args.values()):
        return None
    try:
        return args if _fits(skeleton(arch, num_classes, **args).state_dict(), state) else None
    except (TicketctlError, TypeError, ValueError, RuntimeError):
        return None


def save_torch_prune(ticket: Ticket, path: str | Path, force: bool = False) -> Path:
    """Write `export_torch_prune(ticket)` with torch.save, atomically."""
    with atomic_path(path, force) as tmp:
        torch.save(export_torch_prune(ticket), str(tmp))
    return Path(path)


def write_state_dict(state: dict[str, torch.Tensor], path: str | Path,
                     force: bool = False) -> Path:
    """A plain safetensors state dict (no ticket metadata: what a thief releases), written
    atomically; `verify` reads it as any suspect file, its masks being what is nonzero."""
    with atomic_path(path, force) as tmp:
        safetensors.torch.save_file({k: v.detach().to("cpu").contiguous()
                                     for k, v in sorted(state.items())}, str(tmp))
    return Path(path)
