"""Opponents: the training examples with the most negative scores for a query.

In: an index with ``search(vectors [n, D], k) -> TopK`` (any kind: flat, ivf, ivfpq, hnsw, sharded,
on Ray) and query vectors ``u(q) [n, D]``. Out: :class:`~gradindex.index.topk.TopK` whose rows are
the ``k`` smallest scores ``u(q)ᵀv(x)`` in **ascending** order (rank 1 = the most negative), ties by
ascending sample id, ``-1`` ids (fewer than ``k`` stored rows) last with score ``+inf``.

``min_x u·v = −max_x (−u)·v``: the bottom-k is the top-k of the negated query on the same index,
with the scores negated back. An exact index (flat, or a search the index bounds exactly) gives
the exact bottom-k; an approximate one the same recall as for proponents, since ``−u`` is just
another query vector. A positive score means training on ``x`` raises the measurement ``m(q)``
(a proponent); a negative one that it lowers it (an opponent).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradindex.index.topk import TopK


def search_opponents(index: Any, vectors: np.ndarray, k: int) -> TopK:
    """The ``k`` most negative scores of each row of ``vectors [n, D]`` on ``index`` (ascending)."""
    top = index.search(-np.asarray(vectors, dtype=np.float32), k)
    return negated(top)


def negated(top: TopK) -> TopK:
    """``top`` with its scores negated (``-inf`` padding becomes ``+inf``); ids unchanged."""
    return TopK(-np.asarray(top.scores, np.float32), np.asarray(top.sample_ids))
