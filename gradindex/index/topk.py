"""Top-k results and their exact merge (no FAISS here).

:class:`TopK` holds ``scores [n, k]`` (descending) and ``sample_ids [n, k]``
(``-1`` = no result). :func:`merge_topk` merges the top-k lists of index parts
(shards searched separately, on one machine or many) into the top-k of their
union: exact, with ties broken by ascending sample id, so the result does not
depend on the order or the number of parts.

:func:`exact_topk` is the reference every index is tested and calibrated against: blockwise exact
maximum-inner-product top-k over ``(sample_ids [m], vectors [m, D])`` blocks (torch, imported on use);
:func:`per_query_recall` / :func:`recall_at_k` compare an approximate answer with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from gradindex.config import require_positive
from gradindex.errors import ConfigError


@dataclass(frozen=True)
class TopK:
    """Top-k results: ``scores [n, k]`` (descending) and ``sample_ids [n, k]`` (-1 = no result)."""

    scores: np.ndarray
    sample_ids: np.ndarray

    def __len__(self) -> int:
        return self.scores.shape[0]

    @property
    def k(self) -> int:
        return self.scores.shape[1]


def canonical_order(scores: np.ndarray, sample_ids: np.ndarray, k: int) -> TopK:
    """The best ``k`` columns of each row: score descending, then sample id ascending, ``-1`` ids last."""
    scores = np.asarray(scores, dtype=np.float32)
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    valid = sample_ids >= 0
    key_score = np.where(valid, -scores.astype(np.float64), np.inf)
    key_id = np.where(valid, sample_ids, np.iinfo(np.int64).max)
    order = np.lexsort((key_id, key_score), axis=-1)[:, :k]
    out_scores = np.take_along_axis(scores, order, 1)
    out_ids = np.take_along_axis(sample_ids, order, 1)
    out_scores = np.where(out_ids >= 0, out_scores, -np.inf).astype(np.float32)
    return TopK(out_scores, out_ids)


def merge_topk(parts: Sequence[TopK], k: int) -> TopK:
    """The exact top-``k`` of the union of ``parts`` (each ``[n, k_i]`` for the same ``n`` queries).

    Ties are broken by ascending sample id; rows with fewer than ``k`` results
    are padded with score ``-inf`` and id ``-1``. A sample id present in two
    parts is a caller error (parts cover disjoint store shards).
    """
    require_positive(k, "k", numpy_ok=True)
    parts = list(parts)
    if not parts:
        raise ConfigError("merge_topk: no parts to merge")
    rows = {len(p) for p in parts}
    if len(rows) != 1:
        raise ConfigError(f"merge_topk: parts answer different numbers of queries {sorted(rows)}")
    n = rows.pop()
    scores = np.concatenate([np.asarray(p.scores, np.float32).reshape(n, -1) for p in parts], axis=1)
    ids = np.concatenate([np.asarray(p.sample_ids, np.int64).reshape(n, -1) for p in parts], axis=1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.concatenate([scores, np.full((n, pad), -np.inf, np.float32)], axis=1)
        ids = np.concatenate([ids, np.full((n, pad), -1, np.int64)], axis=1)
    return canonical_order(scores, ids, int(k))


def exact_topk(queries: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> TopK:
    """Exact top-``k`` of ``queries [n, D]`` against stored ``(ids [m], vectors [m, D])`` blocks."""
    import torch  # here, so that importing this module loads no torch

    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    best_scores = torch.full((q.shape[0], 0), -torch.inf)
    best_ids = torch.zeros((q.shape[0], 0), dtype=torch.int64)
    for ids, vectors in blocks:
        scores = q @ torch.as_tensor(np.asarray(vectors, dtype=np.float32)).T
        block_ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)).expand(q.shape[0], -1)
        scores = torch.cat([best_scores, scores], dim=1)
        all_ids = torch.cat([best_ids, block_ids], dim=1)
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        best_scores, best_ids = top.values, torch.gather(all_ids, 1, top.indices)
    return TopK(best_scores.numpy(), best_ids.numpy())


def per_query_recall(approx: TopK, exact: TopK) -> np.ndarray:
    """``|approx ∩ exact| / k`` per query (ids; -1 never counts): ``[n]``."""
    k = max(1, exact.k)
    return np.array([len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) / k
                     for a, e in zip(approx.sample_ids, exact.sample_ids)])


def recall_at_k(approx: TopK, exact: TopK) -> float:
    """Mean over queries of ``|approx ∩ exact| / k`` (ids; -1 never counts)."""
    hits = per_query_recall(approx, exact)
    return float(hits.mean()) if len(hits) else 0.0
