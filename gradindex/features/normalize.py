"""Optimizer-aware gradients (LESS, TrackStar): ``g ⊘ (√v̂ + ε)`` before the projection, both sides.

In: a checkpoint file holding Adam/AdamW state, the model's parameter groups. Out:
:func:`make_projector`, the projector featurize and the query side use for a
:class:`~gradindex.config.FeaturizeConfig` (plain :class:`GradientProjector` unless
``normalize="adam"``).

``v̂ = exp_avg_sq / (1 − β₂^step)`` (Adam's bias-corrected second moment), ``ε`` the optimizer's.
The checkpoint (``torch.save`` dict) carries it as ``"optimizer"``: either gradindex's form
``{"exp_avg_sq": {param name: tensor}, "step", "betas", "eps"}`` (built-in tasks write it,
:func:`gradindex.tasks.checkpoints.adam_state`) or a ``torch.optim.Adam(model.parameters()).state_dict()`` (parameters in
``model.named_parameters()`` order). A multi-checkpoint store normalises each checkpoint's block
by that checkpoint's state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradindex.config import FeaturizeConfig, Normalize
from gradindex.errors import ConfigError
from gradindex.features.gradients import GradientProjector, reference_layout
from gradindex.features.groups import Block, ParameterGroup


def second_moments(checkpoint: str | Path, model: nn.Module) -> tuple[dict[str, torch.Tensor], float]:
    """``({param name: v̂}, ε)`` from a checkpoint file (see the module docstring)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True) if checkpoint else None
    state = saved.get("optimizer") if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"--normalize adam: checkpoint {checkpoint} carries no optimizer state (\"optimizer\": "
                          "exp_avg_sq); save it with the model (built-in tasks do)")
    if "exp_avg_sq" in state:
        moments, step, beta2, eps = state["exp_avg_sq"], state["step"], state["betas"][1], state["eps"]
    else:  # a torch optimizer state_dict: parameters numbered in model.parameters() order
        names = [n for n, _ in model.named_parameters()]
        try:
            group = state["param_groups"][0]
            moments = {names[i]: s["exp_avg_sq"] for i, s in state["state"].items()}
            step = int(next(iter(state["state"].values()))["step"])
            beta2, eps = group["betas"][1], group["eps"]
        except (KeyError, IndexError, StopIteration, TypeError) as err:
            raise ConfigError(f"--normalize adam: checkpoint {checkpoint}: no Adam exp_avg_sq in its optimizer "
                              f"state ({type(err).__name__})") from None
    if step <= 0:
        raise ConfigError(f"--normalize adam: checkpoint {checkpoint}: the optimizer took no step")
    correction = 1.0 - float(beta2) ** int(step)
    return {name: v.double() / correction for name, v in moments.items()}, float(eps)


class AdamScaling:
    """The transform ``g ⊘ (√v̂ + ε)`` of each part's full gradients ``[B, numel]`` (reference layout)."""

    def __init__(self, model: nn.Module, groups: Sequence[ParameterGroup], moments: Mapping[str, torch.Tensor],
                 eps: Mapping[str, float] | float, device: torch.device):
        self.scales: dict[str, torch.Tensor] = {}
        for group in groups:
            for block in group.blocks:
                key = f"{group.name}/{block.tie or block.module}"
                if key in self.scales:
                    continue
                names = block.param_names()
                missing = [n for n in names if n not in moments]
                if missing:
                    raise ConfigError(f"--normalize adam: the optimizer state has no exp_avg_sq for {missing}")
                e = eps if isinstance(eps, float) else eps[names[0]]
                layout = reference_layout(block.kind, block.params, [moments[n] for n in names])
                self.scales[key] = (1.0 / (layout.sqrt() + e)).to(device)

    def __call__(self, key: str, block: Block, grads: torch.Tensor) -> torch.Tensor:
        return grads.double() * self.scales[key]


def checkpoint_moments(task: Any, model: nn.Module, checkpoint: str | Path | None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Second moments and ε keyed by the parameter names of ``model`` (a multi-checkpoint model's
    ``c<i>.`` names from each of its checkpoints)."""
    from gradindex.features.checkpoints import CheckpointEnsemble

    if isinstance(task, CheckpointEnsemble):
        moments, eps = {}, {}
        for i, path in enumerate(task.checkpoints):
            m, e = second_moments(path, model[f"c{i}"])
            moments.update({f"c{i}.{n}": v for n, v in m.items()})
            eps.update({f"c{i}.{n}": e for n in m})
        return moments, eps
    if checkpoint is None:
        raise ConfigError("--normalize adam: give the checkpoint (--checkpoint) whose optimizer state to use")
    m, e = second_moments(checkpoint, model)
    return m, {n: e for n in m}


def make_projector(task: Any, model: nn.Module, groups: Sequence[ParameterGroup], config: FeaturizeConfig,
                   checkpoint: str | Path | None, device: torch.device):
    """The projector of ``config``: :class:`GradientProjector`, or Adam-normalised full gradients projected
    with the same matrices."""
    if config.normalize is Normalize.NONE:
        return GradientProjector(model, groups, config.projection, device)
    from gradindex.features.transformed import TransformedProjector

    moments, eps = checkpoint_moments(task, model, checkpoint)
    scaling = AdamScaling(model, groups, moments, eps, device)
    return TransformedProjector(model, groups, config.projection, [scaling], device)
