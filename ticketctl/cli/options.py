"""The CLI's options, declared once. Options that travel together are a group: a dataclass
whose fields are the flags, each carrying its help (OpenLTH's way: the flags are generated
from the settings). A command takes a group as one typed parameter and `command` turns it into
the group's flags (written after the subcommand, as always), then hands the function one
object per group; groups may hold groups. Closed sets of choices are `Choice` enums, so Click
checks them and --help lists them."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import Progress
from typer.models import ParameterInfo

from ticketctl.artifacts.io import check_output_path
from ticketctl.cli.common import (
    LOST_PEER,
    console,
    emit_json,
    fail,
    launch_ranks,
    progress_bar,
)
from ticketctl.device import Device, configure_threads
from ticketctl.errors import Terminated, TicketctlError
from ticketctl.models import ARCHS
from ticketctl.models.sources import FACTORY, load_factory, parse_arch_args, use_factory
from ticketctl.protect.receipt import load_public_key, load_receipt
from ticketctl.protect.trigger import load_trigger_set
from ticketctl.protect.verdict import ALPHA
from ticketctl.protect.verify import Marks
from ticketctl.prune import Preset
from ticketctl.train.config import Schedule, ScoreTest, TrainOverrides

P_TRAIN = "Training (override the preset)"
P_DATA = "Data"
P_CUDA = "CUDA speed-ups (on by default on a GPU)"
P_DIST = "Distributed"
P_MARKS = "The owner's marks"


# ---- the mechanism ----------------------------------------------------------------------------
def option(*flags: str, default: Any = None, help: str | None = None, panel: str | None = None,
           old: str | None = None, **typer_options: Any) -> Any:
    """A group's field: its default, and how it shows on the command line (its flags, help and
    help panel; the panel defaults to the group's; `old`, an earlier spelling still taken)."""
    return dataclasses.field(default=default, metadata={
        "flags": flags, "help": help, "panel": panel, "old": old, "typer": typer_options})


@dataclass(frozen=True)
class OldSpelling:
    """`Annotated[T, typer.Option("--key-mask", ...), OldSpelling("--key")]`: a flag renamed
    for one vocabulary across commands; scripts written for the old name keep working (it is
    hidden from --help). Giving both is an error."""

    flag: str


def _old_spelling(annotation: Any) -> tuple[Any, ParameterInfo, OldSpelling] | None:
    """(base type, Typer option, old spelling) of a renamed option, else None."""
    if typing.get_origin(annotation) is not Annotated:
        return None
    base, *extras = typing.get_args(annotation)
    old = next((e for e in extras if isinstance(e, OldSpelling)), None)
    info = next((e for e in extras if isinstance(e, ParameterInfo)), None)
    return None if old is None or info is None else (base, info, old)


def _new_flag(name: str, info: ParameterInfo) -> str:
    # Typer takes a leading flag as the `default` field (in Annotated the default is given
    # apart), the other flags as `param_decls`
    decls = [info.default, *(getattr(info, "param_decls", None) or ())]
    flags = [d for d in decls if isinstance(d, str) and d.startswith("--")]
    return flags[0] if flags else "--" + name.replace("_", "-")


@dataclass(frozen=True)
class _Renamed:
    name: str  # the parameter
    flag: str  # its flag now
    old: str  # the flag it had
    required: bool


def _with_old_spellings(params: list[inspect.Parameter]
                        ) -> tuple[list[inspect.Parameter], list[_Renamed]]:
    """Each renamed option gets a hidden twin taking its old flag. A required one becomes
    optional for Click (either spelling may carry it) and is checked in `_take_old`."""
    out: list[inspect.Parameter] = []
    renamed: list[_Renamed] = []
    for p in params:
        found = _old_spelling(p.annotation)
        if found is None:
            out.append(p)
            continue
        base, info, old = found
        required = p.default is inspect.Parameter.empty
        flag = _new_flag(p.name, info)
        if required:
            info.help = (info.help or "") + " [required]"
            p = p.replace(default=None, annotation=Annotated[Optional[base], info])
        out.append(p)
        out.append(inspect.Parameter(
            f"{p.name}__old", inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[base], typer.Option(
                old.flag, hidden=True, help=f"Old spelling of {flag}.")]))
        renamed.append(_Renamed(p.name, flag, old.flag, required))
    return out, renamed


