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
    """``damping`` as the preconditioner will use it: a name of :data:`~gradindex.config.NAMED_DAMPINGS`
    under the Gram preconditioner becomes the store's label-free ``{group: relative damping}`` (``pinv``: 0);
    anything else is returned as it is."""
    if not isinstance(damping, str) or preconditioner is not Preconditioner.GRAM:
        return damping
    if damping == AUTO_DAMPING:
        return auto_damping(store, criterion)
    if damping == "pinv":
        return 0.0
    grams = store.read_gram()
    missing = [g for g in store.groups if g not in grams]
    if missing:
        raise ConfigError(f"--damping {damping}: the store has no Gram matrix for groups {missing} (wider than "
                          "gram_max_dim at featurize time); give a number or use --preconditioner identity")
    if damping == "mp":
        return {g: mp_damping(np.linalg.eigvalsh(grams[g]), store.num_samples) for g in store.groups}
    if damping == "schedule":
        return {g: schedule_damping(grams[g], _learning_rate_sum(store)) for g in store.groups}
    raise ConfigError(f"damping: unknown name {damping!r}")


# -- the label-free dampings of issue 21 ------------------------------------------------------------------
def mp_quantile(ratio: float, q: float = 0.5, points: int = 20001) -> float:
    """The ``q``-quantile of the Marchenko–Pastur law of unit variance and aspect ratio ``ratio = k/n``
    (eigenvalues of ``XᵀX/n``, ``X [n, k]`` i.i.d. unit entries), over its non-zero part when ``ratio > 1``."""
    lo, hi = (1 - np.sqrt(ratio)) ** 2, (1 + np.sqrt(ratio)) ** 2
    x = np.linspace(lo, hi, points)[1:-1]
    density = np.sqrt((hi - x) * (x - lo)) / (2 * np.pi * ratio * x)
    cumulative = np.cumsum(density)
    return float(np.interp(q * cumulative[-1], cumulative, x))


def mp_damping(eigenvalues: np.ndarray, rows: int) -> float:
    """Relative damping at the Marchenko–Pastur noise edge of one group's Gram spectrum ``[k]`` over
    ``rows`` training examples: the noise variance ``σ²`` is read off the median non-zero eigenvalue
    (matched to the law's median, robust to a few signal spikes), the edge is ``σ²(1 + √(k/n))²``, and
    relative to the mean eigenvalue that is ``edge / (trace/k)``: every direction whose eigenvalue is
    inside the noise bulk is damped by at least as much as it holds."""
    eigenvalues = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    k = len(eigenvalues)
    mean = eigenvalues.mean()
    if mean <= 0:
        return 1.0
    ratio = k / max(rows, 1)
    nonzero = np.sort(eigenvalues)[-min(k, rows):]  # the rank of ΦᵀΦ/n is at most n
    sigma2 = np.median(nonzero) / mp_quantile(ratio)
    # with ratio > 1 the non-zero eigenvalues are those of ΦΦᵀ/n: the law of ratio 1/ratio, scaled by ratio
    if ratio > 1:
        sigma2 = np.median(nonzero) / (ratio * mp_quantile(1 / ratio))
    edge = sigma2 * (1 + np.sqrt(ratio)) ** 2
    return float(np.clip(edge / mean, 0.0, 1e6))


def schedule_damping(gram: np.ndarray, learning_rate_sum: float) -> float:
    """SOURCE-style effective damping (Bae et al. 2024): ``T`` steps of rates ``η_t`` on a quadratic of
    curvature ``H`` leave the response ``(I − Π(I − η_t H)) H⁻¹`` ≈ ``(H + λI)⁻¹`` with ``λ ≈ 1/Σ_t η_t``;
    relative to the group's mean eigenvalue (``G ≈ H``, the empirical Fisher of the mean loss)."""
    mean = float(np.trace(gram)) / gram.shape[0]
    if learning_rate_sum <= 0 or mean <= 0:
        raise ConfigError(f"--damping schedule: expected a positive sum of learning rates and a non-zero Gram, "
                          f"got {learning_rate_sum} and mean eigenvalue {mean}")
    return float(np.clip(1.0 / learning_rate_sum / mean, 0.0, 1e6))


def _learning_rate_sum(store: FeatureStore) -> float:
    from gradindex.features.query import load_store_task

    task = load_store_task(store)
    rates = task.learning_rates()
    if rates is None:
        raise ConfigError(f"--damping schedule: task {type(task).__name__} does not say its learning rates "
                          "(Task.learning_rates); give a number, auto or mp")
    return float(np.sum(np.asarray(rates, dtype=np.float64)))
