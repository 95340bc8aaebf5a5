"""Opponents (the k most negative scores) against brute force bottom-k, on every index kind and through
the Attributor, `query --opponents` and `serve`'s ``"opponents": true``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from store_helpers import make_store
from test_index_kinds import N
from test_index_kinds import queries as kind_queries  # noqa: F401 (a fixture)
from test_index_kinds import store as kind_store  # noqa: F401 (a fixture)
from tiny_task import TinyTask

from gradindex.cli import main
from gradindex.config import IndexConfig, SearchConfig
from gradindex.index import build_index
from gradindex.index.topk import TopK, recall_at_k
from gradindex.query.attributor import Attributor
from gradindex.query.opponents import search_opponents


def brute_bottom_k(ids: np.ndarray, vectors: np.ndarray, q: np.ndarray, k: int) -> TopK:
    """The full score matrix sorted ascending (ties: ascending id) — the reference."""
    scores = (q.astype(np.float64) @ vectors.astype(np.float64).T)
    order = np.lexsort((np.broadcast_to(ids, scores.shape), scores), axis=-1)[:, :k]
    return TopK(np.take_along_axis(scores, order, 1), ids[order])


def stored(store) -> tuple[np.ndarray, np.ndarray]:
    ids, feats = store.read()
    return ids, np.concatenate([feats["a"], feats["b"]], 1)


# every kind; exact where the search is exact (flat, ivf probing every list, ivfpq re-ranking every row)
CASES = [
    ("flat", {}, None, True),
    ("ivf", {"nlist": 16}, SearchConfig(nprobe=16, prune=False), True),
    ("ivf", {"nlist": 16}, None, False),
    ("ivfpq", {"nlist": 8, "pq_bytes": 4}, SearchConfig(nprobe=8, rerank=N, prune=False), False),
    ("ivfpq", {"nlist": 8, "pq_bytes": 4}, None, False),
    ("hnsw", {}, None, False),
]


@pytest.mark.parametrize("kind,knobs,search,exact", CASES)
def test_opponents_equal_brute_force_bottom_k_on_every_kind(kind_store, kind_queries, kind, knobs, search, exact):
    store, q, k = kind_store, kind_queries, 10
    concept = f"opp-{kind}-{'x' if exact else 'a'}-{bool(search)}"
    index = build_index(store, IndexConfig(concept=concept, kind=kind, **knobs), show_progress=False)
    index = index.with_search(search) if search is not None else index
    got = search_opponents(index, q, k)
    want = brute_bottom_k(*stored(store), q, k)
    assert np.all(want.scores[:, 0] < 0)  # the queries have negative scores to find
    assert np.all(np.diff(got.scores, axis=1) >= -1e-5)  # ascending: rank 1 is the most negative
    if exact:
        np.testing.assert_array_equal(got.sample_ids, want.sample_ids)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-4)
        return
    # approximate kinds: the same recall bar as their proponents (tests/test_index_kinds.py), measured the same
    proponents = index.search(q, k)
    top_recall = recall_at_k(proponents, brute_top_k(*stored(store), q, k))
    bottom_recall = recall_at_k(got, want)
    assert bottom_recall >= (0.99 if search is not None else min(0.9, top_recall - 0.05)), (bottom_recall, top_recall)
    if kind != "ivfpq" or search is not None:  # reported scores are exact inner products (re-ranked kinds)
        ids, vectors = stored(store)
        rows = np.searchsorted(ids, got.sample_ids)
        np.testing.assert_allclose(got.scores, np.einsum("nkd,nd->nk", vectors[rows], q), rtol=1e-2, atol=1e-3)


def brute_top_k(ids, vectors, q, k) -> TopK:
    low = brute_bottom_k(ids, vectors, -q, k)
    return TopK(-low.scores, low.sample_ids)


def test_fewer_stored_rows_than_k_pads_with_minus_one(kind_store, kind_queries):
    index = build_index(kind_store, IndexConfig(concept="opp-pad"), show_progress=False)
    got = search_opponents(index, kind_queries[:2], N + 5)
    assert got.k == N  # the index clips k to its size, as for proponents
    assert sorted(got.sample_ids[0].tolist()) == sorted(stored(kind_store)[0].tolist())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("opp-tiny")
    path = make_store(root)
    np.savez(root / "q.npz", x=TinyTask().x[40:44], y=TinyTask().y[40:44])
    return path, root / "q.npz"


def test_attributor_cli_json_and_table_agree_with_all_scores(tiny):
    path, inputs = tiny
    attributor = Attributor.open(path, trust_task=True)
    try:
        items = attributor.task.load_queries(inputs)
        top, bottom = attributor.attribute_both(items, k=3)
        vectors = attributor.query_vectors(items)
        ids, feats = attributor.store.read()
        stored_vectors = np.concatenate([feats[g] * np.sqrt(attributor.weights.weights[g])
                                         for g in attributor.groups], 1)
    finally:
        attributor.close()
    want = brute_bottom_k(ids, stored_vectors, vectors, 3)
    np.testing.assert_array_equal(bottom.sample_ids, want.sample_ids)
    np.testing.assert_allclose(bottom.scores, want.scores, rtol=1e-4, atol=1e-6)
    result = CliRunner().invoke(main, ["-q", "query", str(path), "--inputs", str(inputs), "-k", "3", "--json",
                                       "--opponents", "--trust-task"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines()]
    assert [[r["sample_id"] for r in rec["opponents"]] for rec in records] == want.sample_ids.tolist()
    assert [[r["sample_id"] for r in rec["results"]] for rec in records] == top.sample_ids.tolist()
    assert [r["rank"] for r in records[0]["opponents"]] == [1, 2, 3]
    np.testing.assert_allclose([[r["score"] for r in rec["opponents"]] for rec in records], want.scores, rtol=1e-4)
    plain = CliRunner().invoke(main, ["-q", "query", str(path), "--inputs", str(inputs), "-k", "3", "--json",
                                      "--trust-task"], catch_exceptions=False)
    assert all("opponents" not in json.loads(line) for line in plain.output.splitlines())
    table = CliRunner().invoke(main, ["-q", "query", str(path), "--inputs", str(inputs), "-k", "3", "--opponents",
                                      "--trust-task"], catch_exceptions=False)
    assert table.exit_code == 0 and table.output.count("opponents (most negative first):") == 4


def test_serve_engine_answers_opponents_on_request(tiny):
    from gradindex.serve.engine import AttributionEngine

    path, inputs = tiny
    x, y = np.load(inputs)["x"], np.load(inputs)["y"]
    engine = AttributionEngine.open(path, trust_task=True)
    try:
        body = {"inputs": {"x": x.tolist(), "y": y.tolist()}, "k": 3}
        both = engine.answer([engine.parse({**body, "opponents": True}), engine.parse(body)])
        with pytest.raises(Exception, match="opponents must be true or false"):
            engine.parse({**body, "opponents": "yes"})
    finally:
        engine.close()
    cli = CliRunner().invoke(main, ["-q", "query", str(path), "--inputs", str(inputs), "-k", "3", "--json",
                                    "--opponents", "--trust-task"], catch_exceptions=False)
    expected = [json.loads(line) for line in cli.output.splitlines()]
    assert [r["opponents"] for r in both[0]] == [r["opponents"] for r in expected]
    assert all("opponents" not in r for r in both[1])
    assert [r["results"] for r in both[1]] == [r["results"] for r in expected]
