"""FAISS index kinds for one index part (with :mod:`gradindex.index.build`, the only faiss importers).

In: training vectors (a seeded sample) and the part's vectors, in the stored
space ``v(x) = [√w_g φ_g(x)]`` times the optional balancing transform.
Out: a trained empty index (shared by every part of a partition), filled parts,
and :class:`PartIndex`, which answers ``search(u [n, D], k) -> TopK``.

Kinds (DESIGN §1.5: top-k attribution is maximum-inner-product search over
vectors with heavy-tailed norms):

* ``flat`` — ``IndexFlatIP``: exact.
* ``ivf`` / ``ivfpq`` — *norm-banded* inverted lists. Vectors are split into
  ``bands`` norm bands (quantiles of the training sample, narrowing towards the
  tail: the top band holds the largest 2^-(bands-1) of norms) and, within each
  band, into ``nlist`` direction cells (spherical k-means shared by the bands);
  cell ``(b, c)`` is inverted list ``b·nlist + c`` with centroid ``ρ_b·dir_c``
  (``ρ_b`` the band's median norm). A query scans cells in decreasing order of
  an estimate of their best score (:mod:`gradindex.index.probe`: the cell's
  largest norm times the query's alignment with, and spread along, the
  direction's stored vectors) until ``nprobe`` directions' worth of vectors are
  scanned, skipping cells whose bound ``‖q‖·max‖x‖`` cannot beat the current
  k-th exact score (lossless). ``ivf`` stores the raw vectors (exact scores);
  ``ivfpq`` stores ``pq_bytes``-byte residual PQ codes and re-scores the best
  ``rerank`` candidates exactly against float16 copies of the vectors kept
  beside the part.
* ``hnsw`` — ``IndexHNSWFlat`` with the inner-product metric over the balanced
  vectors (exact scores of the visited nodes). The MIPS→L2 augmentation
  ``[x, √(M² − ‖x‖²)]`` measured far worse here (recall@10 0.27/0.54/0.89 at
  efSearch 64/256/1024 against 0.998/1.0/1.0 on 20k enlarged-digits vectors).

Balancing: with ``H_g = G_g + λ_g I`` (the store's Gram matrix, damped as the
preconditioner is), parts store ``H_g^(-1/2)``-whitened blocks and queries are
mapped by ``H_g^(1/2)``; inner products are unchanged, but the Gram-preconditioned
queries and the raw features stop pointing into opposite ends of the spectrum,
which is what IVF/PQ need.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.config import AUTO_FLAT_LIMIT, IndexConfig, IndexKind, SearchConfig, require_positive
from gradindex.errors import ConfigError, StoreMismatchError
from gradindex.features.precondition import relative_lambda
from gradindex.index.faiss_lib import gpu_available, import_faiss, resolve_device  # noqa: F401 (re-exported)
from gradindex.index.certify import PATIENCE, CellBounds, CellMembers, Report, certify_batch, record_cells
from gradindex.index.probe import CellStats, search_banded
from gradindex.index.topk import TopK, canonical_order

logger = logging.getLogger(__name__)

DEFAULT_NPROBE = 16  # uncalibrated default: 16 directions' worth of vectors (3% of the part at nlist 512)
DEFAULT_EF_SEARCH = 256
DEFAULT_RERANK_PER_K = 20
DEFAULT_MAX_PROBE_FACTOR = 4  # adaptive search: a query may scan up to 4× the calibrated nprobe to certify itself
RESCORE_FLOATS = 1 << 23  # float32 candidates gathered at once by an exact re-rank (32 MB)
SINGLE_THREAD_QUERIES = 8  # batches up to this size search on one thread (see PartIndex._threads)
PQ_TRAIN_ROWS = 16_384  # 64 rows per PQ centroid
PQ_CENTROIDS = 256  # 8-bit sub-quantizers
MIN_POINTS_PER_CENTROID = 39  # FAISS's ClusteringParameters default, below which it warns


def read_index(path: str | Path) -> Any:
    """The FAISS index in ``path`` (the one place index files are read): a file FAISS cannot read
    is a one-line ``StoreMismatchError``."""
    faiss = import_faiss()
    try:
        return faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise StoreMismatchError(f"{path}: not a readable FAISS index ({first}); run build-index again") from None


def check_index_kind(index: Any, kind: str, dim: int, ntotal: int, where: str) -> None:
    """A part's FAISS index is of the entry's ``kind``, dimension (``dim``, or ``dim + 1`` when
    augmented for MIPS) and size; else a one-line ``StoreMismatchError``."""
    faiss = import_faiss()
    expected = {"flat": lambda: isinstance(index, faiss.IndexFlat),
                "hnsw": lambda: isinstance(index, faiss.IndexHNSW),
                "ivf": lambda: isinstance(index, faiss.IndexIVFFlat),
                "ivfpq": lambda: isinstance(index, faiss.IndexIVFPQ)}
    if not expected[kind]() or index.d not in (dim, dim + 1) or index.ntotal != ntotal:
        raise StoreMismatchError(
            f"{where}: a {type(index).__name__} of dimension {index.d} with {index.ntotal} vectors, but the manifest "
            f"says a {kind} index of dimension {dim} with {ntotal}; run build-index again"
        )


def write_index(index: Any, path: str | Path) -> None:
    import_faiss().write_index(index, str(path))


# -- choosing a kind and its knobs -------------------------------------------------------------
def resolve_kind(config: IndexConfig, num_samples: int, dim: int) -> IndexKind:
    """``auto``: exact ``flat`` while ``N·D ≤ AUTO_FLAT_LIMIT`` (1e8), else ``ivfpq``."""
    if config.kind is not IndexKind.AUTO:
        return config.kind
    return IndexKind.FLAT if num_samples * dim <= AUTO_FLAT_LIMIT else IndexKind.IVFPQ


def default_pq_bytes(dim: int) -> int:
    """The largest divisor of ``dim`` that is at most ``min(96, dim // 8)`` (96 bytes at D = 768)."""
    cap = max(1, min(96, dim // 8))
    return max(m for m in range(1, cap + 1) if dim % m == 0)


def resolve_build(config: IndexConfig, kind: IndexKind, num_samples: int, dim: int) -> dict[str, int]:
    """The build knobs with zeros replaced by the documented defaults for ``N`` and ``D``.

    bands = 8 from N ≥ 200,000, else 4; nlist (direction cells per band) = the power of two
    nearest √N / 2, within [4, 2048]; train_size = min(N, max(64·nlist, 20,000)).
    """
    bands = config.bands or (8 if num_samples >= 200_000 else 4)
    nlist = config.nlist or int(min(2048, max(4, 2 ** round(np.log2(max(1.0, np.sqrt(num_samples) / 2))))))
    train = min(config.train_size or max(64 * nlist, 20_000), num_samples)
    pq_bytes = config.pq_bytes or default_pq_bytes(dim)
    if kind is IndexKind.IVFPQ and dim % pq_bytes:
        raise ConfigError(f"--pq-bytes {pq_bytes}: must divide the dimension {dim}")
    if kind in (IndexKind.IVF, IndexKind.IVFPQ) and train < nlist:
        raise ConfigError(f"--train-size {train}: needs at least --nlist {nlist} rows (k-means; the store has "
                          f"{num_samples} vectors), lower --nlist")
    return {"bands": bands, "nlist": nlist, "train_size": train, "pq_bytes": pq_bytes}


# -- balancing ---------------------------------------------------------------------------------
class QueryTransform:
    """Per-group ``(G_g + λI)^(-1/2)`` (stored side) and ``(G_g + λI)^(1/2)`` (query side)."""

    def __init__(self, dims: Sequence[int], forward: Sequence[np.ndarray], backward: Sequence[np.ndarray]):
        self.dims = list(dims)
        self.forward = [np.asarray(m, np.float32) for m in forward]
        self.backward = [np.asarray(m, np.float32) for m in backward]
        self.offsets = np.concatenate([[0], np.cumsum(self.dims)]).astype(int)

    @classmethod
    def from_grams(cls, grams: Sequence[np.ndarray], damping: float | Sequence[float]) -> "QueryTransform":
        """From per-group Grams and the relative damping (one number, or one per group)."""
        forward, backward = [], []
        dampings = [float(damping)] * len(grams) if np.isscalar(damping) else [float(d) for d in damping]
        for gram, relative in zip(grams, dampings):
            k = gram.shape[0]
            lam = relative_lambda(gram, relative)
            values, vectors = np.linalg.eigh(np.asarray(gram, np.float64) + max(lam, 1e-12) * np.eye(k))
            values = np.clip(values, 1e-12 * max(values.max(), 1e-30), None)
            forward.append((vectors * values ** -0.5) @ vectors.T)
            backward.append((vectors * values ** 0.5) @ vectors.T)
        return cls([g.shape[0] for g in grams], forward, backward)

    def _apply(self, x: np.ndarray, mats: list[np.ndarray]) -> np.ndarray:
        out = np.empty((x.shape[0], self.offsets[-1]), np.float32)
        for i, m in enumerate(mats):
            a, b = self.offsets[i], self.offsets[i + 1]
            np.matmul(x[:, a:b], m, out=out[:, a:b])
        return out

    def stored(self, x: np.ndarray) -> np.ndarray:
        return self._apply(np.asarray(x, np.float32), self.forward)

    def query(self, u: np.ndarray) -> np.ndarray:
        return self._apply(np.asarray(u, np.float32), self.backward)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays :meth:`load` reads back (save them with ``store.write_arrays``)."""
        arrays = {"dims": np.asarray(self.dims)}
        for i, (f, b) in enumerate(zip(self.forward, self.backward)):
            arrays[f"forward{i}"], arrays[f"backward{i}"] = f, b
        return arrays

    @classmethod
    def load(cls, path: str | Path, info: Mapping[str, Any] | None = None) -> "QueryTransform":
        with np.load(path) as data:
            dims = [int(d) for d in data["dims"]]
            return cls(dims, [data[f"forward{i}"] for i in range(len(dims))],
                       [data[f"backward{i}"] for i in range(len(dims))])


# -- training ----------------------------------------------------------------------------------
def train_index(kind: IndexKind, sample: np.ndarray, knobs: Mapping[str, int], config: IndexConfig,
                ) -> tuple[Any, dict[str, Any]]:
    """The trained, empty index of a partition and its ``layout`` (band edges, directions)."""
    faiss = import_faiss()
    dim = sample.shape[1]
    if kind is IndexKind.FLAT:
        return faiss.IndexFlatIP(dim), {}
    norms = np.linalg.norm(sample, axis=1)
    if kind is IndexKind.HNSW:
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        return index, {}
    bands, nlist = knobs["bands"], knobs["nlist"]
    if len(sample) < nlist * MIN_POINTS_PER_CENTROID:
        # FAISS would print one such warning per k-means run to stderr (even under -q); one log line instead
        logger.info("k-means: %d training vectors for %d direction cells (FAISS advises at least %d); "
                       "consider a smaller --nlist or a larger --train-size", len(sample), nlist,
                       nlist * MIN_POINTS_PER_CENTROID)
    fractions = [1 - 0.5 ** i for i in range(1, bands)]
    edges = [float(e) for e in np.quantile(norms, fractions)] if len(norms) else []
    band_of = np.searchsorted(edges, norms, side="right")
    rho = np.array([float(np.median(norms[band_of == b])) if np.any(band_of == b) else 1.0 for b in range(bands)])
    directions = sample / np.maximum(norms, 1e-30)[:, None]
    kmeans = faiss.Kmeans(dim, nlist, niter=20, spherical=True, seed=config.seed + 1, verbose=False,
                          max_points_per_centroid=256, min_points_per_centroid=1)  # warned above
    kmeans.train(np.ascontiguousarray(directions, np.float32))
    dirs = np.ascontiguousarray(kmeans.centroids, np.float32)
    centroids = np.concatenate([rho[b] * dirs for b in range(bands)]).astype(np.float32)
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(centroids)
    if kind is IndexKind.IVF:
        index = faiss.IndexIVFFlat(quantizer, dim, bands * nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, bands * nlist, knobs["pq_bytes"], 8, faiss.METRIC_INNER_PRODUCT)
        pq_rows = sample[:PQ_TRAIN_ROWS]
        if len(pq_rows) < PQ_CENTROIDS:
            raise ConfigError(f"ivfpq: its 8-bit codes need at least {PQ_CENTROIDS} training vectors, the store has "
                              f"{len(pq_rows)} in the sample; use --kind ivf or flat (or a larger --train-size)")
        lists = assign_lists(pq_rows, dirs, edges)
        residuals = np.ascontiguousarray(pq_rows - centroids[lists], np.float32)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # 256-centroid k-means in dim/m dims: threads only add contention
        try:
            index.pq.cp.niter = 20
            index.pq.cp.min_points_per_centroid = 1  # no FAISS stderr warning per sub-quantizer
            if len(pq_rows) < PQ_CENTROIDS * MIN_POINTS_PER_CENTROID:
                logger.info("ivfpq: %d training vectors for %d-centroid product quantizers (FAISS advises at "
                               "least %d)", len(pq_rows), PQ_CENTROIDS, PQ_CENTROIDS * MIN_POINTS_PER_CENTROID)
            index.pq.train(residuals)
        finally:
            faiss.omp_set_num_threads(threads)
    index.is_trained = True
    index.own_fields = True
    quantizer.this.disown()
    layout = {"bands": bands, "nlist": nlist, "edges": edges, "rho": rho.tolist()}
    return index, {"layout": layout, "directions": dirs, "cells": CellStats.fit(sample, dirs)}


def assign_lists(x: np.ndarray, directions: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Inverted list ``band·nlist + best direction`` of each row of ``x``."""
    norms = np.linalg.norm(x, axis=1)
    band = np.searchsorted(np.asarray(edges), norms, side="right")
    best = np.argmax(x @ directions.T, axis=1)
    return (band * len(directions) + best).astype(np.int64)


def banded_directions(index: Any, layout: Mapping[str, Any]) -> np.ndarray:
    """Unit direction centroids of a banded IVF index (band 0's centroids divided by ρ_0)."""
    faiss = import_faiss()
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, layout["nlist"])
    return np.ascontiguousarray(centroids / np.float32(layout["rho"][0]), np.float32)


class PartBuilder:
    """Fills a copy of the trained index with one part's vectors, batch by batch."""

    def __init__(self, kind: IndexKind, trained: Any, extras: Mapping[str, Any]):
        faiss = import_faiss()
        self.kind = kind
        self.index = faiss.clone_index(trained)  # FAISS ids = row numbers in the part (flat, hnsw: implicit)
        self.layout = dict(extras.get("layout", {}))
        self.directions = extras.get("directions")
        self.rows = 0
        cells = self.layout.get("bands", 0) * self.layout.get("nlist", 0)
        self.cell_max = np.zeros(cells, np.float32)  # largest norm of each list (band·nlist + c)
        self.cell_count = np.zeros(cells, np.int64)
        self.facts = {"cell_min": np.full(cells, np.inf), "cell_cos": np.ones(cells), "cell_radius": np.zeros(cells),
                      "cell_pq_error": np.zeros(cells)}  # certify.CellBounds, over the rows as scored
        if self.layout:
            ivf = faiss.extract_index_ivf(self.index)
            self.centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
            self.query_directions = banded_directions(self.index, self.layout)

    def add(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, np.float32)
        rows = np.arange(self.rows, self.rows + len(x), dtype=np.int64)
        self.rows += len(x)
        if self.kind in (IndexKind.FLAT, IndexKind.HNSW):
            self.index.add(x)
        else:
            faiss = import_faiss()
            lists = assign_lists(x, self.directions, self.layout["edges"])
            scored, decoded = x, None  # ivfpq scores exactly against float16 copies of x
            if self.kind is IndexKind.IVFPQ:
                scored = x.astype(np.float16).astype(np.float32)
                pq = faiss.downcast_index(self.index).pq
                decoded = pq.decode(pq.compute_codes(np.ascontiguousarray(x - self.centroids[lists]))) \
                    + self.centroids[lists]
            np.maximum.at(self.cell_max, lists, np.linalg.norm(scored, axis=1))
            self.cell_count += np.bincount(lists, minlength=len(self.cell_count))
            record_cells(lists, scored, self.query_directions, np.asarray(self.layout["rho"]), self.centroids,
                         decoded, self.facts)
            self.index.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(rows), faiss.swig_ptr(lists))

    def info(self) -> dict[str, Any]:
        """Per-part search facts: each band's and each cell's largest norm and size (banded kinds)."""
        if self.layout:
            bands = self.layout["bands"]
            return {"band_max": [float(v) for v in self.cell_max.reshape(bands, -1).max(1)],
                    "band_count": self.cell_count.reshape(bands, -1).sum(1).tolist(),
                    "cell_max": [float(v) for v in self.cell_max], "cell_count": self.cell_count.tolist(),
                    **cell_facts(self.facts, self.cell_count, self.kind is IndexKind.IVFPQ)}
        return {}


def cell_facts(facts: Mapping[str, np.ndarray], count: np.ndarray, pq: bool) -> dict[str, list[float]]:
    """The certifying bounds' per-list facts as JSON lists (empty lists: neutral values)."""
    out = {"cell_min": np.where(count > 0, facts["cell_min"], 0.0), "cell_cos": facts["cell_cos"],
           "cell_radius": facts["cell_radius"]}
    if pq:
        out["cell_pq_error"] = facts["cell_pq_error"]
    return {name: [float(v) for v in values] for name, values in out.items()}


# -- searching ---------------------------------------------------------------------------------
class PartIndex:
    """One loaded part: ``search(u [n, D], k) -> TopK`` in the stored space (scores = ``u·v``)."""

    def __init__(self, index: Any, kind: str, dim: int, info: Mapping[str, Any], transform: QueryTransform | None,
                 vectors: np.ndarray | None, search: SearchConfig, device: str = "cpu", name: str = "",
                 sample_ids: np.ndarray | None = None, layout: Mapping[str, Any] | None = None,
                 directions: np.ndarray | None = None, cells: CellStats | None = None):
        self.kind = IndexKind(kind)
        self.dim = dim
        self.info = dict(info)
        self.transform = transform
        self.vectors = vectors
        self.search_config = search
        self.name = name
        self.sample_ids = sample_ids
        self.layout = dict(layout or {})
        self.directions = directions
        self.cells = cells
        if self.kind in (IndexKind.IVF, IndexKind.IVFPQ):
            if cells is None or "cell_max" not in self.info:
                raise StoreMismatchError(f"index part {name}: built by an older gradindex (no cell statistics); "
                                         "run build-index again")
            self.cell_max = np.asarray(self.info["cell_max"], np.float32)
            self.cell_count = np.asarray(self.info["cell_count"], np.int64)
        self.bounds = CellBounds.from_info(self.info, self.layout) if self.layout else None
        self._members = None  # CellMembers, on the first search that continues a scan
        self.cpu_index = index
        self.device = device
        self._thread_control = None
        self.index = to_gpu(index, self.kind) if device == "cuda" else index

    @property
    def ntotal(self) -> int:
        return int(self.cpu_index.ntotal)

    def with_search(self, search: SearchConfig) -> "PartIndex":
        other = object.__new__(PartIndex)
        other.__dict__.update(self.__dict__)
        other.search_config = search
        return other

    def _ids(self, rows: np.ndarray) -> np.ndarray:
        if self.sample_ids is None:
            return rows
        return np.where(rows >= 0, self.sample_ids[np.clip(rows, 0, None)], -1)

    def search(self, vectors: np.ndarray, k: int) -> TopK:
        require_positive(k, "k", numpy_ok=True)
        u = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if u.ndim != 2 or u.shape[1] != self.dim:
            raise ConfigError(f"query vectors: expected shape [n, {self.dim}], got {u.shape}")
        k = int(k)
        if self.ntotal == 0:
            return TopK(np.full((len(u), k), -np.inf, np.float32), np.full((len(u), k), -1, np.int64))
        with self._threads(len(u)):
            q = self.transform.query(u) if self.transform is not None else u
            if self.kind is IndexKind.FLAT:
                scores, rows = flat_search(self.index, q, min(k, self.ntotal))
                report = Report.of(len(q), True, 0, self.ntotal)
            elif self.kind is IndexKind.HNSW and self.search_config.certified:  # no graph bound: a flat scan
                storage = import_faiss().downcast_index(self.cpu_index.storage)
                scores, rows = flat_search(storage, q, min(k, self.ntotal))
                report = Report.of(len(q), True, 0, self.ntotal)
            elif self.kind is IndexKind.HNSW:
                scores, rows = self._search_hnsw(q, k)
                report = Report.of(len(q), False, 0, scores.shape[1] if self.vectors is not None else 0)
            else:
                scores, rows, report = self._search_banded(q, k)
        top = canonical_order(scores, self._ids(rows), min(k, scores.shape[1]))
        if top.k < k:
            pad = k - top.k
            top = TopK(np.concatenate([top.scores, np.full((len(u), pad), -np.inf, np.float32)], 1),
                       np.concatenate([top.sample_ids, np.full((len(u), pad), -1, np.int64)], 1))
        return top.with_evidence(report.certified, report.cells, report.reranked)

    def _threads(self, queries: int):
        """One BLAS / OpenMP thread for small batches: their products are too small to share, and
        waking (or spinning) a second thread cost a batch-1 query 3× its time on a busy 2-core box."""
        if queries > SINGLE_THREAD_QUERIES or self.device != "cpu":
            return nullcontext()
        if self._thread_control is None:
            from threadpoolctl import ThreadpoolController

            self._thread_control = ThreadpoolController()
        return self._thread_control.limit(limits=1)

    # exact re-scoring of candidate rows (-1 = none) against the kept float16 vectors
    def _rescore(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact scores ``[n, c]`` of candidate ``rows [n, c]`` (-1 = none: ``-inf``) for ``q [n, D]``,
        a few queries at a time (the gathered float32 candidates stay under ``RESCORE_FLOATS``)."""
        import torch

        valid = rows >= 0
        safe = np.where(valid, rows, 0)
        scores = np.empty(rows.shape, np.float32)
        step = max(1, RESCORE_FLOATS // max(1, rows.shape[1] * self.dim))
        for start in range(0, len(rows), step):
            block = safe[start:start + step]
            gathered = half_to_float(np.take(self.vectors, block.reshape(-1), axis=0))
            gathered = gathered.reshape(block.shape[0], block.shape[1], self.dim)
            scores[start:start + step] = torch.bmm(gathered, torch.from_numpy(q[start:start + step])[:, :, None])[:, :, 0]
        return np.where(valid, scores, -np.inf).astype(np.float32)

    def _rerank_depth(self, k: int) -> int:
        return max(k, self.search_config.rerank or DEFAULT_RERANK_PER_K * k)

    def _search_hnsw(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = import_faiss()
        ef = self.search_config.ef_search or DEFAULT_EF_SEARCH
        depth = min(self.ntotal, self._rerank_depth(k) if self.vectors is not None else k)
        params = faiss.SearchParametersHNSW(efSearch=max(ef, depth))
        scores, rows = self.cpu_index.search(q, depth, params=params)
        if self.vectors is not None:
            scores = self._rescore(q, rows)
        return np.where(rows >= 0, scores, -np.inf).astype(np.float32), rows

    def ranked_candidates(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """ivfpq with kept vectors: ``(exact scores, sample ids)`` ``[n, rerank]`` of the candidates a
        search re-scores, in PQ-score order (-1 = none); a search with a shallower ``rerank = r``
        re-scores exactly the first ``r`` of them (calibration measures every depth from one search)."""
        if self.kind is not IndexKind.IVFPQ or self.vectors is None:
            raise ConfigError(f"index part {self.name}: ranked candidates need an ivfpq part with kept vectors")
        u = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        q = self.transform.query(u) if self.transform is not None else u
        scores, rows = search_banded(
            self.index, q, k, self._rerank_depth(k), self.layout, self.directions, self.cells, self.cell_max,
            self.cell_count, self.search_config.nprobe or DEFAULT_NPROBE, self.search_config.prune, self._rescore,
        )
        return scores, self._ids(rows)

    def _search_banded(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, Report]:
        """The calibrated scan (:func:`search_banded`), then each query's own evidence checked and,
        unless ``adaptive`` is off, the scan continued in bound order where it is not certified, up to
        ``max_probe`` directions' worth of rows (no limit with ``certified``)."""
        config = self.search_config
        nprobe = config.nprobe or DEFAULT_NPROBE
        rerank = self.kind is IndexKind.IVFPQ and self.vectors is not None
        depth = self._rerank_depth(k) if rerank else k
        if config.certified and (self.bounds is None or (self.kind is IndexKind.IVFPQ and not rerank)):
            why = "built by an older gradindex" if self.bounds is None else "built without kept vectors"
            raise ConfigError(f"index part {self.name}: certified search needs per-cell bounds and exact rows "
                              f"({why}); run build-index again (ivfpq: keep its float16 vectors)")
        evidence: dict[str, Any] = {}
        scores, rows = search_banded(
            self.index, q, k, depth, self.layout, self.directions, self.cells, self.cell_max, self.cell_count,
            nprobe, config.prune, self._rescore if rerank else None, evidence,
        )
        top = canonical_order(scores, rows, min(k, scores.shape[1]))
        evidence["reranked"] = ((rows >= 0).sum(1) if rerank else
                                [int(self.cell_count[cells].sum()) for cells in evidence["scanned"]])
        if self.bounds is None or (self.kind is IndexKind.IVFPQ and not rerank):
            return top.scores, top.sample_ids, Report(np.zeros(len(q), bool), np.array(
                [len(c) for c in evidence["scanned"]], np.int64), np.asarray(evidence["reranked"], np.int64))
        if self._members is None:
            self._members = CellMembers(self.cpu_index, self.vectors, half_to_float, self.bounds.max_norm)
        nlist = int(self.layout["nlist"])
        extra = max(0, (config.max_probe or DEFAULT_MAX_PROBE_FACTOR * nprobe) - nprobe)
        budget = np.inf if config.certified else extra * float(self.cell_count.sum()) / nlist if config.adaptive else 0
        return certify_batch(q, k, top.scores, top.sample_ids, evidence, self.bounds, self.directions,
                             self._members, rerank, budget, 0 if config.certified else PATIENCE)


FLAT_GEMM_MIN_QUERIES = 2  # from this many queries on, a CPU flat part is searched by matrix products
FLAT_GEMM_BLOCK_ROWS = 1 << 16  # stored vectors per product (bounds the [n, rows] score block)


def flat_search(index: Any, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``(scores [n, k], rows [n, k])`` of the largest inner products of ``q [n, D]`` in a flat index.

    FAISS scans the stored vectors once per query below its BLAS threshold
    (``faiss.cvar.distance_compute_blas_threshold``: 128 000 queries in FAISS 1.15), so a batch costs
    as much as its queries one by one. From
    :data:`FLAT_GEMM_MIN_QUERIES` queries on, a CPU ``IndexFlat`` is read in place (no copy) and
    searched by one matrix product per block of :data:`FLAT_GEMM_BLOCK_ROWS` stored vectors (torch),
    the block top-k merged as it goes: the stored matrix is read once per batch. Scores may differ
    from FAISS's in the last float32 bits (another summation order).
    """
    faiss = import_faiss()
    if (len(q) < FLAT_GEMM_MIN_QUERIES or not isinstance(index, faiss.IndexFlat)
            or index.metric_type != faiss.METRIC_INNER_PRODUCT or index.ntotal == 0):
        return index.search(q, k)
    import torch

    stored = torch.from_numpy(faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d))
    queries = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    best_scores = torch.empty((len(q), 0), dtype=torch.float32)
    best_rows = torch.empty((len(q), 0), dtype=torch.int64)
    for start in range(0, index.ntotal, FLAT_GEMM_BLOCK_ROWS):
        block = queries @ stored[start:start + FLAT_GEMM_BLOCK_ROWS].T
        rows = torch.arange(start, start + block.shape[1]).expand(len(q), -1)
        best_scores, best_rows = _largest(torch.cat([best_scores, block], 1), torch.cat([best_rows, rows], 1), k)
    return best_scores.numpy(), best_rows.numpy()


def _largest(scores: "torch.Tensor", rows: "torch.Tensor", k: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The ``k`` largest ``scores`` of each row and their ``rows``; among equal scores the earlier
    columns win (as in FAISS's scan, lower rows first)."""
    import torch

    top, columns = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    kth = top[:, -1:]
    straddling = ((scores == kth).sum(1) > (top == kth).sum(1)).nonzero().flatten().tolist()
    for r in straddling:  # equal scores across the cut (rare): take them in column order
        columns[r] = torch.sort(scores[r], descending=True, stable=True).indices[:top.shape[1]]
        top[r] = scores[r, columns[r]]
    return top, torch.gather(rows, 1, columns)


def half_to_float(x: np.ndarray) -> "torch.Tensor":
    """float16 rows → a float32 torch tensor (torch's F16C path; numpy's astype is ~50× slower).

    Small inputs are converted in pieces below torch's parallel grain, so a batch-1 query
    does not wake the intra-op thread pool (milliseconds on a busy machine).
    """
    import torch

    with warnings.catch_warnings():  # read-only inputs (Parquet buffers, memory maps) are only read
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(np.ascontiguousarray(x))
    if source.numel() > (1 << 21):
        return source.float()
    out = torch.empty(source.shape, dtype=torch.float32)
    step = max(1, 16384 // max(1, source.shape[-1]))
    for start in range(0, source.shape[0], step):
        out[start:start + step] = source[start:start + step]
    return out


def to_gpu(index: Any, kind: IndexKind) -> Any:
    """The index on GPU 0 (float16 storage for flat and IVF lists: half the memory, same top-k in tests)."""
    faiss = import_faiss()
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = kind in (IndexKind.FLAT, IndexKind.IVF)
    if kind is IndexKind.HNSW:
        return index  # FAISS has no GPU HNSW; the CPU graph answers
    return faiss.index_cpu_to_gpu(resources, 0, index, options)
