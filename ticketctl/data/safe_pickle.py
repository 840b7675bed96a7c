"""Read pickles (such as the CIFAR python batches) without running arbitrary code.

Plain ``pickle.load`` will call any global a file names, so a crafted "dataset" could run
commands. ``RestrictedUnpickler`` only resolves the handful of globals numpy needs to rebuild
arrays and scalars; any other global raises ``TicketctlError`` before it is ever looked up.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ticketctl.errors import TicketctlError

__all__ = ["RestrictedUnpickler", "safe_load", "safe_loads"]


def _numpy_core(submodule: str, name: str) -> Callable[[], Any]:
    """Resolve ``numpy._core.<sub>.<name>`` (numpy 2) or ``numpy.core.<sub>.<name>`` (numpy 1)."""

    def resolve() -> Any:
        for prefix in ("numpy._core", "numpy.core"):
            try:
                module = importlib.import_module(f"{prefix}.{submodule}")
                return getattr(module, name)
            except (ImportError, AttributeError):
                continue
        raise TicketctlError(f"this numpy has no {submodule}.{name}; cannot read the pickle")

    return resolve


def _attr(module: str, name: str) -> Callable[[], Any]:
    return lambda: getattr(importlib.import_module(module), name)


class _NdarrayName:
    """What `numpy.ndarray` in a data file resolves to. numpy's own pickles name the class
    only as `_reconstruct`'s first argument; called directly, `ndarray(shape, dtype,
    buffer)` would lay an array over the file's bytes, and with an object dtype those bytes
    become pointers (reading the array crashes the process, or worse)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TicketctlError("a data file calls numpy.ndarray directly, which numpy's own "
                             "pickles never do; refusing to build an array over its bytes")


_NDARRAY = _NdarrayName()


def _reconstruct() -> Callable[..., Any]:
    """numpy's `_reconstruct`, for plain arrays only: it must be handed `numpy.ndarray` as
    read from the file (an empty array, filled by its pickled state afterwards)."""
    import numpy as np

    real = _numpy_core("multiarray", "_reconstruct")()

    def rebuild(subtype: Any, shape: Any, dtype: Any) -> Any:
        if subtype is not _NDARRAY:
            raise TicketctlError("a data file rebuilds an array of another type than "
                                 "numpy.ndarray; refusing it")
        return real(np.ndarray, shape, dtype)

    return rebuild


# (module, name) as written in the pickle -> resolver. Both numpy 1 ("numpy.core") and
# numpy 2 ("numpy._core") spellings are accepted and map to whatever this numpy provides.
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: _NDARRAY,
    ("numpy", "dtype"): _attr("numpy", "dtype"),
    ("_codecs", "encode"): _attr("_codecs", "encode"),
}
for _prefix in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_prefix}.multiarray", "_reconstruct")] = _reconstruct
    _ALLOWED[(f"{_prefix}.multiarray", "scalar")] = _numpy_core("multiarray", "scalar")
    _ALLOWED[(f"{_prefix}.numeric", "_frombuffer")] = _numpy_core("numeric", "_frombuffer")


# What a truncated or corrupt pickle can raise while loading.
_CORRUPT = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    ImportError,
    UnicodeDecodeError,
    MemoryError,
    OverflowError,
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` allows only numpy's array-rebuilding globals."""

    def find_class(self, module: str, name: str) -> Any:
        resolver = _ALLOWED.get((module, name))
        if resolver is None:
            raise TicketctlError(
                f"refusing to unpickle the global {module}.{name}: only numpy arrays, lists, "
                "dicts, numbers and strings are allowed in data files; is this really a data file?"
            )
        return resolver()


def safe_loads(data: bytes, *, encoding: str = "bytes") -> Any:
    """Unpickle ``data`` with ``RestrictedUnpickler``; see ``safe_load``."""
    return safe_load(io.BytesIO(data), encoding=encoding)


def safe_load(source: str | Path | BinaryIO, *, encoding: str = "bytes") -> Any:
    """Unpickle a file (path or binary file object) allowing only numpy array globals.

    ``encoding="bytes"`` lets python-2 pickles (the original CIFAR release) load: their
    ``str`` objects, dict keys included, come back as ``bytes``. Python-3 pickles are unaffected.
    Any failure to parse becomes a ``TicketctlError`` naming the file.
    """
    label = str(source) if isinstance(source, (str, Path)) else getattr(source, "name", "<data>")
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as handle:
                return RestrictedUnpickler(handle, encoding=encoding).load()
        return RestrictedUnpickler(source, encoding=encoding).load()
    except TicketctlError as exc:
        raise TicketctlError(f"{label}: {exc}") from None
    except OSError as exc:
        raise TicketctlError(f"cannot read {label}: {exc.strerror or exc}") from None
    except _CORRUPT as exc:
        raise TicketctlError(
            f"{label} is not a readable pickle ({type(exc).__name__}: {exc}); "
            "re-create the data files"
        ) from None
