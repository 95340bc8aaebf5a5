"""Certified and adaptive search of the banded IVF kinds against brute force.

``SearchConfig(certified=True)`` must return exactly the brute-force top-k (up to ties: the
returned ids score the exact k best scores, and every id scoring above the k-th is there) on
adversarial stores — huge-norm outliers, exact ties, all norms equal, duplicated vectors, a
vector hidden in a low band — and on random and clustered heavy-tailed stores, for ivf, ivfpq
(exact re-rank from the kept float16 rows) and hnsw (which falls back to a flat scan), whatever
nprobe / rerank says. The adaptive default must report ``certified`` only when its answer is exact,
and a query that is certified must not change when certified search is asked for.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradindex.config import IndexConfig, SearchConfig
from gradindex.index import build_index
from gradindex.index.certify import CellBounds
from gradindex.index.topk import concat_topk, merge_topk
from test_index_bound import DIM, hidden_store, make_store, tie_store

KINDS = ["ivf", "ivfpq", "hnsw"]


@pytest.fixture(autouse=True)
def one_cell_at_a_time(monkeypatch):
    """The certifying scan scores one cell per step, so that every stop it makes rests on a bound
    (with its default chunks these small stores would be scored whole in one step)."""
    monkeypatch.setattr("gradindex.index.certify.CHUNK_ROWS", 1)


def f16(x: np.ndarray) -> np.ndarray:
    """Rows exactly representable in float16: ivfpq's kept copies then equal the store."""
    return np.asarray(x, np.float16).astype(np.float32)


def heavy(seed: int, n: int = 3000, clusters: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)) @ np.diag(np.geomspace(1, 0.1, DIM))
    if clusters:
        centres = rng.normal(size=(clusters, DIM)) * 3
        x += centres[rng.integers(0, clusters, n)]
    return x * (rng.lognormal(0, 1.5, n) / np.linalg.norm(x, axis=1))[:, None]


def outliers(seed: int = 7) -> np.ndarray:
    x = heavy(seed, 2000)
    rng = np.random.default_rng(seed)
    x[rng.choice(len(x), 5, replace=False)] *= 1e3  # a few huge norms in the top band
    return x


