"""Flat FAISS partition against exact blockwise top-k (tie-aware), and the GPU path."""

from __future__ import annotations

import numpy as np
import pytest

from gradindex.config import FeaturizeConfig, IndexConfig, Preconditioner
from gradindex.errors import ArtifactNotFoundError, ConfigError, StoreMismatchError
from gradindex.index.topk import exact_topk, recall_at_k
from gradindex.features.run import featurize
from gradindex.index import GradIndex, build_index
from gradindex.weights.group_weights import GroupWeights, scaled_vectors
from store_helpers import featurized
from tiny_task import TinyTask


def assert_same_topk(got, want, atol=1e-5):
    """Scores equal rank by rank; ids equal wherever the score is not tied with a neighbour."""
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=atol)
    for q in range(len(want)):
        s = want.scores[q]
        for r in range(want.k):
            tied = (r > 0 and abs(s[r] - s[r - 1]) <= atol) or (r + 1 < want.k and abs(s[r] - s[r + 1]) <= atol)
            if not tied:
                assert got.sample_ids[q, r] == want.sample_ids[q, r], (q, r)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return featurized(tmp_path_factory.mktemp("flat"), FeaturizeConfig(shard_size=16))


def test_flat_index_equals_exact_blockwise_topk(store):
    index = build_index(store, IndexConfig(preconditioner=Preconditioner.IDENTITY), show_progress=False)
    ids, feats = store.read()
    vectors = scaled_vectors(feats, GroupWeights.uniform("all", store.groups), store.groups)
    queries = np.random.default_rng(0).normal(size=(6, store.dim)).astype(np.float32)
    queries[5] = 0  # every score ties at zero
    blocks = [(ids[i:i + 7], vectors[i:i + 7]) for i in range(0, len(ids), 7)]
    exact = exact_topk(queries, blocks, k=10)
    got = index.search(queries, 10)
    assert_same_topk(got, exact)
    # and the exact reference against a plain argsort of the full score matrix
    full = queries @ vectors.T
    order = np.argsort(-full[:5], axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(exact.scores[:5], np.take_along_axis(full[:5], order, 1), rtol=1e-5)
    untied = lambda top: type(top)(top.scores[:5], top.sample_ids[:5])  # noqa: E731 (row 5 is all ties)
    assert recall_at_k(untied(got), untied(exact)) == 1.0


def test_flat_batches_by_matrix_products_equal_exact_topk(store, monkeypatch):
    """From FLAT_GEMM_MIN_QUERIES queries on, flat parts are searched by blocked matrix products."""
    from gradindex.index import kinds

    monkeypatch.setattr(kinds, "FLAT_GEMM_BLOCK_ROWS", 7)  # many blocks: the running merge is exercised
    index = build_index(store, IndexConfig(preconditioner=Preconditioner.IDENTITY), show_progress=False)
    ids, feats = store.read()
    vectors = scaled_vectors(feats, GroupWeights.uniform("all", store.groups), store.groups)
    queries = np.random.default_rng(2).normal(size=(3 * kinds.FLAT_GEMM_MIN_QUERIES, store.dim)).astype(np.float32)
    queries[0] = 0  # every score ties at zero
    blocks = [(ids[i:i + 5], vectors[i:i + 5]) for i in range(0, len(ids), 5)]
    for k in (2, 10, 40):  # (k 1 would leave row 0's tie undetectable by assert_same_topk)
        batched = index.search(queries, k)
        assert_same_topk(batched, exact_topk(queries, blocks, k=k))
        one_by_one = [index.search(queries[i:i + 1], k) for i in range(len(queries))]  # FAISS's own scan
        assert_same_topk(batched, type(batched)(np.concatenate([t.scores for t in one_by_one]),
                                                np.concatenate([t.sample_ids for t in one_by_one])))
        assert batched.sample_ids[0].tolist() == sorted(ids.tolist())[:k]  # a tie: the lowest ids, in order


def test_reopened_index_answers_the_same_and_checks_itself(store):
    built = build_index(store, IndexConfig(concept="all"), show_progress=False)
    queries = np.random.default_rng(1).normal(size=(3, store.dim)).astype(np.float32)
    reopened = GradIndex.open(store, "all")
    assert_same_topk(reopened.search(queries, 5), built.search(queries, 5))
    assert reopened.search(queries, 1000).k == 40  # k is capped at the number of vectors
    with pytest.raises(ConfigError, match="positive integer"):
        reopened.search(queries, 0)
    with pytest.raises(ConfigError, match="expected shape"):
        reopened.search(queries[:, :3], 5)
    with pytest.raises(ArtifactNotFoundError, match="no index for concept 'style'"):
        GradIndex.open(store, "style")
    path = store.path / store.manifest["indexes"]["all"]["parts"][0]["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreMismatchError, match="checksum"):
        GradIndex.open(store, "all")
    build_index(store, IndexConfig(concept="all"), show_progress=False)


def test_recall_counts_overlap():
    from gradindex.index import TopK

    exact = TopK(np.zeros((2, 3)), np.array([[1, 2, 3], [4, 5, 6]]))
    approx = TopK(np.zeros((2, 3)), np.array([[3, 2, 9], [-1, -1, -1]]))
    assert recall_at_k(approx, exact) == pytest.approx((2 / 3 + 0) / 2)


@pytest.mark.gpu
def test_gpu_index_and_gpu_featurize_match_cpu(store, tmp_path):
    task = TinyTask()
    checkpoint = task.train(tmp_path / "tiny.pt")
    cpu = featurize(task, tmp_path / "cpu", checkpoint=checkpoint, show_progress=False)
    gpu = featurize(task, tmp_path / "gpu", checkpoint=checkpoint, device="cuda", show_progress=False)
    for group, block in cpu.read()[1].items():
        np.testing.assert_allclose(gpu.read()[1][group], block, rtol=1e-4, atol=1e-5)
    index_cpu = build_index(cpu, IndexConfig(device="cpu"), show_progress=False)
    index_gpu = build_index(cpu, IndexConfig(concept="gpu", device="cuda"), show_progress=False)
    assert index_gpu.device == "cuda"
    queries = np.random.default_rng(2).normal(size=(4, cpu.dim)).astype(np.float32)
    assert_same_topk(index_gpu.search(queries, 5), index_cpu.search(queries, 5), atol=1e-3)
