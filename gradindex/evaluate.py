"""Reference search and quality measures.

* :func:`exact_topk`: blockwise exact maximum-inner-product top-k over
  ``(ids, vectors)`` blocks with a running merge (the reference FAISS is tested against).
* :func:`recall_at_k`: fraction of the exact top-k an approximate search returned.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from gradindex.index import TopK


def exact_topk(queries: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> TopK:
    """Exact top-``k`` of ``queries [n, D]`` against stored ``(ids [m], vectors [m, D])`` blocks."""
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


def recall_at_k(approx: TopK, exact: TopK) -> float:
    """Mean over queries of ``|approx ∩ exact| / k`` (ids; -1 never counts)."""
    k = exact.k
    hits = [
        len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) / max(1, k)
        for a, e in zip(approx.sample_ids, exact.sample_ids)
    ]
    return float(np.mean(hits)) if hits else 0.0
