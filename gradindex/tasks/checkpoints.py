"""Checkpoints of the built-in tasks: where they are cached, how they are written and read.

A checkpoint is ``torch.save({"arch": ARCH, "state_dict": ...})`` written under a
temporary name and renamed; ``ARCH`` (a string or a dict of plain values) says
which model it holds, and :func:`load_checkpoint` refuses a checkpoint of another one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradindex.config import gradindex_home  # noqa: F401 (re-exported: the built-in tasks' cache)
from gradindex.errors import ArtifactNotFoundError, StoreMismatchError

logger = logging.getLogger(__name__)


def save_checkpoint(model: nn.Module, arch: Any, path: str | Path, extra: dict | None = None) -> Path:
    """``extra``: more entries of the saved dict (``"optimizer"``: :func:`adam_state`)."""
    from gradindex.store.feature_store import temporary_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    torch.save({"arch": arch, "state_dict": model.state_dict(), **(extra or {})}, tmp)
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


def load_or_train(task: Any, checkpoint: str | Path | None, build: Callable[[], nn.Module], arch: Any, name: str,
                  how_to_train: str, what: str | None = None) -> nn.Module:
    """A built-in task's ``load_model``: the model in ``checkpoint``, or (``None``) in the task's
    ``default_checkpoint()``, trained there with ``task.train(path)`` on first use.

    ``build()`` makes the empty model (called after any training), ``arch``/``name``/``how_to_train``
    go to :func:`load_checkpoint`; ``what`` names the model in the first-use log line.
    """
    if checkpoint is None:
        checkpoint = task.default_checkpoint()
        if not checkpoint.is_file():
            logger.info("training the %s (first use) -> %s", what or f"{name} task's model", checkpoint)
            task.train(checkpoint)
    return load_checkpoint(build(), checkpoint, arch, name, how_to_train)


def adam_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """An Adam/AdamW optimizer's second moments keyed by parameter name, with step, betas and eps
    (the form :mod:`gradindex.features.normalize` reads)."""
    names = {id(p): n for n, p in model.named_parameters()}
    group = optimizer.param_groups[0]
    moments, step = {}, 0
    for p, state in optimizer.state.items():
        if "exp_avg_sq" in state and id(p) in names:
            moments[names[id(p)]] = state["exp_avg_sq"].detach().clone()
            step = int(state["step"])
    return {"exp_avg_sq": moments, "step": step, "betas": [float(b) for b in group["betas"]],
            "eps": float(group["eps"])}


class CheckpointKeeper:
    """``on_epoch(epoch, model, optimizer)`` callback keeping ``keep`` evenly spaced checkpoints (the last
    epoch included) in ``<path>.run/``, with their learning rate (the optimizer's at that epoch's end, e.g. under a
    one-cycle schedule) and Adam state, listed in its checkpoints.json."""

    def __init__(self, path: str | Path, arch: Any, keep: int, epochs: int):
        if keep < 0 or keep > epochs:
            from gradindex.errors import ConfigError

            raise ConfigError(f"keep_checkpoints: expected 0..{epochs}, got {keep}")
        self.run_dir = Path(path).with_name(Path(path).name + ".run")
        self.arch = arch
        self.epochs = {round(epochs * (i + 1) / keep) for i in range(keep)} if keep else set()
        self.entries: list[dict[str, Any]] = []

    def __call__(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if epoch not in self.epochs:
            return
        from gradindex.features.checkpoints import write_run_index

        name = f"epoch-{epoch:04d}.pt"
        save_checkpoint(model, self.arch, self.run_dir / name, extra={"optimizer": adam_state(optimizer, model)})
        self.entries.append({"file": name, "lr": optimizer.param_groups[0]["lr"], "step": epoch})
        write_run_index(self.run_dir, self.entries)