def equal_norms(seed: int = 8) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(1500, DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def duplicated(seed: int = 9) -> np.ndarray:
    x = heavy(seed, 400)
    return np.concatenate([x, x, x, x[:100]])  # every vector 3-4 times: ties everywhere


STORES = {"hidden": lambda: hidden_store()[0], "ties": lambda: tie_store()[0], "outliers": outliers,
          "equal_norms": equal_norms, "duplicated": duplicated, "heavy": lambda: heavy(10),
          "clustered": lambda: heavy(11, clusters=6)}


def probe_queries(x: np.ndarray, seed: int) -> np.ndarray:
    """Axis directions (both signs), stored rows, their negations and noise, random vectors."""
    rng = np.random.default_rng(seed)
    rows = x[rng.choice(len(x), 6, replace=False)]
    eye = np.eye(DIM)
    q = np.concatenate([eye, -eye[:3], rows, -rows[:3], rows[:3] + rng.normal(size=(3, DIM)) * rows[:3].std(),
                        rng.normal(size=(6, DIM)) * rng.lognormal(0, 2, (6, 1))])
    return q.astype(np.float32)


def assert_exact_up_to_ties(x: np.ndarray, queries: np.ndarray, got, k: int) -> None:
    """``got`` (a TopK over sample ids = rows of ``x``) is a brute-force top-k of every query."""
    exact = queries.astype(np.float64) @ x.astype(np.float64).T  # [n, N]
    for i, (ids, scores) in enumerate(zip(got.sample_ids, got.scores)):
        want = np.sort(exact[i])[::-1][:k]
        assert len(set(ids.tolist())) == k and (ids >= 0).all(), (i, ids)
        tol = 1e-5 * np.abs(want).max() + 1e-9
        np.testing.assert_allclose(np.sort(exact[i, ids])[::-1], want, rtol=0, atol=tol, err_msg=f"query {i}")
        np.testing.assert_allclose(scores, exact[i, ids], rtol=0, atol=tol, err_msg=f"query {i}")
        above = np.flatnonzero(exact[i] > want[-1] + tol)
        assert set(above.tolist()) <= set(ids.tolist()), (i, sorted(set(above.tolist()) - set(ids.tolist())))


def build(tmp_path, x: np.ndarray, kind: str, name: str = "s", **config):
    store = make_store(tmp_path / name, f16(x))
    fields = {"nlist": 8, "bands": 4, "pq_bytes": 4, "balance": "off", **config}
    if kind == "hnsw":
        fields = {"balance": "off"}
    return build_index(store, IndexConfig(concept="c", kind=kind, **fields), show_progress=False)


@pytest.mark.parametrize("store_name", sorted(STORES))
@pytest.mark.parametrize("kind", KINDS)
def test_certified_equals_brute_force(tmp_path, store_name, kind):
    x = f16(STORES[store_name]())
    index = build(tmp_path, x, kind)
    queries = probe_queries(x, seed=len(store_name))
    for k in (1, 10):
        for knobs in ({"nprobe": 1, "rerank": k}, {"nprobe": 3}):  # the calibrated part alone would miss
            got = index.with_search(SearchConfig(certified=True, **knobs)).search(queries, k)
            assert_exact_up_to_ties(x, queries, got, k)
            assert got.certified.all()
            assert (got.rows_reranked > 0).all()


def test_certified_costs_less_than_a_full_scan_on_clustered_data(tmp_path):
    x = f16(heavy(12, n=6000, clusters=8))
    index = build(tmp_path, x, "ivfpq", nlist=16)
    queries = x[:20] * 1.5
    got = index.with_search(SearchConfig(certified=True)).search(queries, 10)
    assert_exact_up_to_ties(x, queries, got, 10)
    assert np.median(got.rows_reranked) < len(x) / 2  # the bounds prune
    assert (got.cells_scanned < 16 * 4).all()


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_adaptive_reports_certified_only_when_exact(tmp_path, kind):
    x = f16(heavy(13, n=4000, clusters=5))
    index = build(tmp_path, x, kind)
    rng = np.random.default_rng(0)
    queries = np.concatenate([x[:30], rng.normal(size=(30, DIM)) * 3]).astype(np.float32)
    exact = index.with_search(SearchConfig(certified=True)).search(queries, 10)
    for knobs in ({"nprobe": 1, "rerank": 10, "adaptive": False}, {"nprobe": 1, "rerank": 10, "max_probe": 1}, {"nprobe": 1, "rerank": 10, "max_probe": 2},
                  {"nprobe": 2}, {}):
        got = index.with_search(SearchConfig(**knobs)).search(queries, 10)
        sure = got.certified
        assert_exact_up_to_ties(x, queries[sure], got.select(sure), 10)
        np.testing.assert_array_equal(got.sample_ids[sure], exact.sample_ids[sure])
    off = index.with_search(SearchConfig(nprobe=1, rerank=10, adaptive=False)).search(queries, 10)
    on = index.with_search(SearchConfig(nprobe=1, rerank=10, max_probe=8)).search(queries, 10)
    assert on.certified.mean() > off.certified.mean() and not off.certified.all()
    assert (on.rows_reranked >= off.rows_reranked).all()


def test_adaptive_stops_when_scanning_changes_nothing(tmp_path, monkeypatch):
    """Patience: the adaptive default gives up (uncertified) after a step that leaves its top-k as it
    was, so it scans less than certified search on a store whose bounds barely prune."""
    monkeypatch.setattr("gradindex.index.certify.ADAPTIVE_CHUNK_ROWS", 64)
    x = f16(equal_norms())
    index = build(tmp_path, x, "ivfpq")
    queries = probe_queries(x, 2)
    sure = index.with_search(SearchConfig(nprobe=2, rerank=100, certified=True)).search(queries, 10)
    quick = index.with_search(SearchConfig(nprobe=2, rerank=100, max_probe=8)).search(queries, 10)
    assert quick.rows_reranked.sum() < sure.rows_reranked.sum()
    assert_exact_up_to_ties(x, queries[quick.certified], quick.select(quick.certified), 10)


def test_budget_stops_uncertified(tmp_path):
    x = f16(equal_norms())  # no norm skew and 8 directions: bounds barely prune
    index = build(tmp_path, x, "ivfpq")
    queries = probe_queries(x, 0)
    got = index.with_search(SearchConfig(nprobe=1, rerank=10, max_probe=1)).search(queries, 10)
    assert not got.certified.all()


def test_bounds_hold_for_every_member(tmp_path):
    """Each cell's bound is at least the largest exact score of its members, for every query."""
    x = f16(outliers())
    for kind in ("ivf", "ivfpq"):
        part = build(tmp_path, x, kind, name=kind).parts[0]
        bounds = CellBounds.from_info(part.info, part.layout)
        queries = probe_queries(x, 1)
        upper = bounds.upper(queries, part.directions)
        from gradindex.index.kinds import assign_lists

        lists = assign_lists(x, part.directions, part.layout["edges"])
        scores = queries.astype(np.float64) @ x.T.astype(np.float64)
        for cell in np.unique(lists):
            assert (scores[:, lists == cell].max(1) <= upper[:, cell]).all(), cell
        if kind == "ivfpq":
            assert bounds.pq_error is not None and (bounds.pq_error > 0).any()


def test_sharded_and_flat_evidence(tmp_path):
    x = f16(heavy(14, 1200))
    flat = build(tmp_path, x, "flat", name="f")
    got = flat.search(x[:4], 5)
    assert got.certified.all() and (got.rows_reranked == len(x)).all()
    a = got.select(slice(0, 2))
    merged = merge_topk([a, a.with_evidence([True, False], [1, 2], [3, 4])], 5)
    assert merged.certified.tolist() == [True, False] and merged.rows_reranked.tolist() == [len(x) + 3, len(x) + 4]
    assert concat_topk([a, a]).certified.tolist() == [True, True, True, True]


def test_old_part_without_bounds_refuses_certified(tmp_path):
    from gradindex.errors import ConfigError

    x = f16(heavy(15, 800))
    index = build(tmp_path, x, "ivf")
    part = index.parts[0]
    part.bounds = None
    got = index.search(x[:2], 3)
    assert not got.certified.any()
    with pytest.raises(ConfigError, match="run build-index again"):
        index.with_search(SearchConfig(certified=True)).search(x[:2], 3)
