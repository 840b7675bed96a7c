"""The ticket file: one safetensors file per artifact, validated at the boundary so the rest
of the code can trust what it holds. `docs/FORMAT.md` is the specification."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from ticketctl import prefetch
from ticketctl.artifacts.io import atomic_path
from ticketctl.artifacts.mask import (
    Mask,
    listed_sha256,
    mark_clean,
    raw_sha256_all,
    remember_sha256,
    tensor_digest,
)
from ticketctl.artifacts.sparse import dense_key, is_sparse, sparse_key
from ticketctl.errors import CheckFailed, TicketctlError, first_line
from ticketctl.models import build_model
from ticketctl.models.registry import MAX_CLASSES, skeleton
from ticketctl.models.sources import (
    SOURCES,
    NetworkInfo,
    current_factory,
    fingerprint,
    source_of,
)
from ticketctl.prefetch import MAX_HEADER_BYTES
from ticketctl.records import Choice
from ticketctl.schema import (
    HEX64,
    Bool,
    Field,
    Float,
    Int,
    Lazy,
    List,
    Map,
    Obj,
    Scalar,
    Str,
    brief,
    check,
    parse_json,
)
from ticketctl.threads import map_on_cores

FORMAT_NAME = "ticketctl"
# 1: the dense layout; 2: a key in the sparse layout (`sparse.py`); 3: either layout (a
# `sparse` field says which), hashed as a list of per-tensor digests (`listed_sha256`)
# instead of one stream of every byte
SPARSE_KEY_VERSION = 2
LISTED_HASH_VERSION = 3
FORMAT_VERSION = LISTED_HASH_VERSION  # what every file is written as
READ_VERSION = LISTED_HASH_VERSION  # the newest version this ticketctl reads
MASK_SUFFIX = ".mask"


class Kind(Choice):
    """What a file's weights are: `ticket` rewind weights (what IMP found), `trained` a trained
    sparse model, `key`/`locked` the two halves of a Scheme V1 split, `signed` a ticket carrying
    a Scheme V2 signature."""

    TICKET = "ticket"
    TRAINED = "trained"
    KEY = "key"
    LOCKED = "locked"
    SIGNED = "signed"


KINDS = tuple(k.value for k in Kind)

_SEED = Int(-(2 ** 63), 2 ** 64 - 1)  # what torch.manual_seed takes
_COUNT = Int(0, 2 ** 62)

# The ticket metadata (docs/FORMAT.md): every field a reader uses, with what it must be. Keys
# not named here (written by a newer ticketctl, or provenance) are kept as they are.
DATASET = Obj({
    "name": Field(Str(64)),
    "data_dir": Field(Str(4096)),
    "num_classes": Field(Int(1, MAX_CLASSES)),
    "input_shape": Field(List(Int(1, 1 << 20), max_len=8)),
    "train_size": Field(_COUNT),
    "val_size": Field(_COUNT),
    "test_size": Field(_COUNT),
    "split_seed": Field(_SEED),
    "augment": Field(Str(64)),
    "normalized": Field(Bool()),
    "normalize": Field(Bool()),
    "mean": Field(List(Float(), max_len=64)),
    "std": Field(List(Float(), max_len=64)),
    "stream": Field(Bool()),  # an image folder read from its files batch by batch
    "image_size": Field(Int(1, 4096)),  # the side an image folder was used at (data.images)
})
EXTRA = Obj({
    # a Scheme V1 part: the ticket it came from, and how it was split
    "parent_sha256": Field(HEX64),
    "parent_masks_sha256": Field(HEX64),
    "parent_metadata": Field(Lazy(lambda: TICKET_METADATA)),
    "part": Field(Str(choices=("key", "locked"))),
    "score": Field(Str(64)),
    "key_ratio": Field(Float(0, 1)),
    "key_weights": Field(_COUNT),
    "locked_weights": Field(_COUNT),
    "seed": Field(_SEED),
    # provenance of trained, signed and searched tickets
    "ticket_accuracy": Field(Float()),
    "test_accuracy": Field(Float()),
    "trigger_accuracy": Field(Float()),
    "retrained_from": Field(HEX64),
    "signed_from": Field(HEX64),
    "receipt_matrix_sha256": Field(HEX64),
    "trigger_sha256": Field(HEX64),
    "round": Field(_COUNT),
})
NETWORK = Obj({
    "source": Field(Str(choices=SOURCES)),
    "fingerprint": Field(HEX64),
    "factory": Field(Str(1024)),
    "prunable": Field(Str(1024)),
})
TICKET_METADATA = Obj({
    "kind": Field(Str(choices=KINDS), required=True),
    "arch": Field(Str(128), required=True),
    # a built-in's arguments are integers (checked against ARG_MAX when it is built); a
    # torchvision, timm or factory network's are the --arch-arg values
    "arch_args": Field(Map(Scalar(), max_len=64)),
    "network": Field(NETWORK),
    "num_classes": Field(Int(1, MAX_CLASSES), required=True),
    "class_names": Field(List(Str(256), max_len=MAX_CLASSES)),
    "dataset": Field(DATASET),
    "density": Field(Float(0, 1)),
    "kept": Field(_COUNT),
    "prunable": Field(_COUNT),
    "rewind_epoch": Field(Int(0, 1_000_000)),
    "seed": Field(_SEED),
    "masks_sha256": Field(HEX64),
    "tensors_sha256": Field(HEX64),
    "extra": Field(EXTRA),
})

# (a ticket's header is a few kilobytes: anything near the bounds was crafted)
MAX_METADATA_BYTES = 1 << 20

PICKLE_HINT = (
    "it looks like a pickled PyTorch checkpoint and was not loaded (ticketctl never "
    "unpickles); import it with `ticketctl convert {path} --out TICKET.safetensors`"
)


@dataclass
class Ticket:
    """A model state (the model's own state_dict names) with the mask of its prunable weights,
    and the metadata that says what it is (`kind`) and how to rebuild its network."""

    state: dict[str, torch.Tensor]
    mask: Mask
    kind: Kind = Kind.TICKET
    arch: str = "digits_cnn"
    arch_args: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 10
    class_names: list[str] | None = None
    dataset: dict[str, Any] = field(default_factory=dict)
    rewind_epoch: int | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    network: NetworkInfo | None = None  # where the network comes from (None: a built-in)

    def __post_init__(self) -> None:
        self.kind = Kind.parse(self.kind, "ticket kind")
        # Pruned weights are +0.0 (a multiply by the mask leaves -0.0 for negative weights),
        # so a ticket rebuilt from its parts is identical bit for bit.
        self.state = self.mask.apply_state(self.state)

    @classmethod
    def from_model(cls, model: nn.Module, mask: Mask, **meta: Any) -> Ticket:
        state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
        return cls(state=state, mask=mask, **meta)

    def derive(self, **changes: Any) -> Ticket:
        """Another ticket of the same network: every field not given (architecture, classes,
        dataset, rewind point, seed, extra) carried over from this one, its containers
        copied so the two never share one."""
        for name in ("arch_args", "class_names", "dataset", "extra"):
            value = getattr(self, name)
            if name not in changes and value is not None:
                changes[name] = copy.deepcopy(value)
        return replace(self, **changes)

    @property
    def density(self) -> float:
        return self.mask.density

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the file holds: the state, then each mask as `<param>.mask` (uint8)."""
        out = {k: v.detach().to("cpu").contiguous() for k, v in self.state.items()}
        for name, m in self.mask.items():
            out[name + MASK_SUFFIX] = m.contiguous().view(torch.uint8)
        return out

    def tensors_sha256(self) -> str:
        """SHA-256 of every tensor the file holds, masks included (`listed_sha256`: each
        tensor's own digest is cached on it, so a derived ticket rehashes only what
        changed)."""
        digests = iter(raw_sha256_all([*self.state.values(), *self.mask.values()]))
        entries = [(k, v.dtype, v.shape, next(digests)) for k, v in self.state.items()]
        entries += [(k + MASK_SUFFIX, torch.uint8, m.shape, next(digests))
                    for k, m in self.mask.items()]
        return listed_sha256(entries)

    def legacy_tensors_sha256(self) -> str:
        """The hash as format versions 1 and 2 record it (every byte streamed into one)."""
        h = hashlib.sha256()
        tensors = self.tensors()
        for name in sorted(tensors):
            tensor_digest(h, name, tensors[name])
        return h.hexdigest()

    def metadata(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "arch": self.arch,
            "arch_args": self.arch_args,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "dataset": self.dataset,
            "density": self.density,
            "kept": self.mask.num_kept,
            "prunable": self.mask.num_total,
            "rewind_epoch": self.rewind_epoch,
            "seed": self.seed,
            "masks_sha256": self.mask.sha256(),
            "tensors_sha256": self.tensors_sha256(),
            "extra": self.extra,
            **({"network": self.network.to_dict()} if self.network is not None else {}),
        }

    @property
    def builtin(self) -> bool:
        """Whether the network is one of ticketctl's own (checked against it on load)."""
        return source_of(self.arch) == "builtin"

    def can_build(self) -> bool:
        """Whether this process can build the network (a built-in; torchvision or timm
        installed; the user's factory named): without it, only what needs weights and masks
        works (inspect, split by omp or random, sign, verify a receipt, removal attacks
        without accuracy)."""
        source = source_of(self.arch)
        if source == "builtin":
            return True
        if source in ("torchvision", "timm"):
            return importlib.util.find_spec(source) is not None
        return current_factory() is not None

    def skeleton(self) -> nn.Module:
        """This ticket's network on the meta device (names, shapes, module types and the
        forward code, no memory): what graph tracing, layer choice and checks need. Raises
        TicketctlError when the network cannot be built (a ticket imported without one, or
        one from the owner's factory when no --model-factory is given) or is not this
        ticket's."""
        model = skeleton(self.arch, self.num_classes, **self.arch_args)
        if not self.builtin:
            self._check_network(model)
        return model

    def build_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The architecture with this ticket's weights loaded (pruned weights are zero)."""
        model = build_model(self.arch, self.num_classes, **self.arch_args)
        if not self.builtin:
            self._check_network(model)
        model.load_state_dict(self.state)
        return model.to(device)

    def _check_network(self, model: nn.Module) -> None:
        """A network from outside must be this ticket's: the recorded fingerprint when there
        is one, else the names and shapes of the weights."""
        theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in self.state.items()}
        how = (f"--model-factory {self.network.factory}" if self.network and
               self.network.factory else "the network built")
        if theirs != ours:
            missing = sorted(set(ours) - set(theirs))
            extra = sorted(set(theirs) - set(ours))
            shape = [k for k in ours if k in theirs and ours[k] != theirs[k]]
            detail = (f"it lacks {missing[0]!r}" if missing else
                      f"it has {extra[0]!r}, which the ticket does not" if extra else
                      f"{shape[0]!r} is {list(theirs[shape[0]])} there, "
                      f"{list(ours[shape[0]])} in the ticket")
            raise TicketctlError(f"{how} does not match this ticket ({detail})")
        recorded = self.network.fingerprint if self.network else None
        if recorded is not None and fingerprint(model) != recorded:
            raise TicketctlError(f"{how} does not match this ticket: its module types differ "
                                 "from the recorded fingerprint")


