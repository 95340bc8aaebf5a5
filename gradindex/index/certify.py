"""Certified top-k over a norm-banded IVF part (``ivf`` / ``ivfpq``): per-cell upper bounds on
any member's score, and the scan that stops once nothing left can beat the k-th best exact score.

In: a query ``q [D]`` (stored, balanced space), the part's per-cell facts recorded at build time
(:class:`CellBounds`, ``[bands·nlist]`` each) and a way to read a cell's member rows and their
float vectors (:class:`CellMembers`). Out: the exact top-k of the part and the evidence behind it.

Bound of cell ``l = (b, c)`` (centroid ``ρ_b·d_c``, unit direction ``d_c``) for a query ``q``
at angle ``α`` from ``d_c``: every member ``x`` satisfies

* cone: ``∠(x, d_c) ≤ θ_l`` (the widest member angle) and ``m_l ≤ ‖x‖ ≤ R_l``, so
  ``q·x ≤ ‖q‖·‖x‖·cos(max(0, α − θ_l))`` — times ``R_l`` where the cosine is ≥ 0, ``m_l`` where not;
* radius: ``‖x − ρ_b d_c‖ ≤ r_l``, so ``q·x ≤ ρ_b·q·d_c + ‖q‖·r_l``;

and the bound is the smaller of the two plus a float32 rounding allowance. Scanning cells in
decreasing bound order and scoring every member exactly, the k-th best exact score ``s_k`` is a
lower bound on the true k-th score; once ``s_k ≥`` the best bound left, nothing unscanned can
enter the top-k except by tying ``s_k`` (the answer is exact up to ties: tie-aware equal to brute
force). For ``ivfpq`` the heuristic search re-scores only the best ``rerank`` candidates by PQ
score: a member of a scanned cell that was not re-scored has PQ score at most the last kept one,
``p_last``, and exact score at most ``p_last + ‖q‖·e_l`` (``e_l``: the cell's largest PQ
reconstruction error against the float16 row), so such cells stay pending with that bound.

"Exact" means against the rows the part scores with: the float32 vectors of an ``ivf`` part, the
float16 copies of an ``ivfpq`` part (the store's own values for a float16 store without balancing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

CERTIFY_SLACK = 2e-5  # allowance for float32 rounding of exact scores, relative to ‖q‖·R_l
ANGLE_SLACK = 1e-6  # radians: rounding of the angles (computed in float64 from float32 inputs)
CHUNK_ROWS = 4096  # rows scored together by the certifying scan (several small cells per product)
ADAPTIVE_CHUNK_ROWS = 1024  # the adaptive default's step: it stops after PATIENCE steps that change nothing
PATIENCE = 1


@dataclass(frozen=True)
class CellBounds:
    """Per-list facts of a banded part (index ``band·nlist + c``): ``max_norm``, ``min_norm``,
    ``min_cos`` (smallest cosine of a member with ``d_c``), ``radius`` (largest ``‖x − ρ_b d_c‖``),
    ``pq_error`` (ivfpq: largest ``‖x − decode(x)‖``, else ``None``), ``count``; ``rho [bands]``."""

    max_norm: np.ndarray
    min_norm: np.ndarray
    min_cos: np.ndarray
    radius: np.ndarray
    pq_error: np.ndarray | None
    count: np.ndarray
    rho: np.ndarray

    @classmethod
    def from_info(cls, info: Mapping[str, Any], layout: Mapping[str, Any]) -> "CellBounds | None":
        """From a part's recorded info (``None`` for a part built before these facts were kept)."""
        needed = ("cell_max", "cell_min", "cell_cos", "cell_radius", "cell_count")
        if not layout or any(name not in info for name in needed):
            return None
        pq = info.get("cell_pq_error")
        return cls(np.asarray(info["cell_max"], np.float64), np.asarray(info["cell_min"], np.float64),
                   np.asarray(info["cell_cos"], np.float64), np.asarray(info["cell_radius"], np.float64),
                   None if pq is None else np.asarray(pq, np.float64), np.asarray(info["cell_count"], np.int64),
                   np.asarray(layout["rho"], np.float64))

    def upper(self, q: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """``[n, cells]`` float64: an upper bound on ``q·x`` over each cell's members (``-inf`` when empty)."""
        q64 = np.asarray(q, np.float64)
        qnorm = np.linalg.norm(q64, axis=1)[:, None]
        aligned = q64 @ np.asarray(directions, np.float64).T  # [n, nlist]: q·d_c
        bands = len(self.rho)
        aligned = np.tile(aligned, (1, bands))  # [n, cells]
        cos_q = np.clip(aligned / np.maximum(qnorm, 1e-300), -1.0, 1.0)
        gap = np.maximum(0.0, np.arccos(cos_q) - np.arccos(np.clip(self.min_cos, -1.0, 1.0))[None, :] - ANGLE_SLACK)
        factor = np.cos(gap)
        cone = qnorm * np.where(factor >= 0, self.max_norm[None, :] * factor, self.min_norm[None, :] * factor)
        centre = np.repeat(self.rho, len(self.max_norm) // bands)[None, :] * aligned
        radius = centre + qnorm * self.radius[None, :]
        bound = np.minimum(cone, radius) + CERTIFY_SLACK * qnorm * self.max_norm[None, :]
        return np.where(self.count[None, :] > 0, bound, -np.inf)


def record_cells(lists: np.ndarray, x: np.ndarray, directions: np.ndarray, rho: np.ndarray,
                 centroids: np.ndarray, decoded: np.ndarray | None, facts: dict[str, np.ndarray]) -> None:
    """Fold rows ``x [m, D]`` (as the part scores them) of inverted ``lists [m]`` into ``facts``
    (``cell_min``, ``cell_cos``, ``cell_radius``, ``cell_pq_error``: running min / max per list).
    ``decoded [m, D]``: ivfpq's reconstructions (centroid + decoded residual), else ``None``."""
    x64 = np.asarray(x, np.float64)
    nlist = len(directions)
    norms = np.linalg.norm(x64, axis=1)
    cos = np.einsum("ij,ij->i", x64, np.asarray(directions, np.float64)[lists % nlist]) / np.maximum(norms, 1e-300)
    cos = np.where(norms > 0, cos, 1.0)  # a zero row scores 0 in any direction: the norm terms cover it
    centre = np.asarray(rho, np.float64)[lists // nlist][:, None] * np.asarray(directions, np.float64)[lists % nlist]
    np.minimum.at(facts["cell_min"], lists, norms)
    np.minimum.at(facts["cell_cos"], lists, cos)
    np.maximum.at(facts["cell_radius"], lists, np.linalg.norm(x64 - centre, axis=1))
    if decoded is not None:
        np.maximum.at(facts["cell_pq_error"], lists, np.linalg.norm(x64 - np.asarray(decoded, np.float64), axis=1))


class CellMembers:
    """Member rows of each inverted list, scored exactly for a query (read on demand).

    ``ivf``: every member, from the vectors FAISS stores in the list. ``ivfpq``: members are first
    scored by PQ (``q·c_l`` plus the code's table lookups); only those whose PQ score plus
    ``‖q‖·‖x − decode(x)‖`` (the row's own reconstruction error, computed per list on first use)
    can beat the current k-th score are re-scored exactly from the float16 copies ``vectors [N, D]``.
    """

    def __init__(self, index: Any, vectors: np.ndarray | None, to_float: Callable[[np.ndarray], Any],
                 max_norm: np.ndarray):
        from gradindex.index.faiss_lib import import_faiss

        faiss = import_faiss()
        self.faiss = faiss
        self.ivf = faiss.extract_index_ivf(index)
        self.invlists = self.ivf.invlists
        self.dim = self.ivf.d
        self.flat = isinstance(index, faiss.IndexIVFFlat)
        self.vectors = vectors
        self.to_float = to_float
        self.max_norm = np.asarray(max_norm, np.float64)  # [lists]: largest row norm (rounding allowances)
        if not self.flat:
            self.pq = faiss.downcast_index(index).pq
            self.codebooks = faiss.vector_to_array(self.pq.centroids).reshape(self.pq.M, self.pq.ksub, self.pq.dsub)
            self.centroids = self.ivf.quantizer.reconstruct_n(0, self.ivf.nlist)
            self.errors: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # list -> rows, codes, errors
            self._table = None

    def rows(self, lst: int) -> np.ndarray:
        """The part rows of list ``lst`` (a view into the index: valid while it lives)."""
        size = self.invlists.list_size(int(lst))
        if size == 0:
            return np.zeros(0, np.int64)
        return self.faiss.rev_swig_ptr(self.invlists.get_ids(int(lst)), size)

    def _codes(self, lst: int, size: int) -> np.ndarray:
        raw = self.faiss.rev_swig_ptr(self.invlists.get_codes(int(lst)), size * self.invlists.code_size)
        return np.frombuffer(raw, np.uint8).reshape(size, self.invlists.code_size)

    def _list(self, lst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ivfpq: ``(rows, codes [m, M], reconstruction errors [m])`` of list ``lst`` (cached)."""
        if lst not in self.errors:
            rows = self.rows(lst)
            codes = self._codes(lst, len(rows))
            decoded = self.pq.decode(np.ascontiguousarray(codes)) + self.centroids[lst]
            exact = self.to_float(np.take(self.vectors, rows, axis=0)).numpy().astype(np.float64)
            self.errors[lst] = (rows, codes, np.linalg.norm(exact - decoded, axis=1))
        return self.errors[lst]

    def scores(self, q: np.ndarray, lists: list[int], kth: float) -> tuple[np.ndarray, np.ndarray]:
        """Exact ``(scores [m] float32, rows [m])`` of the members of ``lists`` for ``q [D]`` that may
        score above ``kth`` (``ivf``: every member)."""
        if self.flat:
            rows = [self.rows(lst) for lst in lists]
            blocks = [np.frombuffer(self.faiss.rev_swig_ptr(self.invlists.get_codes(int(lst)), len(r) * self.dim * 4),
                                    np.float32).reshape(len(r), self.dim) for lst, r in zip(lists, rows) if len(r)]
            if not blocks:
                return np.zeros(0, np.float32), np.zeros(0, np.int64)
            return (np.concatenate(blocks) @ q).astype(np.float32), np.concatenate(rows).astype(np.int64)
        nonempty = [int(lst) for lst in lists if len(self._list(int(lst))[0])]
        parts = [self._list(lst) for lst in nonempty]
        if not parts:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        rows = np.concatenate([p[0] for p in parts])
        codes = np.concatenate([p[1] for p in parts])
        errors = np.concatenate([p[2] for p in parts])
        q64 = np.asarray(q, np.float64)
        qnorm = float(np.linalg.norm(q64))
        if self._table is None or self._table[0] is not q:  # [M, ksub] lookups of q (once per query)
            self._table = (q, np.einsum("mkd,md->mk", self.codebooks, q64.reshape(self.pq.M, self.pq.dsub)))
        table = self._table[1]
        coarse = np.repeat(self.centroids[nonempty] @ q64, [len(p[0]) for p in parts])
        pq = coarse + table[np.arange(self.pq.M), codes].sum(1)
        upper = pq + qnorm * errors * (1 + CERTIFY_SLACK) + CERTIFY_SLACK * qnorm * self.max_norm[lists].max()
        ids = rows[upper > kth].astype(np.int64)
        gathered = self.to_float(np.take(self.vectors, ids, axis=0)).numpy()
        return (gathered @ q).astype(np.float32), ids


def merge_exact(scores: np.ndarray, rows: np.ndarray, more_scores: np.ndarray, more_rows: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` distinct rows of two exact candidate lists (score descending, row ascending)."""
    all_scores = np.concatenate([scores, more_scores])
    all_rows = np.concatenate([rows, more_rows])
    keep = all_rows >= 0
    all_scores, all_rows = all_scores[keep], all_rows[keep]
    order = np.lexsort((all_rows, -all_scores.astype(np.float64)))
    all_scores, all_rows = all_scores[order], all_rows[order]
    _, first = np.unique(all_rows, return_index=True)
    first = np.sort(first)[:k]
    return all_scores[first], all_rows[first]


@dataclass
class Evidence:
    """One query's state: its exact top-k so far and what certifying it cost."""

    scores: np.ndarray  # [≤k] float32, descending
    rows: np.ndarray  # [≤k]
    cells: int  # cells scanned (heuristic phase and certifying scan)
    reranked: int  # rows scored exactly
    certified: bool = False

    def kth(self, k: int) -> float:
        return float(self.scores[k - 1]) if len(self.scores) >= k else -np.inf


def certify(q: np.ndarray, k: int, state: Evidence, pending: np.ndarray, bounds: np.ndarray,
            members: CellMembers, counts: np.ndarray, budget: float, patience: int = 0) -> Evidence:
    """Scan ``pending`` cells (list numbers) of one query ``q [D]`` in decreasing order of their
    ``bounds`` (same length; ``counts``: every list's size), scoring members exactly, until the k-th
    best exact score is at least the best bound left (``certified``) or ``budget`` more rows would be
    exceeded. ``patience > 0`` (the adaptive default): also stop, uncertified, once that many steps
    in a row left the top-k unchanged (steps of :data:`ADAPTIVE_CHUNK_ROWS`): a query whose bounds
    are too loose to certify does not spend the whole budget finding nothing."""
    chunk_rows = ADAPTIVE_CHUNK_ROWS if patience else CHUNK_ROWS
    quiet = 0
    order = np.argsort(-bounds, kind="stable")
    cells, values = pending[order], bounds[order]
    sizes = counts[cells]
    pos, spent = 0, 0
    while True:
        kth = state.kth(k)
        if pos == len(cells) or values[pos] <= kth:
            state.certified = True
            return state
        chunk, size = [], 0
        while pos < len(cells) and values[pos] > kth and size < chunk_rows:
            rows = int(sizes[pos])
            if spent + size + rows > budget:
                break
            chunk.append(int(cells[pos]))
            size += rows
            pos += 1
        if not chunk:
            state.certified = False
            return state
        more_scores, more_rows = members.scores(q, chunk, kth)
        before = state.rows
        state.scores, state.rows = merge_exact(state.scores, state.rows, more_scores, more_rows, k)
        quiet = quiet + 1 if np.array_equal(np.sort(before), np.sort(state.rows)) else 0
        if patience and quiet >= patience and not (pos == len(cells) or values[pos] <= state.kth(k)):
            state.cells += len(chunk)
            state.reranked += len(more_rows)
            state.certified = False
            return state
        state.cells += len(chunk)
        state.reranked += len(more_rows)
        spent += size


@dataclass(frozen=True)
class Report:
    """Per-query evidence of a part's search: ``certified [n]`` bool, ``cells [n]`` and ``reranked [n]``
    int64 (cells scanned, rows scored exactly)."""

    certified: np.ndarray
    cells: np.ndarray
    reranked: np.ndarray

    @classmethod
    def of(cls, n: int, certified: bool, cells: int = 0, reranked: int = 0) -> "Report":
        return cls(np.full(n, certified), np.full(n, cells, np.int64), np.full(n, reranked, np.int64))


def certify_batch(q: np.ndarray, k: int, scores: np.ndarray, rows: np.ndarray, evidence: Mapping[str, Any],
                  bounds: CellBounds, directions: np.ndarray, members: CellMembers, pq: bool, budget: float,
                  patience: int = 0) -> tuple[np.ndarray, np.ndarray, Report]:
    """Check, and where needed continue, a banded search of ``q [n, D]``: ``scores, rows [n, k]``
    its exact top-k (part rows, canonical order), ``directions [nlist, D]`` the part's unit directions,
    ``evidence`` from :func:`~gradindex.index.probe.search_banded` (``reranked``: rows it scored exactly). A query whose
    k-th score is below some cell's bound scans those cells (:func:`certify`) within ``budget`` rows
    (and ``patience``).
    ``pq``: scanned cells may hold members scored only by PQ (bound ``floor + ‖q‖·e_l``).
    Out: ``(scores [n, k], rows [n, k], Report)``."""
    from gradindex.index.probe import pad_lists

    scores, rows = scores.copy(), rows.copy()
    upper = bounds.upper(q, directions)  # [n, cells]
    n = len(q)
    scanned = pad_lists(evidence["scanned"])  # [n, w], -1 = none
    lists = np.where(scanned >= 0, scanned, 0)
    left = np.full(scanned.shape, -np.inf)  # what a scanned cell may still hold
    if pq:  # members scored only by PQ: at most floor + ‖q‖·e_l
        qnorm = np.linalg.norm(np.asarray(q, np.float64), axis=1)[:, None]
        floor = np.asarray(evidence["floor"], np.float64)[:, None]
        left = np.minimum(np.take_along_axis(upper, lists, 1), floor + qnorm * bounds.pq_error[lists]
                          + CERTIFY_SLACK * qnorm * bounds.max_norm[lists])
    current = np.take_along_axis(upper, lists, 1)
    np.put_along_axis(upper, lists, np.where(scanned >= 0, left, current), 1)
    kth = np.where((rows >= 0).sum(1) >= k, scores[:, k - 1].astype(np.float64), -np.inf) if scores.shape[1] >= k \
        else np.full(n, -np.inf)
    cells = np.array([len(s) for s in evidence["scanned"]], np.int64)
    reranked = np.asarray(evidence["reranked"], np.int64).copy()
    certified = ~(upper > kth[:, None]).any(1)
    for i in np.flatnonzero(~certified):
        valid = rows[i] >= 0
        state = Evidence(scores[i][valid], rows[i][valid], int(cells[i]), int(reranked[i]))
        pending = np.flatnonzero(upper[i] > state.kth(k))
        state = certify(q[i], k, state, pending, upper[i][pending], members, bounds.count, budget, patience)
        width = len(state.scores)
        scores[i, :width], rows[i, :width] = state.scores, state.rows
        scores[i, width:], rows[i, width:] = -np.inf, -1
        certified[i], cells[i], reranked[i] = state.certified, state.cells, state.reranked
    return scores, rows, Report(certified, cells, reranked)