def _take_old(kwargs: dict[str, Any], renamed: list[_Renamed], defaults: dict[str, Any]) -> None:
    """Move values given under an old flag to the option's own name."""
    for r in renamed:
        value = kwargs.pop(f"{r.name}__old", None)
        if value is not None:
            if kwargs[r.name] is not None and kwargs[r.name] != defaults.get(r.name):
                raise TicketctlError(f"{r.old} is the old spelling of {r.flag}: give one of them")
            kwargs[r.name] = value
        if r.required and kwargs[r.name] is None:
            raise TicketctlError(f"missing option {r.flag}")


def nested(cls: type) -> Any:
    """A group's field that is another group, expanded in place."""
    return dataclasses.field(default_factory=cls)


class Without:
    """`Annotated[Group, Without("epochs")]`: the group without these flags, at any depth
    (their defaults stand), for a command that declares its own."""

    def __init__(self, *names: str) -> None:
        self.names = frozenset(names)


def group(panel: str | None = None) -> Callable[[type], type]:
    """Make a class of options a dataclass and a group that `command` expands; its options
    show under `panel` in --help unless they name their own."""

    def mark(cls: type) -> type:
        cls = dataclass(cls)
        cls.__option_panel__ = panel  # type: ignore[attr-defined]
        return cls

    return mark


def _group_of(annotation: Any) -> tuple[type | None, frozenset[str]]:
    without: frozenset[str] = frozenset()
    if typing.get_origin(annotation) is Annotated:
        base, *extras = typing.get_args(annotation)
        for e in extras:
            if isinstance(e, Without):
                without = e.names
        annotation = base
    if isinstance(annotation, type) and hasattr(annotation, "__option_panel__"):
        return annotation, without
    return None, without


Builder = Callable[[dict[str, Any]], Any]


def _expand(cls: type, without: frozenset[str]) -> tuple[list[inspect.Parameter], Builder]:
    """A group's flags as parameters, and how to build the group from their values."""
    hints = typing.get_type_hints(cls, include_extras=True)
    params: list[inspect.Parameter] = []
    parts: list[tuple[str, Builder | None]] = []
    for f in dataclasses.fields(cls):
        if not f.init:  # state the group keeps (Output.emitted), not an option
            continue
        sub, sub_without = _group_of(hints[f.name])
        if sub is not None:
            sub_params, build = _expand(sub, without | sub_without)
            params += sub_params
            parts.append((f.name, build))
        elif f.name not in without:
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                            default=f.default,
                                            annotation=_annotation(hints[f.name], f, cls)))
            parts.append((f.name, None))

    def build(values: dict[str, Any]) -> Any:
        return cls(**{name: b(values) if b else values.pop(name) for name, b in parts})

    return params, build


def _annotation(hint: Any, f: dataclasses.Field, cls: type) -> Any:
    """The Typer annotation of a group's field: its own when it already is one (a shared
    alias such as `Pack`), else made from the field's `option` metadata."""
    if typing.get_origin(hint) is Annotated and any(
            isinstance(x, ParameterInfo) for x in typing.get_args(hint)[1:]):
        return hint
    meta = f.metadata
    info = typer.Option(*meta.get("flags", ()), help=meta.get("help"),
                        rich_help_panel=meta.get("panel") or cls.__option_panel__,
                        **meta.get("typer", {}))
    if meta.get("old"):
        return Annotated[hint, info, OldSpelling(meta["old"])]
    return Annotated[hint, info]