def save_ticket(ticket: Ticket, path: str | Path, force: bool = False) -> Path:
    """Write a ticket atomically; refuses to overwrite unless `force`. A key is written in
    the sparse layout (its weights only), whatever else in the dense one."""
    meta = ticket.metadata()
    version = FORMAT_VERSION
    # (a network from outside has no skeleton to rebuild a sparse key's zeros from)
    sparse = sparse_key(ticket.state, dict(ticket.mask)) \
        if ticket.kind == Kind.KEY and ticket.builtin else None
    if sparse is not None:
        tensors, layout = sparse
        meta["sparse"] = layout
    else:
        tensors = ticket.tensors()
    header = {
        "format": FORMAT_NAME,
        "format_version": str(version),
        "ticket": json.dumps(meta, sort_keys=True),
    }
    # name order, so the same ticket always serialises to the same bytes; written straight to
    # the file (no copy of the whole model in memory), then the header made canonical
    with atomic_path(path, force) as tmp:
        safetensors.torch.save_file({k: tensors[k] for k in sorted(tensors)}, str(tmp),
                                    metadata=header)
        _canonical_header(tmp)
    return Path(path)


def _canonical(head: bytes) -> bytes:
    """A safetensors header (its 8-byte length and JSON) with sorted keys: the library keeps
    its metadata in a hash map whose order changes between calls, and equal tickets should be
    equal files."""
    n = int.from_bytes(head[:8], "little")
    header = json.loads(head[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data keeps its 8-byte alignment
    return len(text).to_bytes(8, "little") + text


def _canonical_header(path: Path) -> None:
    """Rewrite a freshly written file's header in canonical form: in place when it keeps its
    length (the same compact JSON in another key order, the same padding), else by copying
    the tensor bytes behind the new header."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        old = f.read(n)
        new = _canonical(n.to_bytes(8, "little") + old)
        if len(new) == 8 + n:
            f.seek(0)
            f.write(new)
            return
    moved = path.with_name(path.name + ".body")
    os.replace(path, moved)
    try:
        with open(moved, "rb") as src, open(path, "wb") as dst:
            src.seek(8 + n)
            dst.write(new)
            shutil.copyfileobj(src, dst, 1 << 24)
    finally:
        moved.unlink(missing_ok=True)


def file_format(path: Path) -> str:
    """"safetensors" or "pickle" (a torch.save checkpoint), from the first bytes; missing
    files, folders and files too short to be either are refused."""
    if not path.exists():
        raise TicketctlError(f"{path}: no such file")
    if path.is_dir():
        raise TicketctlError(f"{path} is a folder, not a ticket file")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    # A safetensors file: an 8-byte little-endian header length, then a JSON object. Its
    # first byte can be 0x80 (a 3456-byte header), so check this before the pickle test.
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    looks_safetensors = len(head) == 9 and head[8:9] == b"{" and 8 + n <= size
    # Pickle protocol 2+ starts with 0x80 and the protocol number; torch.save's zip
    # container with PK\x03\x04.
    pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if not looks_safetensors and (pickled or head[:4] == b"PK\x03\x04"):
        return "pickle"
    if len(head) < 8:
        raise TicketctlError(f"{path} is not a safetensors file (only {len(head)} bytes)")
    return "safetensors"


def is_npz(path: Path) -> bool:
    """A zip whose members are all `.npy` arrays: NumPy's `.npz` (a trigger set, say), not a
    torch.save zip (whose members are `data.pkl`, `data/0`, ...)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def header_size(path: Path) -> int:
    """The length of a safetensors file's header (its first 8 bytes, little-endian)."""
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def read_header(path: str | Path) -> dict[str, str]:
    """The raw `__metadata__` of a safetensors file, after checking it is one and that its
    header is of a sane size (a crafted header of tens of megabytes is refused unread)."""
    p = Path(path)
    if file_format(p) == "pickle":
        if is_npz(p):
            raise TicketctlError(f"{p} is a NumPy .npz archive (a trigger set?), not a ticket "
                                 "file; `ticketctl inspect` says what it holds")
        raise TicketctlError(f"{p}: " + PICKLE_HINT.format(path=p))
    n = header_size(p)
    if MAX_HEADER_BYTES < n <= p.stat().st_size - 8:  # (a length past the end: corrupt)
        raise TicketctlError(f"{p}: its safetensors header is {n:,} bytes; a ticket's is a "
                             f"few kilobytes (at most {MAX_HEADER_BYTES:,} are read)")
    try:
        with safe_open(str(p), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for every corruption
        raise TicketctlError(
            f"{p} is not a valid safetensors file ({first_line(e)}); is it truncated or corrupt?"
        ) from None




def parse_metadata(header: dict[str, str], where: str) -> dict[str, Any]:
    """The ticket metadata of a header, checked against TICKET_METADATA: every field a reader
    uses has its type and bounds, or the file is refused naming the field."""
    if header.get("format") != FORMAT_NAME or "ticket" not in header:
        raise TicketctlError(
            f"{where} is a safetensors file but not a ticketctl ticket (no ticketctl metadata); "
            "import plain state dicts with `ticketctl convert`"
        )
    text = header.get("format_version", "")
    try:
        version = int(text) if len(text) < 10 else None
    except ValueError:
        version = None
    if version is None:
        raise TicketctlError(f"{where}: unreadable format version {brief(text)}")
    if version > READ_VERSION:
        raise TicketctlError(
            f"{where} was written in ticket format version {version}; this ticketctl reads up to "
            f"{READ_VERSION}: upgrade ticketctl"
        )
    if version < 1:
        raise TicketctlError(f"{where}: invalid format version {version}")
    meta = parse_json(header["ticket"], where, "ticket metadata", MAX_METADATA_BYTES)
    return check(TICKET_METADATA, meta, where, "ticket metadata")


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """NaN or infinite weights train to nothing and poison every magnitude ranking: refuse
    them at the boundary, naming the tensor."""
    for name, t in state.items():
        if not t.is_floating_point() or not t.numel():
            continue
        # one reduction, no copy: NaN propagates to both, an infinity shows in one
        lo, hi = torch.aminmax(t.detach())
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            bad = int((~torch.isfinite(t)).sum())
            raise TicketctlError(f"{where}: tensor {name!r} holds {bad} NaN or infinite "
                                 "value(s); the file cannot be used")


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (checked to be one by `read_header` first)."""
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as e:
        raise TicketctlError(f"{path}: cannot read tensors ({first_line(e)}); truncated?") from None
    # each tensor's digest, when the CLI had the file hashed while PyTorch was imported
    for name, digest in (prefetch.take(path) or {}).items():
        if name in tensors:
            remember_sha256(tensors[name], digest)
    return tensors


def load_ticket(path: str | Path, verify_hashes: bool = True) -> Ticket:
    """Load and validate a ticket file.

    Structural problems raise TicketctlError (bad input); a file whose content no longer
    matches the hashes it records raises CheckFailed (it was altered after writing)."""
    p = Path(path)
    header = read_header(p)
    meta = parse_metadata(header, str(p))
    ticket = ticket_from(meta, read_tensors(p), str(p))
    problem = altered(ticket, meta, str(p), int(header["format_version"])) \
        if verify_hashes else None
    if problem:
        raise CheckFailed(problem)
    return ticket


def altered(ticket: Ticket, meta: dict[str, Any], where: str,
            version: int = FORMAT_VERSION) -> str | None:
    """Why a file's content no longer matches the hashes its metadata records (as its format
    `version` computes them), or None."""
    legacy = version < LISTED_HASH_VERSION
    masks = ticket.mask.legacy_sha256() if legacy else ticket.mask.sha256()
    if meta.get("masks_sha256") != masks:
        return (f"{where}: masks do not match their recorded SHA-256; "
                "the file was altered after it was written")
    tensors = ticket.legacy_tensors_sha256() if legacy else ticket.tensors_sha256()
    if meta.get("tensors_sha256") != tensors:
        return (f"{where}: tensors do not match their recorded SHA-256; "
                "the file was altered after it was written")
    return None


# The dtypes a ticket's weights may have: those ticketctl computes in (float64 in tests that
# ask for it). Half precision, integers, booleans and complex numbers are refused by name.
WEIGHT_DTYPES = (torch.float32, torch.float64)


def dtype_problem(got: torch.dtype, want: torch.dtype) -> str | None:
    """Why a tensor of dtype `got` cannot stand where the architecture has `want`, or None."""
    name = str(got).removeprefix("torch.")
    if want.is_floating_point:
        if got not in WEIGHT_DTYPES:
            return f"{name}; weights must be float32 or float64"
        return None
    if got != want:
        return f"{name}; this buffer must be {str(want).removeprefix('torch.')}"
    return None


def ticket_from(meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> Ticket:
    """A ticket from parsed metadata and a file's tensors, checked against its architecture
    (a built-in's), or for a network from outside against itself: nothing a file names is
    ever imported."""
    if source_of(meta["arch"]) != "builtin":
        return _external_ticket(meta, tensors, where)
    try:
        model = skeleton(meta["arch"], meta["num_classes"], **(meta.get("arch_args") or {}))
    except TicketctlError as e:
        raise TicketctlError(f"{where}: {e}") from None
    expected = model.state_dict()
    if "sparse" in meta or is_sparse(tensors):
        if meta["kind"] != Kind.KEY:
            raise TicketctlError(f"{where}: only a key file is written in the sparse layout, "
                                 f"not a {meta['kind']!r}")
        tensors = dense_key(tensors, meta.get("sparse"), expected, where)

    masks = {k[: -len(MASK_SUFFIX)]: v for k, v in tensors.items() if k.endswith(MASK_SUFFIX)}
    state = {k: v for k, v in tensors.items() if not k.endswith(MASK_SUFFIX)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = [f"{label} {', '.join(names[:3])}" + (" ..." if len(names) > 3 else "")
                  for label, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise TicketctlError(
            f"{where}: tensors do not fit architecture {meta['arch']!r} ({'; '.join(detail)})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise TicketctlError(
                f"{where}: tensor {k!r} has shape {list(v.shape)} but {meta['arch']} needs "
                f"{list(expected[k].shape)}"
            )
    for k, v in state.items():
        problem = dtype_problem(v.dtype, expected[k].dtype)
        if problem:
            raise TicketctlError(f"{where}: tensor {k!r} is {problem}")
    if not masks:
        raise TicketctlError(f"{where}: holds no mask (no `<param>{MASK_SUFFIX}` tensor), so it "
                             "is not a ticket; import a dense model with `ticketctl convert`")
    params = dict(model.named_parameters())
    for name in masks:
        if name not in params:
            raise TicketctlError(f"{where}: mask {name + MASK_SUFFIX!r} names no parameter")
    mask = _checked_mask(masks, state, {k: v.shape for k, v in params.items()}, where)
    return _ticket(meta, state, mask)


def _checked_mask(masks: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                  shapes: dict[str, Any], where: str) -> Mask:
    """The masks as a Mask, each of its weight's shape (`shapes`), every pruned weight zero
    and every weight finite."""
    try:
        mask = Mask(masks, copy=False)  # the file's own tensors, read for this ticket alone
        mask.check_shapes(shapes, where=f"{where}: ")
    except TicketctlError as e:
        msg = str(e)
        raise TicketctlError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    def nonzero_pruned(name: str) -> tuple[int, bool]:
        """How many pruned weights are not zero, and whether they all hold +0.0."""
        w, m = state[name], mask[name]
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(w.element_size())
        # on the bits: a pruned weight must be +0.0 exactly (then the ticket need not zero
        # it again); -0.0 is zero too, only normalised by the ticket
        n = int(torch.count_nonzero((w.view(bits) if bits else w).masked_fill(m, 0)))
        if n and bits:
            return int(torch.count_nonzero(w.masked_fill(m, 0))), False
        return n, True

    names = list(mask)
    counts = map_on_cores(nonzero_pruned, names)  # layer by layer, on every core
    for name, (n, plus_zero) in zip(names, counts, strict=True):
        if n:
            raise TicketctlError(
                f"{where}: {n} pruned weight(s) of {name!r} are not zero; the file is inconsistent"
            )
        if plus_zero:
            mark_clean(state[name], mask[name])
    check_finite(state, where)
    return mask


def _external_ticket(meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                     where: str) -> Ticket:
    """A ticket whose network ticketctl does not define: its masks must fit its own weights
    (same shape, pruned weights zero), weights be float32/float64 and finite."""
    if "sparse" in meta or is_sparse(tensors):
        raise TicketctlError(f"{where}: a ticket of a {meta['arch']!r} network is never "
                             "written in the sparse layout")
    masks = {k[: -len(MASK_SUFFIX)]: v for k, v in tensors.items() if k.endswith(MASK_SUFFIX)}
    state = {k: v for k, v in tensors.items() if not k.endswith(MASK_SUFFIX)}
    if not masks:
        raise TicketctlError(f"{where}: holds no mask (no `<param>{MASK_SUFFIX}` tensor), so it "
                             "is not a ticket; import a dense model with `ticketctl convert`")
    for name in masks:
        if name not in state:
            raise TicketctlError(f"{where}: mask {name + MASK_SUFFIX!r} names no weight")
        problem = dtype_problem(state[name].dtype, torch.float32)
        if problem:
            raise TicketctlError(f"{where}: tensor {name!r} is {problem}")
    mask = _checked_mask(masks, state, {k: state[k].shape for k in masks}, where)
    return _ticket(meta, state, mask)


def _ticket(meta: dict[str, Any], state: dict[str, torch.Tensor], mask: Mask) -> Ticket:
    return Ticket(
        state=state,
        mask=mask,
        kind=meta["kind"],
        arch=meta["arch"],
        arch_args=meta.get("arch_args") or {},
        num_classes=meta["num_classes"],
        class_names=meta.get("class_names"),
        dataset=meta.get("dataset") or {},
        rewind_epoch=meta.get("rewind_epoch"),
        seed=meta.get("seed"),
        extra=meta.get("extra") or {},
        network=NetworkInfo.from_dict(meta["network"], meta["arch"])
        if meta.get("network") else None,
    )
