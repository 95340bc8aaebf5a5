"""Checkpoints of the built-in tasks: where they are cached, how they are written and read.

A checkpoint is ``torch.save({"arch": ARCH, "state_dict": ...})`` written under a
temporary name and renamed; ``ARCH`` (a string or a dict of plain values) says
which model it holds, and :func:`load_checkpoint` refuses a checkpoint of another one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradindex.errors import ArtifactNotFoundError, StoreMismatchError


def gradindex_home() -> Path:
    return Path(os.environ.get("GRADINDEX_HOME") or Path.home() / ".cache" / "gradindex")  # '' is unset, not "."


def save_checkpoint(model: nn.Module, arch: Any, path: str | Path) -> Path:
    from gradindex.store.feature_store import temporary_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    torch.save({"arch": arch, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(model: nn.Module, path: str | Path, arch: Any, task: str, how_to_train: str) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` (in eval mode), checked to hold an ``arch`` model of ``task``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactNotFoundError(f"no checkpoint at {path}; {how_to_train}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise StoreMismatchError(f"{path} is not a {task} checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(saved, dict) or saved.get("arch") != arch:
        found = saved.get("arch") if isinstance(saved, dict) else type(saved).__name__
        raise StoreMismatchError(f"{path} holds a {found!r} model, the {task} task needs {arch!r}")
    try:
        model.load_state_dict(saved["state_dict"])
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise StoreMismatchError(f"{path} does not fit the {task} model ({first}); train it again") from None
    return model.eval()
