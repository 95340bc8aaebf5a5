"""The pruning bound of the norm-banded IVF kinds: ``‖q‖·max‖x‖`` over a cell may only skip
cells that cannot enter the top-k, whatever order the cells are scanned in.

With ``nprobe = nlist`` every cell is within the scan budget, so the only thing that can
drop a result is the bound. Each adversarial store below is searched under many cell orders
(the order comes from the part's :class:`CellStats`: random ones, and ones that scan a chosen
cell last) and must give exactly the flat index's top-k. A looser bound — a cell's median
norm instead of its maximum, or skipping a cell whose bound only ties the k-th score — gives
a wrong answer on these stores.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradindex.config import IndexConfig, SearchConfig
from gradindex.index import build_index
from gradindex.index.probe import CellStats
from gradindex.store.feature_store import FeatureStore, commit_manifest, prepare_store, write_shard
from store_helpers import minimal_manifest

DIM = 8


def make_store(path, x: np.ndarray) -> FeatureStore:
    """A one-group store holding ``x [n, DIM]`` (sample ids 0..n-1)."""
    path = prepare_store(path)
    shard = write_shard(path, 0, np.arange(len(x)), {"g": x.astype(np.float32)})
    commit_manifest(path, minimal_manifest([shard.to_dict()], {"g": DIM}))
    return FeatureStore.open(path)


def hidden_store(seed: int = 0) -> tuple[np.ndarray, int]:
    """2,000 heavy-tailed vectors with no component along e₀ except moderate ones in the upper
    bands, and one vector along e₀ just below the lowest band edge: the best answer to ``q = e₀``
    hides in the band whose typical norm is far below its largest."""
    rng = np.random.default_rng(seed)
    n = 2000
    x = rng.normal(size=(n, DIM))
    x[:, 0] = 0
    x *= (rng.lognormal(0, 2.0, n) / np.linalg.norm(x, axis=1))[:, None]
    norms = np.linalg.norm(x, axis=1)
    edge = np.median(norms)
    upper = norms > edge
    x[upper, 0] = 0.5 * edge * rng.random(upper.sum())
    hidden = int(np.argmin(np.where(norms < edge, edge - norms, np.inf)))  # the band-0 vector nearest the edge
    x[hidden] = 0
    x[hidden, 0] = 0.99 * edge
    return x, hidden


def tie_store(seed: int = 1) -> tuple[np.ndarray, int]:
    """Three vectors with the best score ``s`` for ``q = e₀`` in three bands (equal e₀ component,
    growing orthogonal parts; every other vector scores below 0): id 0 is the plain ``s·e₀`` just
    below the lowest band edge, the largest norm of its cell, so its bound ``‖q‖·s`` only *ties*
    the best score found elsewhere."""
    rng = np.random.default_rng(seed)
    n = 1200
    x = rng.normal(size=(n, DIM))
    x[:, 0] = -np.abs(x[:, 0])
    x *= (rng.lognormal(0, 1.5, n) / np.linalg.norm(x, axis=1))[:, None]
    tied = np.array([0, 40, 80])  # score exactly s each
    others = np.setdiff1d(np.arange(n), tied)
    orthogonal = rng.normal(size=(len(tied) - 1, DIM - 1)) * np.array([[2.0], [30.0]]) / np.sqrt(DIM - 1)
    s = float(np.median(np.linalg.norm(x, axis=1)))
    for _ in range(20):  # s between the largest other norm below the lowest edge (the median) and the edge
        x[tied] = 0
        x[tied, 0] = s
        x[tied[1:], 1:] = orthogonal * s
        norms = np.linalg.norm(x, axis=1)
        edge = float(np.median(norms))
        s = (float(norms[others][norms[others] < edge].max()) + edge) / 2
    return x, 0


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = (q.astype(np.float64) @ x.T.astype(np.float64))
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


def orders(part, rng, last_cells: list[int]) -> list[CellStats]:
    """Cell statistics giving random scan orders, and orders that scan the direction of each of
    ``last_cells`` last (zero estimate there, a positive spread elsewhere)."""
    nlist = part.directions.shape[0]
    eye = np.eye(DIM, dtype=np.float32)
    out = [CellStats(rng.normal(size=(nlist, DIM)).astype(np.float32), eye, rng.random((nlist, DIM)).astype(np.float32))
           for _ in range(12)]
    for cell in last_cells:
        variance = np.ones((nlist, DIM), np.float32)
        variance[cell % nlist] = 0
        out.append(CellStats(np.zeros((nlist, DIM), np.float32), eye, variance))
    return out


def check_every_order(index, x: np.ndarray, queries: np.ndarray, k: int, last_cells: list[int]) -> None:
    want_scores, want_ids = exact_top(x, queries, k)
    part = index.parts[0]
    rng = np.random.default_rng(3)
    search = SearchConfig(nprobe=part.layout["nlist"], prune=True)
    for stats in orders(part, rng, last_cells):
        part.cells = stats
        got = index.with_search(search).search(queries, k)
        np.testing.assert_allclose(got.scores, want_scores, rtol=1e-5, atol=1e-6)
        assert_same_up_to_ties(x, queries, got.sample_ids, want_scores, want_ids)


def assert_same_up_to_ties(x, queries, got_ids, want_scores, want_ids) -> None:
    """The returned ids score the exact top-k scores, and every id scoring above the k-th is there."""
    for q, got, scores, want in zip(queries, got_ids, want_scores, want_ids):
        np.testing.assert_allclose(x[got] @ q, scores, rtol=1e-5, atol=1e-6)
        above = scores > scores[-1] + 1e-6 * abs(scores[-1]) + 1e-9
        assert set(want[above].tolist()) <= set(got.tolist())


def cell_of(index, x: np.ndarray, row: int) -> int:
    from gradindex.index.kinds import assign_lists

    part = index.parts[0]
    return int(assign_lists(x[row:row + 1].astype(np.float32), part.directions, part.layout["edges"])[0])


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_hidden_large_norm_in_a_low_band_is_found_in_any_order(tmp_path, kind):
    x, hidden = hidden_store()
    store = make_store(tmp_path / "s", x)
    config = IndexConfig(concept="b", kind=kind, nlist=4, bands=4, balance="off", pq_bytes=4)
    index = build_index(store, config, show_progress=False, search=SearchConfig(rerank=len(x)))
    cell = cell_of(index, x, hidden)
    assert cell // 4 == 0  # the lowest band, whose median norm is far below its largest
    queries = np.eye(DIM, dtype=np.float32)[:1] * np.float32(3.0)
    if kind == "ivfpq":  # re-ranking every candidate: scores are exact (float16 copies)
        part = index.parts[0]
        for stats in orders(part, np.random.default_rng(3), [cell]):
            part.cells = stats
            got = index.with_search(SearchConfig(nprobe=4, rerank=len(x))).search(queries, 1)
            assert got.sample_ids[0, 0] == hidden
        return
    check_every_order(index, x, queries, 1, [cell])
    check_every_order(index, x, queries, 10, [cell])


def test_ties_across_bands(tmp_path):
    x, first = tie_store()
    store = make_store(tmp_path / "s", x)
    index = build_index(store, IndexConfig(concept="t", kind="ivf", nlist=4, bands=4, balance="off"),
                        show_progress=False)
    bands = {cell_of(index, x, row) // 4 for row in range(0, len(x), 40)}
    assert len(bands) >= 3  # the tied vectors straddle band boundaries
    part = index.parts[0]
    assert part.info["cell_max"][cell_of(index, x, first)] == np.float32(x[first, 0])  # its bound ties exactly
    queries = np.eye(DIM, dtype=np.float32)[:1]
    check_every_order(index, x, queries, 1, [cell_of(index, x, first)])
    check_every_order(index, x, queries, 3, [cell_of(index, x, first)])  # all three tied vectors
    check_every_order(index, x, queries, 6, [cell_of(index, x, first)])


def test_all_norms_equal(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(800, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = make_store(tmp_path / "s", x)
    index = build_index(store, IndexConfig(concept="e", kind="ivf", nlist=4, bands=4, balance="off"),
                        show_progress=False)
    queries = rng.normal(size=(6, DIM)).astype(np.float32)
    check_every_order(index, x, queries, 7, [])


def test_every_band_boundary_of_a_heavy_tailed_store(tmp_path):
    """Queries along each band's largest vector and along the vectors either side of each edge."""
    rng = np.random.default_rng(5)
    n = 3000
    x = rng.normal(size=(n, DIM)) @ np.diag(np.geomspace(1, 0.1, DIM))
    x *= (rng.lognormal(0, 1.5, n) / np.linalg.norm(x, axis=1))[:, None]
    store = make_store(tmp_path / "s", x)
    index = build_index(store, IndexConfig(concept="h", kind="ivf", nlist=4, bands=5, balance="off"),
                        show_progress=False)
    norms = np.linalg.norm(x, axis=1)
    edges = np.asarray(index.parts[0].layout["edges"])
    band = np.searchsorted(edges, norms.astype(np.float32), side="right")
    rows = [int(np.flatnonzero(band == b)[np.argmax(norms[band == b])]) for b in np.unique(band)]
    for edge in edges:
        rows += [int(np.argmin(np.where(norms < edge, edge - norms, np.inf))),
                 int(np.argmin(np.where(norms >= edge, norms - edge, np.inf)))]
    queries = (x[rows] / norms[rows, None]).astype(np.float32)
    queries = np.concatenate([queries, -queries, queries + rng.normal(size=queries.shape).astype(np.float32) * 0.3])
    check_every_order(index, x, queries, 1, [cell_of(index, x, r) for r in rows[:3]])
    check_every_order(index, x, queries, 10, [])
