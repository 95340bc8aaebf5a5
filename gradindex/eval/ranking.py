"""Ranking metrics over the whole training set: average precision and recall@k per query.

Where :func:`~gradindex.eval.evaluate.concept_precision` looks at a query's top-k only, these
score a query's full ranking of the training set against its relevant set ``G`` (the training
examples sharing the query's value of a concept), optionally restricted to a candidate subset
(e.g. the training examples whose caption does *not* name the value: the ones a caption search
cannot find). Restricting means ranking only the candidates (the others are removed from the
list), so ``G`` becomes ``G ∩ candidates``.

* ``ap``: average precision, ``mean_{g ∈ G} precision@rank(g)`` (non-interpolated; equals
  ``sklearn.metrics.average_precision_score`` when scores have no ties).
* ``recall@k``: ``|top-k ∩ G| / |G|``; ``recall@G`` uses ``k = |G|`` (R-precision).
* ``precision@k``: ``|top-k ∩ G| / k``.

Ties are broken by training position (stable sort): a scorer with ties (a keyword match)
should break them itself, e.g. with seeded noise. A query with no relevant candidate gets NaN
in every metric, and :func:`mean_metrics` leaves it out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradindex.errors import ConfigError
from gradindex.index import TopK


def ranking_metrics(scores: np.ndarray, relevant: np.ndarray, candidates: np.ndarray | None = None,
                    ks: Sequence[int] = (10, 100)) -> dict[str, np.ndarray]:
    """Per-query metrics of ``scores [n, N]`` (higher = ranked first) against ``relevant [n, N]`` (bool),
    over the ``candidates`` (bool ``[N]`` or ``[n, N]``; default every training example).

    Returns ``{"ap", "recall@k" and "precision@k" for each k, "recall@G", "relevant"}``, each ``[n]``
    (``relevant``: ``|G ∩ candidates|``; the others NaN where it is 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if scores.ndim != 2 or relevant.shape != scores.shape:
        raise ConfigError(f"ranking metrics: scores {scores.shape} and relevant {relevant.shape} must be the same [n, N]")
    if np.isnan(scores).any():
        raise ConfigError("ranking metrics: scores contain NaN")
    keep = np.ones(scores.shape, dtype=bool) if candidates is None else np.broadcast_to(
        np.asarray(candidates, dtype=bool), scores.shape)
    out: dict[str, list[float]] = {"ap": [], "recall@G": [], "relevant": []}
    for k in ks:
        if k < 1:
            raise ConfigError(f"ranking metrics: k must be positive, got {k}")
        out[f"recall@{k}"], out[f"precision@{k}"] = [], []
    for row_scores, row_relevant, row_keep in zip(scores, relevant, keep):
        hits = row_relevant[row_keep][np.argsort(-row_scores[row_keep], kind="stable")]
        total = int(hits.sum())
        out["relevant"].append(total)
        found = np.cumsum(hits)
        if total == 0:
            for name in out:
                if name != "relevant":
                    out[name].append(np.nan)
            continue
        ranks = np.flatnonzero(hits) + 1
        out["ap"].append(float(np.mean(found[ranks - 1] / ranks)))
        out["recall@G"].append(found[total - 1] / total)
        for k in ks:
            depth = min(k, len(hits))
            out[f"recall@{k}"].append(found[depth - 1] / total)
            out[f"precision@{k}"].append(found[depth - 1] / k)
    return {name: np.asarray(values, dtype=np.float64) for name, values in out.items()}


def concept_relevance(train_values: np.ndarray, query_values: np.ndarray) -> np.ndarray:
    """``[n, N]`` bool: training example ``j`` shares query ``i``'s value (``""``, unspecified, shares nothing)."""
    train_values = np.asarray(train_values)
    query_values = np.asarray(query_values)
    return (query_values[:, None] == train_values[None, :]) & (query_values[:, None] != "")


def dense_scores(top: TopK, train_ids: np.ndarray) -> np.ndarray:
    """``[n, N]`` scores in ``train_ids`` order from results ``top`` (``-inf`` where an example is not in a
    query's results; ask for ``k = N`` to rank every training example)."""
    train_ids = np.asarray(train_ids)
    order = np.argsort(train_ids)
    ids = top.sample_ids
    found = np.clip(np.searchsorted(train_ids, ids, sorter=order), 0, len(train_ids) - 1)
    columns = order[found]
    valid = (ids >= 0) & (train_ids[columns] == ids)
    out = np.full((len(ids), len(train_ids)), -np.inf)
    rows = np.broadcast_to(np.arange(len(ids))[:, None], ids.shape)
    out[rows[valid], columns[valid]] = np.asarray(top.scores)[valid]
    return out


def mean_metrics(metrics: dict[str, np.ndarray]) -> dict[str, float]:
    """The mean of every metric over the queries that have a relevant candidate (NaN left out)."""
    return {name: float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            for name, values in metrics.items() if name != "relevant"}
