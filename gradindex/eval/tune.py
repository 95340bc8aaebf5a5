"""``gradindex tune``: a store's attribution setting chosen by LDS on a small, cached retraining budget.

In: a store, its task's retrained models (:func:`gradindex.eval.lds.retrain`, ``M`` subsets ×
``R`` runs) measured on the task's *fit* queries (``[M, Q]``), and a :class:`~gradindex.config.TuneConfig`.
Out: a :class:`TuneResult` — one row per preconditioner × damping × weighting (every member of
:class:`~gradindex.config.Preconditioner`, so new preconditioners join the grid on their own; the
identity once, the others at each damping; uniform weights and the label-free learned ones fitted
on the same fit queries), each with its LDS on the fit queries, the two-way bootstrap SE over
models and queries and the paired difference to the best row. :func:`record_tuned` saves the best
row as the store's default setting (``manifest["tuned"]``) and, for a learned weighting, its weights
(``manifest["weights"]["all"][setting]``), so that ``build-index`` without flags uses both.

The fit queries select; report quality on the eval queries (``gradindex eval lds``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradindex.config import DEFAULT_DAMPING, LearnConfig, Preconditioner, TuneConfig, setting_key
from gradindex.errors import GradIndexError
from gradindex.eval.lds import RetrainedModels, group_predictions, subset_sums, weighted_predictions
from gradindex.eval.reliability import bootstrap_lds, bootstrap_se, paired_se
from gradindex.features.query import QueryFeaturizer, precondition_features
from gradindex.store.feature_store import FeatureStore
from gradindex.task import query_digests
from gradindex.weights.group_weights import GroupWeights, save_weights
from gradindex.weights.learn import learn_from_features, query_sample

logger = logging.getLogger(__name__)

#: the manifest key of the setting ``tune`` chose
TUNED = "tuned"
#: preconditioners whose query features come from the raw ones without featurizing again
_FROM_RAW = (Preconditioner.IDENTITY, Preconditioner.GRAM)


def tune_grid(config: TuneConfig) -> list[tuple[Preconditioner, float | None]]:
    """``[(preconditioner, damping)]``: the identity once (damping ``None``), every other
    preconditioner of the enum at each of ``config.dampings``."""
    grid: list[tuple[Preconditioner, float | None]] = []
    for preconditioner in Preconditioner:
        if preconditioner is Preconditioner.IDENTITY:
            grid.append((preconditioner, None))
        else:
            grid.extend((preconditioner, damping) for damping in config.dampings)
    return grid


@dataclass
class TuneRow:
    """One cell of the grid; ``error`` says why it could not be scored (then ``lds`` is ``None``)."""

    preconditioner: str
    damping: float | None
    method: str
    lds: float | None = None
    se: float | None = None
    minus_best: float | None = None
    minus_best_se: float | None = None
    error: str | None = None
    weights: dict[str, float] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "weights"}


@dataclass
class TuneResult:
    """The scored grid, its best row, and what it was scored on."""

    rows: list[TuneRow]
    best: TuneRow
    models: int
    runs_per_subset: int
    queries: int
    ceiling: tuple[float, float] | None
    learned: dict[int, GroupWeights] = field(default_factory=dict, repr=False)  # row position -> weights


def score_grid(store: FeatureStore, retrained: RetrainedModels, queries: Sequence, config: TuneConfig = TuneConfig(),
               device: str = "cpu", show_progress: bool = False, learn_queries: Sequence | None = None) -> TuneResult:
    """Score every cell of :func:`tune_grid` × ``config.methods`` by LDS against ``retrained``
    (which measured ``queries``, the fit queries: ``[M, len(queries)]``). Learned weights are fitted
    (without labels) on ``learn_queries``, default ``queries``; a benchmark scoring eval queries passes
    the fit queries here."""
    featurizer = QueryFeaturizer.open(store, "all", Preconditioner.IDENTITY, device=device)
    try:
        raw = featurizer.group_features(queries, show_progress=show_progress)
        learn_raw = raw if learn_queries is None else featurizer.group_features(learn_queries)
    finally:
        featurizer.close()
    learn_queries = queries if learn_queries is None else learn_queries
    sums = subset_sums(store, retrained.masks, retrained.sample_ids)
    rows: list[TuneRow] = []
    predictions: list[np.ndarray] = []
    scored: list[int] = []
    learned: dict[int, GroupWeights] = {}
    for preconditioner, damping in tune_grid(config):
        try:
            features = _setting_features(store, raw, queries, preconditioner, damping, device)
            per_group = group_predictions(features, sums)
        except (GradIndexError, NotImplementedError) as err:
            rows += [TuneRow(preconditioner.value, damping, m, error=_one_line(err)) for m in config.methods]
            continue
        for method in config.methods:
            row = TuneRow(preconditioner.value, damping, method)
            rows.append(row)
            try:
                weights = _weights(store, learn_raw, learn_queries, preconditioner, damping, method, config.seed)
            except (GradIndexError, NotImplementedError) as err:
                row.error = _one_line(err)
                continue
            row.weights = weights.weights
            if method != "uniform":
                learned[len(rows) - 1] = weights
            scored.append(len(rows) - 1)
            predictions.append(weighted_predictions(per_group, weights.weights))
    if not scored:
        raise GradIndexError(f"tune: no cell of the grid could be scored ({rows[0].error})")
    _fill_scores(rows, scored, predictions, retrained, config.replicates)
    best = max((rows[i] for i in scored), key=lambda r: r.lds)
    return TuneResult(rows, best, len(retrained.masks), retrained.runs_per_subset, len(queries),
                      retrained.ceiling("all"), learned)


def _fill_scores(rows: list[TuneRow], scored: list[int], predictions: list[np.ndarray], retrained: RetrainedModels,
                 replicates: int) -> None:
    """Each scored row's LDS, bootstrap SE and paired difference to the best scored row."""
    measured = retrained.measurements["all"]
    means = [float(retrained.lds(p).mean()) for p in predictions]
    boot = bootstrap_lds(predictions, measured, replicates) if replicates > 1 else None
    se = bootstrap_se(boot) if boot is not None else np.zeros(len(predictions))
    top = int(np.argmax(means))
    for e, i in enumerate(scored):
        rows[i].lds, rows[i].se = means[e], float(se[e])
        rows[i].minus_best = means[e] - means[top]
        rows[i].minus_best_se = paired_se(boot, e, top) if boot is not None else 0.0