def _output(values: Any) -> Output | None:
    """The command's Output group, wherever it sits."""
    if isinstance(values, Output):
        return values
    if dataclasses.is_dataclass(values):
        for f in dataclasses.fields(values):
            found = _output(getattr(values, f.name))
            if found is not None:
                return found
    return None


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A Typer command from `fn`: its group-typed parameters become the groups' flags, and
    errors become one line on stderr with the right exit status (a traceback with --debug)."""
    sig = inspect.signature(fn, eval_str=True)
    params: list[inspect.Parameter] = []
    builders: dict[str, Builder] = {}
    for p in sig.parameters.values():
        cls, without = _group_of(p.annotation)
        if cls is None:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        group_params, builders[p.name] = _expand(cls, without)
        params += group_params
    params, renamed = _with_old_spellings(params)
    defaults = {p.name: p.default for p in params}
    seen = [p.name for p in params]
    if len(seen) != len(set(seen)):
        raise TypeError(f"{fn.__name__}: an option is declared twice")

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        json_requested = bool(kwargs.get("json_out"))
        try:
            _take_old(kwargs, renamed, defaults)
            for name, build in builders.items():  # (a group may check its values)
                kwargs[name] = build(kwargs)
        except TicketctlError as e:
            fail(str(e), e.exit_code, as_json=json_requested, kind=getattr(e, "kind", None))
        output = next((o for o in map(_output, kwargs.values()) if o is not None), Output())
        # a command that printed its result (a verdict that then fails) prints no second one
        as_json = output.json_out and not output.emitted
        try:
            return fn(**kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except TicketctlError as e:
            if output.debug:
                raise
            fail(str(e), e.exit_code, as_json=output.json_out and not output.emitted,
                 kind=getattr(e, "kind", None))
        except KeyboardInterrupt:
            fail("interrupted", 130, as_json=as_json)
        except Terminated:  # SIGTERM while data-parallel ranks ran: they were stopped first
            fail("stopped by SIGTERM; every rank was stopped", Terminated.code,
                 as_json=as_json)
        except Exception as e:  # anything unforeseen still gets one line
            if output.debug:
                raise
            fail(f"unexpected {type(e).__name__}: {e} (rerun with --debug for a traceback)", 2,
                 as_json=output.json_out and not output.emitted,
                 kind=LOST_PEER if lost_peer(e) else "unexpected")

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def lost_peer(e: BaseException) -> bool:
    """Whether a data-parallel rank failed because another one left (its collective lost the
    peer): not the cause, which the launching command then reports instead."""
    text = str(e)
    if any(s in text for s in ("Connection closed by peer", "Connection reset by peer",
                               "Broken pipe")):
        return True
    dist = sys.modules.get("torch.distributed")  # (never imported here just to ask)
    return dist is not None and isinstance(e, getattr(dist, "DistNetworkError", ()))


# ---- every command ----------------------------------------------------------------------------
@group()
class Output:
    """How a command reports: JSON on stdout or text on stderr, and whether it may overwrite."""

    json_out: bool = option("--json", default=False, help="Print one JSON document on stdout.")
    quiet: bool = option("--quiet", "-q", default=False,
                         help="No progress, notes or tables (and no report from inspect).")
    debug: bool = option("--debug", default=False, help="Show tracebacks on errors.")
    force: bool = option("--force", default=False, help="Overwrite existing output files.")

    def check(self, *paths: Path | None) -> None:
        """Refuse outputs that exist (without --force) or sit in missing folders, before any
        work is done."""
        for p in paths:
            if p is not None:
                check_output_path(p, self.force)

    emitted: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def emit(self, doc: Any, text: Callable[[], None]) -> None:
        """`doc` as JSON with --json, else `text()` unless --quiet."""
        if self.json_out:
            emit_json(doc)
            self.emitted = True
        elif not self.quiet:
            text()

    @contextmanager
    def progress(self, silent: bool = False) -> Iterator[Progress]:
        with progress_bar(self.quiet or self.json_out or silent) as p:
            yield p


@group()
class Compute:
    device: Device = option("--device", default=Device.AUTO, help="Where to compute.")
    threads: Optional[int] = option(
        min=1, help="CPU threads per operation (default: one per core); 1 is fastest for small "
             "networks on a shared machine.")

    def __post_init__(self) -> None:
        configure_threads(self.threads)


# ---- data -------------------------------------------------------------------------------------
@group(panel=P_DATA)
class Streaming:
    """Image folders: held in memory, or read from their files batch by batch."""

    stream: Optional[bool] = option(
        "--stream/--no-stream", show_default=False,
        help="Image folders: read the images from their files batch by batch (--stream) or "
             "hold them all in memory (--no-stream); default: stream when they do not fit or "
             "have mixed sizes (docs/DISTRIBUTED.md).")
    image_size: Optional[int] = option(
        help="Image folders: train and evaluate at this side in pixels (needed to stream "
             "images of mixed sizes; held in memory, images are resized to it).")


@group(panel=P_DATA)
class DataOptions:
    dataset: Optional[str] = option(help="digits, cifar10, cifar100, imagefolder or synthetic "
                                 "(default: the model's, else digits).")
    data_dir: Optional[Path] = option(help="Folder holding cifar-10-batches-py/, "
                                   "cifar-100-python/ or train/ and test/.")
    streaming: Streaming = nested(Streaming)


@group(panel=P_DATA)
class Split:
    val_size: Optional[int] = option(
        help="Training images held out for validation (default 5,000 on CIFAR).")
    split_seed: Optional[int] = option(
        help="Seed of the validation split (default: the ticket's, else 0).")


Arch = Annotated[Optional[str], typer.Option(
    help="resnet20, resnet18, resnet50, vgg16 or digits_cnn.", rich_help_panel=P_DATA)]


# ---- networks from outside ------------------------------------------------------------------
P_NET = "Network (docs/ANY_MODEL.md)"


@group(panel=P_NET)
class NetworkSource:
    """The user's own network code, named on the command line (never taken from a file)."""

    model_factory: Optional[str] = option(
        help="Your own network: FILE.py:FUNCTION or package.module:FUNCTION, called with "
             "num_classes (and in_channels). Its code runs: name only code you trust.")

    def __post_init__(self) -> None:
        use_factory(load_factory(self.model_factory) if self.model_factory else None)


