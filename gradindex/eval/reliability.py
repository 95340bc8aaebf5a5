"""How far LDS can be trusted: the ceiling the ground truth's own noise implies, and error bars
that include the retrained models.

* :func:`split_half_reliability` — per query, the split-half reliability of the measurement
  averaged over ``R`` training runs per subset, Spearman–Brown corrected to all ``R`` runs:
  in ``runs [R, M, Q]``, out ``[Q]``. :func:`lds_ceiling` turns it into the ceiling
  ``√reliability`` (the attenuation bound: an estimator that predicted the runs' common
  signal exactly would correlate about this much with the noisy average).
* :func:`bootstrap_lds` — a two-way bootstrap over retrained models (rows of ``[M, Q]``) *and*
  queries (columns): in predictions ``[E, M, Q]`` of ``E`` estimators and measurements ``[M, Q]``,
  out the LDS of every estimator in every replicate ``[B, E]``, the same resampled models and
  queries for all estimators (so differences are paired). :func:`bootstrap_se` and
  :func:`paired_se` read standard errors off it.

Why both: every query's Spearman uses the same ``M`` models, so per-query errors are correlated
and a standard error over queries alone misses the models' share of the variance. Resampling
both ways at once is conservative for crossed designs (Owen 2007, "The pigeonhole bootstrap": the
interaction term is counted up to three times), never optimistic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradindex.config import require_positive
from gradindex.errors import ConfigError

#: bootstrap replicates of ``eval lds`` and the suite tables
REPLICATES = 200
#: random half-splits averaged by :func:`split_half_reliability`
SPLITS = 16


def _centred_ranks(values: np.ndarray) -> np.ndarray:
    """Column-wise average ranks of ``[M, Q]``, centred and scaled to unit norm (0 for a constant column)."""
    from scipy.stats import rankdata

    ranks = rankdata(values, axis=0)
    ranks -= ranks.mean(0)
    norm = np.sqrt((ranks * ranks).sum(0))
    return np.divide(ranks, norm, out=np.zeros_like(ranks), where=norm > 0)


def split_half_reliability(runs: np.ndarray, splits: int = SPLITS, seed: int = 0) -> np.ndarray:
    """Per-query reliability ``[Q]`` of the run-averaged measurement, from ``runs [R, M, Q]`` (``R ≥ 2``).

    For each of ``splits`` seeded random splits the runs are dealt into two disjoint halves of
    ``h = ⌊R/2⌋`` runs (one run left out when ``R`` is odd); ``r`` is the Spearman correlation over
    the ``M`` models of the two halves' means, averaged over the splits. The Spearman–Brown formula
    steps it up from ``h`` runs to ``R``: ``ρ = n·r / (1 + (n − 1)·r)`` with ``n = R / h``.
    """
    runs = np.asarray(runs, dtype=np.float64)
    if runs.ndim != 3 or runs.shape[0] < 2:
        raise ConfigError(f"split-half reliability: expected runs [R >= 2, M, Q], got shape {runs.shape}")
    count, half = runs.shape[0], runs.shape[0] // 2
    rng = np.random.default_rng(seed)
    orders = [np.arange(count)] if count == 2 else [rng.permutation(count) for _ in range(splits)]
    r = np.mean([(_centred_ranks(runs[o[:half]].mean(0)) * _centred_ranks(runs[o[half:2 * half]].mean(0))).sum(0)
                 for o in orders], axis=0)
    n = count / half
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = n * r / (1 + (n - 1) * r)
    return np.where(np.isfinite(rho), rho, 0.0)


def lds_ceiling(runs: np.ndarray | None) -> tuple[float, float] | None:
    """``(mean reliability, ceiling)`` over queries of ``runs [R, M, Q]``; the ceiling is the mean over
    queries of ``√clip(ρ_q, 0, 1)``. ``None`` for a single run (nothing to split)."""
    if runs is None or len(runs) < 2:
        return None
    rho = split_half_reliability(runs)
    return float(rho.mean()), float(np.sqrt(np.clip(rho, 0.0, 1.0)).mean())


def bootstrap_lds(predictions: Sequence[np.ndarray], measurements: np.ndarray, replicates: int = REPLICATES,
                  seed: int = 0) -> np.ndarray:
    """LDS of each estimator in each two-way bootstrap replicate: ``[replicates, E]``.

    ``predictions``: ``E`` arrays ``[M, Q]``; ``measurements [M, Q]``. Replicate ``b`` draws ``M``
    models and ``Q`` queries with replacement (seeded) and takes every estimator's mean Spearman
    over the drawn queries on the drawn models.
    """
    require_positive(replicates, "bootstrap replicates")
    measurements = np.asarray(measurements, dtype=np.float64)
    stacked = [np.asarray(p, dtype=np.float64) for p in predictions]
    if any(p.shape != measurements.shape for p in stacked) or measurements.ndim != 2:
        raise ConfigError(f"bootstrap: expected predictions and measurements of one [M, Q] shape, got "
                          f"{[p.shape for p in stacked]} and {measurements.shape}")
    models, queries = measurements.shape
    rng = np.random.default_rng(seed)
    out = np.zeros((replicates, len(stacked)))
    for b in range(replicates):
        rows, columns = rng.integers(0, models, models), rng.integers(0, queries, queries)
        target = _centred_ranks(measurements[np.ix_(rows, columns)])
        for e, p in enumerate(stacked):
            out[b, e] = (_centred_ranks(p[np.ix_(rows, columns)]) * target).sum(0).mean()
    return out


def bootstrap_se(replicates: np.ndarray) -> np.ndarray:
    """Standard error of each estimator's LDS ``[E]`` from :func:`bootstrap_lds`'s ``[B, E]``."""
    return np.asarray(replicates).std(axis=0, ddof=1)


def paired_se(replicates: np.ndarray, a: int, b: int) -> float:
    """Standard error of ``LDS_a − LDS_b`` (the same models and queries in every replicate)."""
    replicates = np.asarray(replicates)
    return float((replicates[:, a] - replicates[:, b]).std(ddof=1))
