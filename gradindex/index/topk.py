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
from dataclasses import dataclass, replace

import numpy as np

from gradindex.config import require_positive
from gradindex.errors import ConfigError


@dataclass(frozen=True)
class TopK:
    """Top-k results: ``scores [n, k]`` (descending) and ``sample_ids [n, k]`` (-1 = no result).

    Optional per-query evidence (``None`` where the searcher does not report it): ``certified [n]``
    bool — the answer is provably the exact top-k of the rows searched (up to ties); ``cells_scanned
    [n]`` and ``rows_reranked [n]`` — what the query cost (IVF cells scanned, rows scored exactly).
    """

    scores: np.ndarray
    sample_ids: np.ndarray
    certified: np.ndarray | None = None
    cells_scanned: np.ndarray | None = None
    rows_reranked: np.ndarray | None = None

    def __len__(self) -> int:
        return self.scores.shape[0]

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    def with_evidence(self, certified: np.ndarray, cells_scanned: np.ndarray, rows_reranked: np.ndarray) -> "TopK":
        """The same results carrying per-query evidence (``[n]`` each)."""
        return replace(self, certified=np.asarray(certified, bool), cells_scanned=np.asarray(cells_scanned, np.int64),
                       rows_reranked=np.asarray(rows_reranked, np.int64))

    def select(self, rows: slice | np.ndarray) -> "TopK":
        """The queries ``rows`` (a slice or indices), evidence included."""
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return TopK(self.scores[rows], self.sample_ids[rows], pick(self.certified), pick(self.cells_scanned),
                    pick(self.rows_reranked))


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
    merged = canonical_order(scores, ids, int(k))
    if all(p.certified is not None for p in parts):  # a union of exact part top-ks is exact
        merged = merged.with_evidence(np.logical_and.reduce([np.asarray(p.certified) for p in parts]),
                                      sum(np.asarray(p.cells_scanned) for p in parts),
                                      sum(np.asarray(p.rows_reranked) for p in parts))
    return merged


def concat_topk(parts: Sequence[TopK]) -> TopK:
    """Queries of several :class:`TopK` (same ``k``) one after another, evidence kept where all carry it."""
    parts = list(parts)
    join = lambda name: (np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
                         if all(getattr(p, name) is not None for p in parts) else None)
    return TopK(join("scores"), join("sample_ids"), join("certified"), join("cells_scanned"), join("rows_reranked"))


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


def recall_distribution(approx: TopK, exact: TopK) -> dict[str, float]:
    """Per-query recall@k summarised: ``mean``, ``p5`` (5th percentile), ``worst``, ``below_0_8`` (share of
    queries under 0.8) and ``certified`` (share of queries the search certified; 0 when it does not say)."""
    hits = per_query_recall(approx, exact)
    if not len(hits):
        return {"mean": 0.0, "p5": 0.0, "worst": 0.0, "below_0_8": 0.0, "certified": 0.0}
    certified = float(np.mean(approx.certified)) if approx.certified is not None else 0.0
    return {"mean": float(hits.mean()), "p5": float(np.percentile(hits, 5)), "worst": float(hits.min()),
            "below_0_8": float(np.mean(hits < 0.8)), "certified": certified}
