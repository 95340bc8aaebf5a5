"""Torch device strings → a checked :class:`torch.device`.

In: a device string already syntax-checked by :func:`gradindex.config.parse_device`
(``cpu``, ``cuda``, ``cuda:1``, ``mps``, ``auto``). Out: the ``torch.device`` to run on,
or a one-line :class:`~gradindex.errors.ConfigError` when this machine has no such
device (``--device cuda`` on a CPU-only machine or torch build).
"""

from __future__ import annotations

import torch

from gradindex.config import parse_device
from gradindex.errors import ConfigError


def resolve_device(device: str | torch.device, field_name: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` that exists here; ``auto`` is ``cuda`` when present, else ``cpu``."""
    if isinstance(device, torch.device):
        device = str(device)
    device = parse_device(device, field_name, allow_auto=True)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{field_name} {device!r}: this machine has no CUDA device (or torch was built "
                              "without CUDA); use --device cpu")
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"{field_name} {device!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0..cuda:{count - 1}")
    elif resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{field_name} {device!r}: Apple's MPS is not available here; use --device cpu")
    elif resolved.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ConfigError(f"{field_name} {device!r}: no Intel XPU is available here; use --device cpu")
    return resolved