def _setting_features(store: FeatureStore, raw: Mapping[str, np.ndarray], queries: Sequence,
                      preconditioner: Preconditioner, damping: float | None, device: str) -> dict[str, np.ndarray]:
    """``{group: −ψ_g(q) [Q, k_g]}`` under a setting: from the raw features where that is exact, else by
    featurizing the queries again under the preconditioner (e.g. one applied in parameter space)."""
    if preconditioner in _FROM_RAW:
        return precondition_features(store, raw, preconditioner, 0.0 if damping is None else damping)
    featurizer = QueryFeaturizer.open(store, "all", preconditioner, damping, device=device)
    try:
        return featurizer.group_features(queries)
    finally:
        featurizer.close()


def _weights(store: FeatureStore, raw: Mapping[str, np.ndarray], queries: Sequence, preconditioner: Preconditioner,
             damping: float | None, method: str, seed: int) -> GroupWeights:
    """Uniform weights, or ``method``'s weights learned on (a seeded sample of) the fit queries."""
    if method == "uniform":
        return GroupWeights.uniform("all", store.groups)
    defaults = LearnConfig()
    config = LearnConfig(preconditioner=preconditioner, damping=DEFAULT_DAMPING if damping is None else damping,
                         method=method, seed=seed, reference_size=min(defaults.reference_size, store.num_samples),
                         top_k=min(defaults.top_k, max(1, store.num_samples // 4)))
    chosen = query_sample(np.arange(len(queries)), config.num_queries, seed)
    rows = np.asarray(getattr(chosen, "indices", chosen))
    weights = learn_from_features(store, {g: v[rows] for g, v in raw.items()}, config)
    weights.info["queries"] = {"source": "fit (tune)", "count": len(rows),
                               "digests": query_digests(_subset(queries, rows))}
    return weights


def _subset(dataset: Sequence, rows: np.ndarray) -> Sequence:
    import torch

    return torch.utils.data.Subset(dataset, [int(r) for r in rows])


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def record_tuned(store: FeatureStore, result: TuneResult) -> dict[str, Any]:
    """Save ``result.best`` as the store's default setting (``manifest["tuned"]``) and, when its weights
    were learned, those weights under their setting; returns the manifest entry."""
    best = result.best
    position = result.rows.index(best)
    if position in result.learned:
        weights = result.learned[position]
        weights.info["tuned"] = True
        save_weights(store, weights)
    entry = {"preconditioner": best.preconditioner, "damping": best.damping, "method": best.method,
             "setting": setting_key(best.preconditioner, DEFAULT_DAMPING if best.damping is None else best.damping),
             "lds": best.lds, "se": best.se, "models": result.models, "runs_per_subset": result.runs_per_subset,
             "queries": result.queries, "split": "fit",
             "ceiling": None if result.ceiling is None else result.ceiling[1],
             "grid": [row.to_dict() for row in result.rows]}
    store.update_manifest({TUNED: entry})
    return entry


def tuned_setting(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The setting ``tune`` recorded (preconditioner, damping, method, ...), or ``None``."""
    entry = manifest.get(TUNED)
    return dict(entry) if isinstance(entry, Mapping) and "preconditioner" in entry else None