@group(panel=P_NET)
class Architecture:
    """Which network a command builds: a built-in, torchvision's or timm's, or the user's."""

    arch: Optional[str] = option(
        help="resnet20, resnet18, resnet50, vgg16, digits_cnn, torchvision:NAME or timm:NAME "
             "(default: the dataset's built-in).")
    arch_arg: Optional[list[str]] = option(
        "--arch-arg", help="KEY=VALUE for the torchvision, timm or factory builder "
        "(repeatable; num_classes comes from the dataset).")
    source: NetworkSource = nested(NetworkSource)

    def __post_init__(self) -> None:
        if self.arch is not None and self.source.model_factory is not None:
            raise TicketctlError("give --arch or --model-factory, not both")
        self.args = parse_arch_args(self.arch_arg)
        if self.args and self.arch in ARCHS:
            raise TicketctlError(f"--arch-arg is for torchvision, timm and factory networks; "
                                 f"{self.arch} takes none")

    @property
    def name(self) -> str | None:
        """The `arch` a new ticket records (`factory` for the user's own network)."""
        return FACTORY if self.source.model_factory is not None else self.arch


# ---- training ---------------------------------------------------------------------------------
@group(panel=P_TRAIN)
class Training:
    """A preset schedule and the settings given explicitly over it."""

    preset: Optional[Preset] = option(
        help="Training schedule (default: demo on digits, else paper).")
    epochs: Optional[int] = option(min=1, help="Epochs per training.")
    batch_size: Optional[int] = option(
        min=1, help="Images per step (the global batch with --nproc).")
    lr: Optional[float] = option(help="Peak learning rate.")
    momentum: Optional[float] = option(help="SGD momentum.")
    weight_decay: Optional[float] = option(help="L2 penalty on the weights.")
    nesterov: Optional[bool] = option("--nesterov/--no-nesterov", show_default=False,
                                      help="Nesterov momentum.")
    schedule: Optional[Schedule] = option(help="Learning-rate schedule after the warm-up.")
    milestones: Optional[str] = option(
        help="Epochs where multistep divides the rate by 10, e.g. 91,136.")
    warmup_epochs: Optional[int] = option(
        min=0, help="Epochs of linear learning-rate warm-up from zero.")
    seed: int = option(default=0, help="Seed for every random choice.")
    no_compile: bool = option("--no-compile", default=False, panel=P_CUDA,
                              help="Do not torch.compile.")
    no_graph: bool = option("--no-graph", default=False, panel=P_CUDA,
                            help="Do not capture CUDA graphs.")
    no_bf16: bool = option("--no-bf16", default=False, panel=P_CUDA, help="Train in fp32.")
    no_channels_last: bool = option("--no-channels-last", default=False, panel=P_CUDA,
                                    help="Keep NCHW memory layout (channels-last is faster "
                                         "for bf16 convolutions).")
    compile_mode: Optional[str] = option(
        panel=P_CUDA, help="torch.compile mode: default, or max-autotune-no-cudagraphs (times "
                           "candidate kernels once, minutes of compiling, for faster steps).")
    no_fuse_step: bool = option(
        "--no-fuse-step", default=False, panel=P_CUDA,
        help="Compile the network alone, not the whole step (batch gather, crop and flip, "
             "loss and SGD update then run as separate small kernels).")
    combo_kernels: bool = option(
        "--combo-kernels", default=False, panel=P_CUDA,
        help="Compile with Inductor's combo kernels: independent small kernels launched as "
             "one (same arithmetic; 5% faster batch-128 ResNet-20 epochs on an H200, other "
             "networks not measured).")
    test_eval: Optional[ScoreTest] = option(
        help="Score the test split after every epoch, or only after an epoch that is the best "
             "on validation so far (all a result needs) [every; paper preset: best].")

    def overrides(self) -> TrainOverrides:
        return TrainOverrides(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
            weight_decay=self.weight_decay, nesterov=self.nesterov,
            schedule=self.schedule.value if self.schedule else None,
            milestones=parse_ints(self.milestones, "--milestones"),
            warmup_epochs=self.warmup_epochs, seed=self.seed,
            compile=False if self.no_compile else None,
            cuda_graph=False if self.no_graph else None, bf16=False if self.no_bf16 else None,
            channels_last=False if self.no_channels_last else None,
            compile_mode=self.compile_mode,
            fuse_step=False if self.no_fuse_step else None,
            combo_kernels=True if self.combo_kernels else None,
            test_eval=self.test_eval.value if self.test_eval else None)


