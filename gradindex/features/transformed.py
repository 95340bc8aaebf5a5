"""Projected gradients of linearly transformed full per-example gradients: ``φ_g = P_g T(∇f)``.

In: a model, its groups, the store's projection and transforms ``T(key, block, grads [B, numel]) ->
[B, numel]`` applied in order to each feature part's full gradient (reference layout,
:func:`~gradindex.features.gradients.reference_layout`). Out: ``{group: [B, k_g]}``, the *same* seeded
projection as :class:`~gradindex.features.gradients.GradientProjector`'s. Used for the K-FAC /
EK-FAC inverse on the query side (:mod:`gradindex.features.kfac`) and Adam normalisation on both
sides (:mod:`gradindex.features.normalize`). It forms full per-example gradients: memory ``B · Σ numel``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gradindex.config import ProjectionConfig
from gradindex.features.gradients import GradientProjector
from gradindex.features.groups import ParameterGroup
from gradindex.features.kfac import FactorInverse, full_gradient_projector, group_parts, split_parts

Transform = Callable[[str, Any, torch.Tensor], torch.Tensor]


class TransformedProjector:
    """Callable like :class:`GradientProjector` (context manager, ``projectors``, ``group_dims``)."""

    def __init__(self, model: nn.Module, groups: Sequence[ParameterGroup], projection: ProjectionConfig,
                 transforms: Sequence[Transform], device: torch.device):
        self.full = full_gradient_projector(model, groups, device)
        self.transforms = list(transforms)
        self.parts = group_parts(groups)
        # the stored projection's block projectors (its hooks stay idle: only ``full`` records)
        self.stored = GradientProjector(model, groups, projection, device)
        self.projectors = self.stored.projectors
        owners = {}
        for group in groups:
            for block, bp in zip(group.blocks, self.projectors[group.name]):
                owners.setdefault(f"{group.name}/{block.tie or block.module}", bp)
        self._by_key = owners

    def group_dims(self) -> dict[str, int]:
        return self.stored.group_dims()

    def __call__(self, compute: Callable[[], torch.Tensor], verify: bool = False) -> dict[str, torch.Tensor]:
        pieces = split_parts(self.full(compute, verify=verify), self.parts)
        out = {}
        for group, keyed in self.parts:
            blocks = []
            for key, block in keyed:
                grads = pieces[key]
                for transform in self.transforms:
                    grads = transform(key, block, grads)
                blocks.append(self._by_key[key].project_gradient(grads.float()))
            out[group] = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        return out

    def close(self) -> None:
        self.full.close()
        self.stored.close()

    def __enter__(self) -> "TransformedProjector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def factor_query_projector(model: nn.Module, groups: Sequence[ParameterGroup], projection: ProjectionConfig,
                         inverse: FactorInverse, device: torch.device):
    """Callable like :class:`GradientProjector`: ``compute -> {group: [B, k_g]}`` with
    ``φ_g = P_g H⁻¹ ∇f`` (full gradient, factor inverse, then the store's seeded projection)."""
    return TransformedProjector(model, groups, projection, [inverse], device)
