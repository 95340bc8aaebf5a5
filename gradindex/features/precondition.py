"""Query-side preconditioners (DESIGN §1.2). Pure math on arrays; no I/O.

* :class:`GramAccumulator` streams per-group ``Φ_gᵀΦ_g`` over the training
  features (float64) and returns ``G_g = Φ_gᵀΦ_g / N``.
* :func:`inverse` returns ``(G_g + λ_g I)⁻¹`` with ``λ_g = damping · trace(G_g) / k_g``
  (damping relative to the mean eigenvalue, so one default fits every group).
  ``damping`` is one number for every group or a ``{group: number}`` mapping (``--damping auto``
  resolves to one, :mod:`gradindex.weights.damping`).
* :class:`QueryPreconditioner` applies it to query features: ``ψ_g = H_g⁻¹ φ_g``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

import numpy as np
import torch

from gradindex.config import Preconditioner
from gradindex.errors import ConfigError


class GramAccumulator:
    """Running ``Σ φ φᵀ`` per group; groups wider than ``max_dim`` are skipped."""

    def __init__(self, group_dims: Mapping[str, int], max_dim: int):
        self.sums = {g: np.zeros((d, d)) for g, d in group_dims.items() if d <= max_dim}
        self.skipped = sorted(g for g, d in group_dims.items() if d > max_dim)
        self.count = 0

    def update(self, features: Mapping[str, np.ndarray]) -> None:
        rows = None
        for group, total in self.sums.items():
            block = np.asarray(features[group], dtype=np.float64)
            total += block.T @ block
            rows = block.shape[0]
        if rows is None:
            rows = len(next(iter(features.values())))
        self.count += rows

    def add(self, sums: Mapping[str, np.ndarray], rows: int) -> None:
        """Add another accumulator's ``sums`` over ``rows`` examples (a Ray worker's shard)."""
        for group, total in self.sums.items():
            total += sums[group]
        self.count += rows

    def result(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise ConfigError("preconditioner: no training features were seen")
        return {group: total / self.count for group, total in self.sums.items()}


Damping = Union[float, Mapping[str, float]]


def group_damping(damping: Damping, group: str) -> float:
    """The relative damping of ``group``: the number itself, or its entry in a per-group mapping."""
    if isinstance(damping, Mapping):
        if group not in damping:
            raise ConfigError(f"damping: no value for group {group!r} (have {sorted(damping)})")
        return float(damping[group])
    if isinstance(damping, str):
        raise ConfigError(f"damping {damping!r} must be resolved first (gradindex.weights.damping.resolve_damping)")
    return float(damping)


def relative_lambda(gram: np.ndarray, damping: float) -> float:
    """``λ = damping · trace(G) / k`` for a ``[k, k]`` Gram ``G``: the damping relative to its mean
    eigenvalue (the one rule for the query-side inverse and the index's whitening transform)."""
    return damping * float(np.trace(gram)) / gram.shape[0]


def inverse(gram: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    """``((G + λI)⁻¹, λ)`` with ``λ`` from :func:`relative_lambda`; float64. ``damping`` 0: the
    pseudo-inverse ``G⁺`` (eigenvalues below ``k · eps · max eigenvalue`` count as 0)."""
    k = gram.shape[0]
    lam = relative_lambda(gram, damping)
    if lam == 0:
        return np.linalg.pinv(gram, hermitian=True), 0.0
    regularized = gram + lam * np.eye(k)
    try:
        inv_factor = np.linalg.solve(np.linalg.cholesky(regularized), np.eye(k))
        return inv_factor.T @ inv_factor, lam
    except np.linalg.LinAlgError:
        return np.linalg.pinv(regularized, hermitian=True), lam


class QueryPreconditioner:
    """``ψ_g = H_g⁻¹ φ_g`` per group for one setting (identity or damped Gram inverse)."""

    def __init__(self, kind: Preconditioner, grams: Mapping[str, np.ndarray] | None = None,
                 damping: Damping = 0.0, groups: list[str] | None = None):
        self.kind = kind
        self.inverses: dict[str, torch.Tensor] = {}
        self.lambdas: dict[str, float] = {}
        if kind is Preconditioner.GRAM:
            missing = [g for g in (groups or []) if g not in (grams or {})]
            if missing:
                raise ConfigError(
                    f"preconditioner gram: the store has no Gram matrix for groups {missing} (wider than "
                    "gram_max_dim at featurize time); use --preconditioner identity or a smaller --proj-dim"
                )
            for group, gram in (grams or {}).items():
                if groups is not None and group not in groups:
                    continue
                inv, lam = inverse(gram, group_damping(damping, group))
                self.inverses[group] = torch.from_numpy(inv.astype(np.float32))
                self.lambdas[group] = lam

    def __call__(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.kind is Preconditioner.IDENTITY:
            return dict(features)
        return {g: f @ self.inverses[g].to(f.device) for g, f in features.items()}