Devices = Annotated[Optional[str], typer.Option(
    "--devices", help="Spread the independent trainings over these devices, one worker "
    "process each: 'all' (every visible GPU) or a list such as cuda:0,cuda:1 (default: every "
    "visible GPU when the data are on a GPU, else one).",
    rich_help_panel=P_CUDA)]

Pack = Annotated[Optional[int], typer.Option(
    "--pack", help="Train this many independent models in one packed network (default: 8 "
    "on CUDA for models of at most 2 M weights, else 1; 1 turns packing off).",
    rich_help_panel=P_CUDA)]


@group(panel=P_DIST)
class Distributed:
    nproc: int = option(default=1, help="Data-parallel processes on this host (torchrun; "
                        "NCCL on GPUs, gloo on CPUs); --batch-size stays the global batch.")
    nnodes: int = option(default=1, help="Hosts taking part (each runs the command).")
    rdzv_endpoint: Optional[str] = option(help="HOST:PORT where the hosts meet (several hosts).")
    dist_timeout: float = option(
        default=3600.0, help="Seconds before a stuck distributed run is stopped (exit 2).")
    reduce_bf16: bool = option(
        "--reduce-bf16", default=False,
        help="Average the gradients over the ranks in bf16, half the bytes of fp32 (each "
             "gradient rounded to bf16 first, as DDP's bf16 compression hook).")
    bucket_mb: Optional[float] = option(
        "--bucket-mb",
        help="Average the gradients in buckets of about this many MiB, each as soon as "
             "backward has produced it, so the all-reduce overlaps the rest of backward (the "
             "network is then compiled block by block; for slow links between hosts, not "
             "measured there); 0: one all-reduce after backward, the faster over NVLink "
             "[default: 0].")

    @property
    def wanted(self) -> bool:
        return self.nproc > 1 or self.nnodes > 1

    def train_overrides(self, train: TrainOverrides) -> TrainOverrides:
        """The training settings with the data-parallel ones given here; --reduce-bf16 and
        a --bucket-mb above 0 are refused where no ranks average anything (a rank itself runs
        without --nproc)."""
        from ticketctl.distributed import in_worker

        given = [name for name, on in (("--reduce-bf16", self.reduce_bf16),
                                         ("--bucket-mb", bool(self.bucket_mb))) if on]
        if not given:
            return train
        if not (self.wanted or in_worker()):
            raise TicketctlError(f"{' and '.join(given)}: the gradients are averaged over "
                                 "data-parallel ranks only; give --nproc 2 or more (or --nnodes)")
        return dataclasses.replace(train, reduce_bf16=True if self.reduce_bf16 else None,
                                   bucket_mb=self.bucket_mb)

    def launched(self) -> bool:
        """In the user's process with --nproc/--nnodes above 1: run this command as torchrun
        ranks and return True once they finished."""
        return launch_ranks(self.nproc, self.nnodes, self.rdzv_endpoint, self.dist_timeout)


