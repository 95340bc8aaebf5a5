"""Checks of single values, shared by every config and command: one-line ``ConfigError`` s naming the field.

Numbers (:func:`require_number`, :func:`require_positive`, :func:`require_at_most`), names that never leave
their folder (:func:`check_name`), enum members (:func:`parse_enum`), torch device strings
(:func:`parse_device`) and the widest vector FAISS can index (:func:`check_index_dim`). No torch, no numpy.
:mod:`gradindex.config` re-exports them.
"""

from __future__ import annotations

import enum
import math
import numbers
import re
from typing import Any

from gradindex.errors import ConfigError


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+@-]{0,99}")

def check_name(value: Any, field_name: str) -> str:
    """``value`` if it is a safe name (a letter or digit, then letters, digits, ``_ . + @ -``; at most
    100 characters), else a one-line ``ConfigError``: such a name never leaves its parent folder."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{field_name}: expected a name of letters, digits and _ . + @ - starting with a letter or digit "
            f"(at most 100 characters), got {value!r}"
        )
    return value


#: Widest vector FAISS reads back: ``read_index`` refuses d > 2^20 (faiss/impl/index_read.cpp; checked
#: with faiss 1.15: d = 2^20 reads back, 2^20 + 1 does not), so a wider store could be built but never queried.
MAX_INDEX_DIM = 1 << 20


def check_index_dim(dim: int, where: str) -> None:
    """A one-line error when a store of dimension ``dim`` could not be indexed (see :data:`MAX_INDEX_DIM`)."""
    if dim > MAX_INDEX_DIM:
        raise ConfigError(
            f"{where}: the features would have {dim:,} dimensions, more than the {MAX_INDEX_DIM:,} (2^20) a FAISS "
            "index can hold and read back; project them (--proj-kind gaussian --proj-dim 256, or --group-dim "
            "for the widest groups) instead of --proj-kind identity"
        )


def parse_enum(enum_type: type[enum.Enum], value: Any, field_name: str) -> enum.Enum:
    """Turn a string (or an Enum member) into ``enum_type``, naming ``field_name`` on error."""
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(member.value for member in enum_type)
        raise ConfigError(f"{field_name}: expected one of {choices}, got {value!r}") from None

def require_positive(value: Any, field_name: str, numpy_ok: bool = False, maximum: int | None = None) -> None:
    """One-line ``ConfigError`` unless ``value`` is a positive ``int`` (never a bool; with
    ``numpy_ok`` numpy integers pass too, e.g. a ``k`` computed from array shapes), at most ``maximum``."""
    kind = numbers.Integral if numpy_ok else int
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ConfigError(f"{field_name}: expected a positive integer, got {value!r}")
    require_at_most(value, maximum, field_name)


def require_at_most(value: Any, maximum: int | None, field_name: str) -> None:
    """One-line ``ConfigError`` when an integer knob exceeds what the stage can honour (memory, FAISS's C ints)."""
    if maximum is not None and value > maximum:
        raise ConfigError(f"{field_name}: expected at most {maximum:,}, got {value!r}")

def require_number(value: Any, field_name: str, minimum: float | None = None, maximum: float | None = None,
                   above: float | None = None, below: float | None = None) -> float:
    """``value`` as a finite ``float``, or a one-line ``ConfigError`` naming ``field_name``.

    ``minimum``/``maximum`` are inclusive bounds, ``above``/``below`` exclusive ones. Bools,
    strings, NaN and ±inf are refused everywhere.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    ok = ok and (above is None or value > above) and (below is None or value < below)
    if not ok:
        bounds = [f">= {minimum:g}" if minimum is not None else "", f"> {above:g}" if above is not None else "",
                  f"<= {maximum:g}" if maximum is not None else "", f"< {below:g}" if below is not None else ""]
        wanted = " and ".join(b for b in bounds if b)
        raise ConfigError(f"{field_name}: expected a finite number{' ' + wanted if wanted else ''}, got {value!r}")
    return float(value)

#: Torch device types a ``--device`` may name (``TYPE`` or ``TYPE:INDEX``).
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def parse_device(value: Any, field_name: str = "device", allow_auto: bool = False) -> str:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``; ``auto`` where allowed),
    checked for its syntax only; :func:`gradindex.devices.resolve_device` checks that it exists."""
    kinds = "|".join(DEVICE_TYPES)
    if isinstance(value, str) and (re.fullmatch(rf"(?:{kinds})(?::\d{{1,4}})?", value)
                                   or (allow_auto and value == "auto")):
        return value
    choices = ", ".join([*DEVICE_TYPES, "cuda:N", *(["auto"] if allow_auto else [])])
    raise ConfigError(f"{field_name}: expected a torch device ({choices}), got {value!r}")


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters (a one-line error never echoes a megabyte)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
