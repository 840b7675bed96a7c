"""Where a ticket's network comes from: a built-in, torchvision's or timm's model registry, the
user's own factory function, or nowhere (a ticket imported from weights alone).

A ticket records the source and a fingerprint of the network (parameter and buffer names,
shapes, dtypes and the types of the modules holding them), never code. A file can only choose
among builders ticketctl itself knows (its built-ins, `torchvision:NAME`, `timm:NAME`); a
factory is the user's code and is imported only when the user names it on the command line
(`--model-factory`), after which it stands in for every network of that process."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ticketctl.errors import TicketctlError, first_line

TORCHVISION = "torchvision:"
TIMM = "timm:"
FACTORY = "factory"  # the `arch` of a ticket whose network came from --model-factory
NO_NETWORK = "none"  # the `arch` of a ticket imported without its network
SOURCES = ("builtin", "torchvision", "timm", "factory", "none")


def source_of(arch: str) -> str:
    """The source an `arch` string names (a built-in's name is checked elsewhere)."""
    if arch.startswith(TORCHVISION):
        return "torchvision"
    if arch.startswith(TIMM):
        return "timm"
    if arch in (FACTORY, NO_NETWORK):
        return arch
    return "builtin"


# ---- the user's factory ------------------------------------------------------------------------
@dataclass(frozen=True)
class Factory:
    """A function that builds the user's network, named on the command line."""

    spec: str  # as given: FILE.py:FUNCTION or package.module:FUNCTION
    fn: Callable[..., Any]

    def build(self, num_classes: int, in_channels: int | None = None,
              **args: Any) -> nn.Module:
        """Call the factory with `num_classes` (and `in_channels` and the --arch-arg values,
        where its signature takes them); anything it raises or returns that is not a module
        is one line naming the factory."""
        kwargs = {"num_classes": num_classes, **args}
        if in_channels is not None:
            kwargs["in_channels"] = in_channels
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            params = {}
        if params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            if "num_classes" not in params:
                raise TicketctlError(f"model factory {self.spec} must take a `num_classes` "
                                     "argument")
            unknown = sorted(set(args) - set(params))
            if unknown:
                raise TicketctlError(f"model factory {self.spec} takes no argument "
                                     f"{', '.join(unknown)} (given by --arch-arg or recorded "
                                     "in the ticket)")
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        try:
            model = self.fn(**kwargs)
        except TicketctlError:
            raise
        except Exception as e:
            raise TicketctlError(f"model factory {self.spec} raised {type(e).__name__}: "
                                 f"{first_line(e, 200)}") from None
        if not isinstance(model, nn.Module):
            raise TicketctlError(f"model factory {self.spec} returned {type(model).__name__}, "
                                 "not a torch.nn.Module")
        return model


_SPEC = re.compile(r"(?P<where>.+):(?P<name>[A-Za-z_][A-Za-z0-9_]*)")


def load_factory(spec: str) -> Factory:
    """Import the function `spec` names: `FILE.py:FUNCTION` (a file, run as a module) or
    `package.module:FUNCTION` (from the Python path). This runs the user's code: only ever
    call it with what the user typed, never with text from a file."""
    m = _SPEC.fullmatch(spec.strip())
    if m is None:
        raise TicketctlError(f"--model-factory {spec!r} must be FILE.py:FUNCTION or "
                             "package.module:FUNCTION")
    where, name = m.group("where"), m.group("name")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise TicketctlError(f"--model-factory: no such file {where}")
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        mod_name = f"_ticketctl_factory_{digest}"
        spec_ = importlib.util.spec_from_file_location(mod_name, path)
        if spec_ is None or spec_.loader is None:
            raise TicketctlError(f"--model-factory: cannot import {where}")
        module = importlib.util.module_from_spec(spec_)
        sys.modules[mod_name] = module  # dataclasses and pickling look modules up here
        try:
            spec_.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise TicketctlError(f"--model-factory: importing {where} raised "
                                 f"{type(e).__name__}: {first_line(e, 200)}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise TicketctlError(f"--model-factory: cannot import module {where!r} "
                                 f"({type(e).__name__}: {first_line(e, 200)})") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise TicketctlError(f"--model-factory: {where} has no {name!r}")
    if not callable(fn):
        raise TicketctlError(f"--model-factory: {where}:{name} is a {type(fn).__name__}, not a "
                             "function")
    return Factory(spec, fn)


_FACTORY: Factory | None = None


def use_factory(factory: Factory | None) -> None:
    """The factory the user named for this process (None: none)."""
    global _FACTORY
    _FACTORY = factory


def current_factory() -> Factory | None:
    return _FACTORY


# ---- torchvision and timm ------------------------------------------------------------------------
def _package(name: str, arch: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise TicketctlError(f"the network {arch} (--arch, or a ticket's) needs the {name} "
                             f"package, which is not installed: pip install {name}") from None


# Builder arguments that would load or fetch weights: timm's `checkpoint_path` unpickles a
# file, `pretrained*` and `weights*` download, `cache_dir` and hub ids point at files. A
# ticket file stores its architecture's arguments, so these would let a file name what is
# read; ticketctl's weights come from the ticket itself, so none is needed anywhere.
_LOADING_ARG = re.compile(r"pretrain|checkpoint|weights|cache|file|url|hub|path", re.I)


def build_external(arch: str, num_classes: int, in_channels: int | None = None,
                   **args: Any) -> nn.Module:
    """A torchvision or timm classifier, untrained (weights are never downloaded or read)."""
    loading = sorted(k for k in args if _LOADING_ARG.search(k))
    if loading:
        raise TicketctlError(f"{arch}: refusing the architecture argument(s) "
                             f"{', '.join(loading)}: they load or fetch weights, and a ticket's "
                             "weights come from the ticket file")
    if arch.startswith(TORCHVISION):
        name = arch[len(TORCHVISION):]
        tv = _package("torchvision", arch)
        if name not in tv.models.list_models():
            raise TicketctlError(f"torchvision has no model {name!r} (see "
                                 "torchvision.models.list_models())")
        if in_channels not in (None, 3):
            raise TicketctlError(f"torchvision models take 3 input channels, not {in_channels}")
        build = lambda: tv.models.get_model(name, weights=None, num_classes=num_classes,  # noqa: E731
                                            **args)
    else:
        name = arch[len(TIMM):]
        timm = _package("timm", arch)
        if not timm.is_model(name):
            raise TicketctlError(f"timm has no model {name!r} (see timm.list_models())")
        extra = {"in_chans": in_channels} if in_channels is not None else {}
        build = lambda: timm.create_model(name, pretrained=False, num_classes=num_classes,  # noqa: E731
                                          **extra, **args)
    try:
        return build()
    except TypeError as e:
        raise TicketctlError(f"--arch {arch}: bad --arch-arg ({first_line(e, 200)})") from None


def parse_arch_args(pairs: list[str] | None) -> dict[str, Any]:
    """`--arch-arg KEY=VALUE` values: a VALUE that reads as JSON (a number, true, false) is
    that, anything else a string."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise TicketctlError(f"--arch-arg {pair!r} must be KEY=VALUE (KEY an identifier)")
        if key in ("num_classes", "in_channels", "in_chans"):
            raise TicketctlError(f"--arch-arg {key} is set from the dataset; leave it out")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if not isinstance(value, (int, float, str, bool)):
            value = text
        out[key] = value
    return out


# ---- fingerprints --------------------------------------------------------------------------------
def fingerprint(model: nn.Module) -> str:
    """SHA-256 over the network's state names, shapes and dtypes and the type of each module
    that holds them: two builders that agree on this make interchangeable tickets."""
    owners = {}
    for mod_name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)) or \
                any(True for _ in module.buffers(recurse=False)):
            owners[mod_name] = type(module).__name__
    state = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")]
             for k, v in model.state_dict().items()]
    text = json.dumps({"state": state, "modules": sorted(owners.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class NetworkInfo:
    """What a ticket records of its network (its `network` metadata)."""

    source: str  # one of SOURCES
    fingerprint: str | None = None
    factory: str | None = None  # the --model-factory text it was made with (never imported)
    prunable: str | None = None  # the --prunable pattern that chose its masked weights

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, arch: str) -> NetworkInfo:
        d = d or {}
        return cls(source=d.get("source", source_of(arch)), fingerprint=d.get("fingerprint"),
                   factory=d.get("factory"), prunable=d.get("prunable"))