# ---- the owner's marks ------------------------------------------------------------------------
@group(panel=P_MARKS)
class OwnerMarks:
    """The receipt (white box) and trigger set (black box) a suspect is checked against."""

    receipt: Optional[Path] = option(help="The owner's receipt (Scheme V2).")
    public_key: Optional[Path] = option(help="PREFIX.pub: the receipt must be signed by this key.")
    trigger: Optional[Path] = option(
        help="The owner's trigger set (Scheme V3): checks the model's answers.")
    null_rate: Optional[str] = option(
        help="Chance agreement with the trigger labels: a number, or the JSON `calibrate "
             "--out` wrote (default 1/classes).")
    alpha: float = option(default=ALPHA, help="Decision level for the p-values.")

    def load(self, defend: bool = False) -> Marks:
        # (calibration brings the trainers: imported only when a null rate is read)
        from ticketctl.protect.calibrate import read_null_rate

        trigger = load_trigger_set(self.trigger) if self.trigger else None
        return Marks(receipt=load_receipt(self.receipt) if self.receipt else None,
                     public_key=load_public_key(self.public_key) if self.public_key else None,
                     trigger=trigger, alpha=self.alpha, defend=defend,
                     null_rate=read_null_rate(self.null_rate, trigger) if self.null_rate
                     else None)


# ---- parsing lists ------------------------------------------------------------------------------
def parse_floats(text: str | None, what: str) -> list[float] | None:
    return _parse_list(text, what, float)


def parse_ints(text: str | None, what: str) -> list[int] | None:
    return _parse_list(text, what, int)


def _parse_list(text: str | None, what: str, cast: Callable[[str], Any]) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        kind = "integers" if cast is int else "numbers"
        raise TicketctlError(f"{what} must be comma-separated {kind}, got {text!r}") from None


__all__ = ["Arch", "Architecture", "Compute", "DataOptions", "Distributed", "NetworkSource",
           "OldSpelling", "Output", "OwnerMarks", "Pack", "Split", "Streaming", "Training",
           "Without", "command", "console", "group", "nested", "option", "parse_floats",
           "parse_ints"]
