"""Index kinds (flat, norm-banded ivf / ivfpq, hnsw) against exact search; knobs; eval recall."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from gradindex.cli import main
from gradindex.config import IndexConfig, SearchConfig
from gradindex.errors import ConfigError
from gradindex.index.topk import exact_topk, recall_at_k
from gradindex.eval.evaluate import index_recall
from gradindex.index import GradIndex, build_index, list_parts
from gradindex.index.kinds import default_pq_bytes, resolve_build, resolve_kind
from gradindex.config import IndexKind
from gradindex.features.precondition import GramAccumulator
from gradindex.store.feature_store import FeatureStore, commit_manifest, prepare_store, write_arrays, write_shard
from store_helpers import minimal_manifest

GROUPS = {"a": 24, "b": 16}
N, SHARD = 3000, 1000


def synthetic_features(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Low-rank, clustered directions with log-normal norms (gradient-like heavy tails)."""
    rng = np.random.default_rng(seed)
    dim = sum(GROUPS.values())
    centers = rng.normal(size=(12, dim))
    basis = rng.normal(size=(10, dim)) * np.linspace(3, 0.3, 10)[:, None]
    x = centers[rng.integers(0, 12, n)] + rng.normal(size=(n, 10)) @ basis * 0.5
    x *= (rng.lognormal(0, 1.0, n) / np.linalg.norm(x, axis=1))[:, None]
    return {"a": x[:, :24].astype(np.float32), "b": x[:, 24:].astype(np.float32)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = prepare_store(tmp_path_factory.mktemp("kinds") / "store")
    feats = synthetic_features(N)
    gram = GramAccumulator(GROUPS, 4096)
    shards = []
    for i, start in enumerate(range(0, N, SHARD)):
        block = {g: f[start:start + SHARD] for g, f in feats.items()}
        gram.update(block)
        ids = np.arange(start, start + SHARD) * 3 + 7  # ids are not row numbers
        shards.append(write_shard(path, i, ids, block).to_dict())
    sha = write_arrays(path / "gram.npz", {f"g{i}": m for i, m in enumerate(gram.result().values())})
    commit_manifest(path, minimal_manifest(shards, GROUPS, gram={"sha256": sha, "count": N}))
    return FeatureStore.open(path)


@pytest.fixture(scope="module")
def queries():
    q = synthetic_features(40, seed=5)
    return np.concatenate([q["a"], q["b"]], axis=1) * -1.0


def exact(store, queries, k=10):
    ids, feats = store.read()
    return exact_topk(queries, [(ids, np.concatenate([feats["a"], feats["b"]], 1))], k)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw"])
def test_each_kind_round_trips_to_disk_and_answers(store, queries, kind):
    config = IndexConfig(concept=f"k{kind}", kind=kind, nlist=8, pq_bytes=8, shards_per_part=2)
    built = build_index(store, config, show_progress=False)
    assert built.kind == kind and built.ntotal == N and [p.shards for p in list_parts(store, f"k{kind}")] == [(0, 1), (2,)]
    reopened = GradIndex.open(FeatureStore.open(store.path), f"k{kind}")
    got, again = built.search(queries, 10), reopened.search(queries, 10)
    np.testing.assert_array_equal(got.sample_ids, again.sample_ids)
    np.testing.assert_allclose(got.scores, again.scores, rtol=1e-6)
    want = exact(store, queries)
    assert recall_at_k(got, want) >= (1.0 if kind in ("flat", "ivf") else 0.9)
    # reported scores are exact inner products with the stored vectors (re-ranked / exact kinds)
    if kind != "ivfpq":
        ids, feats = store.read()
        vectors = np.concatenate([feats["a"], feats["b"]], 1)
        rows = np.searchsorted(ids, got.sample_ids)
        np.testing.assert_allclose(got.scores, np.einsum("nkd,nd->nk", vectors[rows], queries), rtol=1e-3, atol=1e-4)


def test_ivf_recall_at_nprobe_nlist_is_one_with_and_without_pruning(store, queries):
    index = build_index(store, IndexConfig(concept="ivf", kind="ivf", nlist=16), show_progress=False)
    want = exact(store, queries)
    for prune in (False, True):
        full = index.with_search(SearchConfig(nprobe=16, prune=prune)).search(queries, 10)
        assert recall_at_k(full, want) == 1.0
        np.testing.assert_allclose(full.scores, want.scores, rtol=1e-4, atol=1e-5)
    one = SearchConfig(nprobe=1, adaptive=False)
    assert recall_at_k(index.with_search(one).search(queries, 10), want) < 1.0
    result = index_recall(store, "ivf", query_vectors=queries, k=10, search=SearchConfig(nprobe=16))
    assert result.recall == 1.0 and result.kind == "ivf" and result.queries == 40
    assert result.worst == 1.0 and result.p5 == 1.0 and result.certified == 1.0
    low = index_recall(store, "ivf", query_vectors=queries, k=10, search=one)
    assert low.recall < 1.0 and low.worst <= low.p5 <= low.recall and low.certified < 1.0
    adaptive = index.with_search(SearchConfig(nprobe=1, max_probe=16)).search(queries, 10)
    assert recall_at_k(adaptive, want) >= low.recall and (adaptive.rows_reranked >= 0).all()
    certified = index.with_search(SearchConfig(nprobe=1, certified=True)).search(queries, 10)
    assert certified.certified.all() and recall_at_k(certified, want) == 1.0


def test_ivfpq_full_rerank_recovers_exact_top_k_and_balance_keeps_inner_products(store, queries):
    index = build_index(store, IndexConfig(concept="pq", kind="ivfpq", nlist=8, pq_bytes=4), show_progress=False)
    want = exact(store, queries)
    deep = index.with_search(SearchConfig(nprobe=8, rerank=N, prune=False)).search(queries, 10)
    assert recall_at_k(deep, want) >= 0.99  # float16 re-rank copies: near-ties may swap
    assert index.entry["transform"]["kind"] == "balance"
    flat_balanced = build_index(store, IndexConfig(concept="fb", kind="flat", balance="on"), show_progress=False)
    got = flat_balanced.search(queries, 10)
    assert recall_at_k(got, want) == 1.0
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-3, atol=1e-4)


