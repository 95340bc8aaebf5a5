"""Label-free choice of the Gram damping (DESIGN §1.2): ``--damping auto``.

In: a store's training features (one streamed pass over its shards). Out: a relative damping
per group, ``{group: ρ_g}`` with ``λ_g = ρ_g · trace(G_g) / k_g`` (the convention of
:mod:`gradindex.features.precondition`). No query, label or retrained model is looked at.

Criteria (:class:`~gradindex.config.DampingCriterion`; docs/benchmarks/quality.md says which
one measured best and is the default):

* ``cv-likelihood``: per group, the relative damping on :data:`DAMPING_GRID` that maximises the
  K-fold cross-validated Gaussian log-likelihood of held-out training features under
  ``N(0, G_train + λI)`` — the label-free estimate of the best covariance shrinkage;
* ``cv-shared``: one relative damping for every group, maximising the sum of the groups'
  cross-validated log-likelihoods (the block-diagonal model's);
* ``ledoit-wolf``: the Ledoit–Wolf shrinkage ``ρ`` of the (uncentred) second-moment matrix towards
  ``μI``, ``μ = trace(G)/k``, as a relative damping ``ρ / (1 − ρ)``;
* ``oas``: the same with the oracle-approximating shrinkage (Chen et al. 2010) ``ρ``.

The statistics (:class:`FoldStatistics`: per group and fold ``Σ φφᵀ`` and ``Σ ‖φ‖⁴``) come from one
pass; the choice is cached in the manifest (``damping_auto``, keyed by the shards' checksums and the
criterion) so that ``learn-weights`` and ``build-index`` agree and a second call reads it back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np

from gradindex.config import AUTO_DAMPING, DampingCriterion, Preconditioner
from gradindex.errors import ConfigError
from gradindex.store.feature_store import FeatureStore

#: relative dampings considered by the cross-validated likelihood (ρ_g = λ_g / mean eigenvalue)
DAMPING_GRID = tuple(float(v) for v in np.logspace(-3, 2, 26))
#: folds of the cross-validated likelihood (rows are assigned round-robin in store order)
FOLDS = 5


class FoldStatistics:
    """Per group: ``sums [K, k, k]`` (``Σ φφᵀ`` over each fold's rows), ``counts [K]`` and
    ``fourth`` (``Σ ‖φ‖⁴`` over all rows), accumulated from ``{group: [n, k_g]}`` blocks."""

    def __init__(self, group_dims: Mapping[str, int], folds: int = FOLDS):
        self.folds = folds
        self.sums = {g: np.zeros((folds, d, d)) for g, d in group_dims.items()}
        self.fourth = {g: 0.0 for g in group_dims}
        self.counts = np.zeros(folds, dtype=np.int64)
        self.rows = 0

    def update(self, features: Mapping[str, np.ndarray]) -> None:
        n = len(next(iter(features.values())))
        fold = (self.rows + np.arange(n)) % self.folds
        for group, total in self.sums.items():
            block = np.asarray(features[group], dtype=np.float64)
            for f in range(self.folds):
                rows = block[fold == f]
                total[f] += rows.T @ rows
            self.fourth[group] += float(((block * block).sum(1) ** 2).sum())
        self.counts += np.bincount(fold, minlength=self.folds)
        self.rows += n

    @classmethod
    def of_store(cls, store: FeatureStore, folds: int = FOLDS) -> "FoldStatistics":
        stats = cls(store.group_dims, folds)
        for _, feats, _ in store.iter_shards(store.groups):
            stats.update(feats)
        return stats

    def gram(self, group: str) -> np.ndarray:
        """``G_g = Σ φφᵀ / N`` over all rows ``[k, k]``."""
        return self.sums[group].sum(0) / max(self.rows, 1)


def cv_log_likelihood(sums: np.ndarray, counts: np.ndarray, grid: tuple[float, ...] = DAMPING_GRID) -> np.ndarray:
    """Mean held-out Gaussian log-likelihood per row (up to a constant) for each relative damping
    of ``grid``: ``[len(grid)]``. ``sums [K, k, k]`` and ``counts [K]`` are one group's fold sums.

    Fold ``f`` is scored under ``N(0, G₋f + ρ·μ₋f·I)`` with ``G₋f`` the other folds' second moment
    and ``μ₋f = trace(G₋f)/k``: ``−½ (log det(G₋f + λI) + trace((G₋f + λI)⁻¹ S_f))``, ``S_f`` the
    fold's own second moment.
    """
    grid = np.asarray(grid, dtype=np.float64)
    total, rows = sums.sum(0), counts.sum()
    k = sums.shape[1]
    out = np.zeros(len(grid))
    for f in range(len(counts)):
        if counts[f] == 0 or rows - counts[f] == 0:
            continue
        train = (total - sums[f]) / (rows - counts[f])
        held = sums[f] / counts[f]
        values, vectors = np.linalg.eigh(train)
        values = np.clip(values, 0.0, None)
        mean = max(float(values.sum()) / k, np.finfo(float).tiny)
        held_diag = np.einsum("ij,ik,kj->j", vectors, held, vectors)  # diag(Vᵀ S_f V)
        lam = grid[:, None] * mean
        out += counts[f] * -0.5 * (np.log(values[None, :] + lam).sum(1) + (held_diag[None, :] / (values[None, :] + lam)).sum(1))
    return out / max(rows, 1)


def ledoit_wolf_shrinkage(gram: np.ndarray, fourth: float, rows: int) -> float:
    """Ledoit–Wolf ``ρ ∈ [0, 1]`` of the uncentred second moment ``gram [k, k]`` (``Σ‖φ‖⁴ = fourth``
    over ``rows`` examples) towards ``μI``, ``μ = trace/k``."""
    k = gram.shape[0]
    mean = float(np.trace(gram)) / k
    frob = float((gram * gram).sum())
    delta = frob - 2 * mean * float(np.trace(gram)) + mean * mean * k  # ‖G − μI‖²_F
    if rows == 0 or delta <= 0:
        return 1.0
    beta = max(fourth / rows - frob, 0.0) / rows  # (1/n²) Σ ‖φφᵀ − G‖²_F
    return float(min(beta, delta) / delta)


def oas_shrinkage(gram: np.ndarray, rows: int) -> float:
    """Oracle-approximating shrinkage ``ρ ∈ [0, 1]`` (Chen, Wiesel, Eldar, Hero 2010, eq. 23 without
    its 2/k terms, as scikit-learn computes it) of ``gram [k, k]`` from ``rows`` examples."""
    k = gram.shape[0]
    trace, trace_sq = float(np.trace(gram)), float((gram * gram).sum())
    denominator = (rows + 1) * (trace_sq - trace * trace / k)
    if denominator <= 0:
        return 1.0
    return float(min(1.0, (trace_sq + trace * trace) / denominator))


def relative_damping(shrinkage: float, ceiling: float = DAMPING_GRID[-1]) -> float:
    """Shrinkage ``ρ`` of ``(1 − ρ)G + ρμI`` as a relative damping ``ρ / (1 − ρ)`` (at most ``ceiling``)."""
    return float(min(shrinkage / max(1.0 - shrinkage, 1e-12), ceiling))


def choose_damping(stats: FoldStatistics, criterion: DampingCriterion) -> dict[str, float]:
    """``{group: relative damping}`` by ``criterion`` from one pass's statistics."""
    if criterion is DampingCriterion.CV_SHARED:
        total = sum(cv_log_likelihood(sums, stats.counts) for sums in stats.sums.values())
        return {group: DAMPING_GRID[int(np.argmax(total))] for group in stats.sums}
    out = {}
    for group, sums in stats.sums.items():
        if criterion is DampingCriterion.CV_LIKELIHOOD:
            out[group] = DAMPING_GRID[int(np.argmax(cv_log_likelihood(sums, stats.counts)))]
        elif criterion is DampingCriterion.LEDOIT_WOLF:
            out[group] = relative_damping(ledoit_wolf_shrinkage(stats.gram(group), stats.fourth[group], stats.rows))
        elif criterion is DampingCriterion.OAS:
            out[group] = relative_damping(oas_shrinkage(stats.gram(group), stats.rows))
        else:
            raise ConfigError(f"damping criterion {criterion!r} is not a store-only criterion")
    return out


def store_key(store: FeatureStore) -> str:
    """A hash of the store's shard checksums and groups: the label-free damping's cache key."""
    shards = [s.get("sha256", s.get("file")) for s in store.manifest["shards"]]
    return hashlib.sha256(json.dumps([shards, store.groups]).encode()).hexdigest()[:16]


def auto_damping(store: FeatureStore, criterion: DampingCriterion, save: bool = True) -> dict[str, float]:
    """The store's label-free damping per group, from the manifest's cache or one pass (then cached)."""
    key = store_key(store)
    cached = store.manifest.get("damping_auto", {}).get(criterion.value)
    if cached and cached.get("store") == key:
        return {g: float(v) for g, v in cached["damping"].items()}
    missing = [g for g in store.groups if g not in store.read_gram()]
    if missing:
        raise ConfigError(f"--damping auto: the store has no Gram matrix for groups {missing} (wider than "
                          "gram_max_dim at featurize time); give a number or use --preconditioner identity")
    damping = choose_damping(FoldStatistics.of_store(store), criterion)
    if save:
        entries = dict(store.manifest.get("damping_auto", {}))
        entries[criterion.value] = {"store": key, "damping": damping}
        store.update_manifest({"damping_auto": entries})
    return damping


#: the criterion ``damping="auto"`` uses (docs/benchmarks/quality.md)
DEFAULT_CRITERION = DampingCriterion.CV_SHARED


def resolve_damping(store: FeatureStore, damping: "float | str | Mapping[str, float]",
                    preconditioner: Preconditioner = Preconditioner.GRAM,
                    criterion: DampingCriterion = DEFAULT_CRITERION) -> "float | dict[str, float]":
    """``damping`` as the preconditioner will use it: ``"auto"`` under the Gram preconditioner becomes
    the store's label-free ``{group: relative damping}``; anything else is returned as it is."""
    if damping != AUTO_DAMPING:
        return damping
    if preconditioner is not Preconditioner.GRAM:
        return damping
    return auto_damping(store, criterion)