def test_sharded_ivf_equals_single_ivf(store, queries):
    single = build_index(store, IndexConfig(concept="s1", kind="ivf", nlist=8), show_progress=False)
    sharded = build_index(store, IndexConfig(concept="s3", kind="ivf", nlist=8, shards_per_part=1), show_progress=False)
    assert len(sharded.parts) == 3
    for search in (SearchConfig(nprobe=2, prune=False), SearchConfig(nprobe=8)):
        a, b = single.with_search(search).search(queries, 10), sharded.with_search(search).search(queries, 10)
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)


def test_half_to_float_matches_numpy():
    from gradindex.index.kinds import half_to_float

    for shape in ((3, 40), (700, 40), (60_000, 40)):  # pieces, and one call above the parallel threshold
        x = np.random.default_rng(0).normal(size=shape).astype(np.float16)
        np.testing.assert_array_equal(half_to_float(x).numpy(), x.astype(np.float32))


def test_auto_rule_and_bad_knobs_give_clear_errors(store):
    assert resolve_kind(IndexConfig(), 100_000, 1000) is IndexKind.FLAT
    assert resolve_kind(IndexConfig(), 100_001, 1000) is IndexKind.IVFPQ
    assert resolve_build(IndexConfig(), IndexKind.IVFPQ, 1_000_000, 768) == \
        {"bands": 8, "nlist": 512, "train_size": 32_768, "pq_bytes": 96}
    assert default_pq_bytes(768) == 96 and default_pq_bytes(40) == 5 and default_pq_bytes(512) == 64
    with pytest.raises(ConfigError, match="IndexConfig.nlist: expected a non-negative integer"):
        IndexConfig(nlist=-1)
    with pytest.raises(ConfigError, match="IndexConfig.kind: expected one of auto, flat, ivf, ivfpq, hnsw"):
        IndexConfig(kind="lsh")
    with pytest.raises(ConfigError, match="SearchConfig.nprobe"):
        SearchConfig(nprobe=-2)
    with pytest.raises(ConfigError, match="--pq-bytes 7: must divide the dimension 40"):
        build_index(store, IndexConfig(concept="bad", kind="ivfpq", pq_bytes=7), show_progress=False)
    with pytest.raises(ConfigError, match="needs at least --nlist 64 rows"):
        build_index(store, IndexConfig(concept="bad", kind="ivf", nlist=64, train_size=10), show_progress=False)
    runner = CliRunner()
    result = runner.invoke(main, ["build-index", str(store.path), "--kind", "ivf", "--shards", "x"])
    assert result.exit_code == 2 and "--shards: expected shard numbers" in result.output
    result = runner.invoke(main, ["build-index", str(store.path), "--kind", "ivf", "--nlist", "-3"])
    assert result.exit_code == 2 and "IndexConfig.nlist" in result.output
    result = runner.invoke(main, ["build-index", str(store.path), "--update", "--train-only"])
    assert result.exit_code == 2 and "exclude each other" in result.output


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_gpu_kinds_match_cpu(store, queries, kind):
    config = IndexConfig(concept=f"gpu{kind}", kind=kind, nlist=8, pq_bytes=8, device="cuda")
    gpu = build_index(store, config, show_progress=False)
    assert gpu.device == "cuda"
    cpu = GradIndex.open(FeatureStore.open(store.path), f"gpu{kind}", device="cpu")
    search = SearchConfig(nprobe=8)
    a, b = gpu.with_search(search).search(queries, 10), cpu.with_search(search).search(queries, 10)
    assert recall_at_k(a, b) >= 0.95  # float16 storage on the GPU may swap near-ties
    np.testing.assert_allclose(a.scores[:, 0], b.scores[:, 0], rtol=1e-2, atol=1e-3)
