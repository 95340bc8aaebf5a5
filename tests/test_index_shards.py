"""Sharded index parts: exact merge, sharded flat == single flat, incremental add == rebuild."""

from __future__ import annotations

import numpy as np
import pytest

from gradindex.config import FeaturizeConfig, IndexConfig, Preconditioner
from gradindex.errors import ConfigError
from gradindex.index.topk import exact_topk
from gradindex.features.run import featurize
from gradindex.index import GradIndex, ShardedIndex, build_index, list_parts, open_part
from gradindex.store.feature_store import FeatureStore
from gradindex.index.topk import TopK, merge_topk
from gradindex.weights.group_weights import GroupWeights, scaled_vectors
from store_helpers import featurized
from tiny_task import TinyTask


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return featurized(tmp_path_factory.mktemp("shards"), FeaturizeConfig(shard_size=8))


def exact(store, queries, k):
    ids, feats = store.read()
    vectors = scaled_vectors(feats, GroupWeights.uniform("all", store.groups), store.groups)
    return exact_topk(queries, [(ids, vectors)], k)


def test_merge_topk_is_exact_and_breaks_ties_by_sample_id():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 40)).astype(np.float32)
    scores[:, 10:20] = scores[:, :10]  # ties across parts
    ids = np.tile(rng.permutation(40), (5, 1))
    full = TopK(scores, ids)
    splits = [slice(0, 7), slice(7, 25), slice(25, 40)]
    parts = []
    for s in splits:  # each part answers its own top-6 in some order
        part_scores, part_ids = scores[:, s], ids[:, s]
        order = np.argsort(-part_scores, axis=1)[:, :6]
        parts.append(TopK(np.take_along_axis(part_scores, order, 1), np.take_along_axis(part_ids, order, 1)))
    merged = merge_topk(parts[::-1], 6)
    for q in range(5):  # reference: sort (score desc, id asc) over everything
        pairs = sorted(zip(-scores[q].astype(np.float64), ids[q]))[:6]
        np.testing.assert_array_equal(merged.sample_ids[q], [i for _, i in pairs])
        np.testing.assert_allclose(merged.scores[q], [-s for s, _ in pairs])
    assert merge_topk(parts, 6).sample_ids.tolist() == merged.sample_ids.tolist()  # order of parts is irrelevant
    padded = merge_topk([TopK(np.array([[1.0]], np.float32), np.array([[7]]))], 3)
    assert padded.sample_ids.tolist() == [[7, -1, -1]] and padded.scores[0, 1] == -np.inf
    with pytest.raises(ConfigError, match="positive integer"):
        merge_topk(parts, 0)
    with pytest.raises(ConfigError, match="different numbers of queries"):
        merge_topk([parts[0], TopK(scores[:2, :3], ids[:2, :3])], 3)
    assert full.k == 40


def test_sharded_flat_equals_single_flat(store):
    config = IndexConfig(kind="flat", preconditioner=Preconditioner.IDENTITY)
    queries = np.random.default_rng(1).normal(size=(7, store.dim)).astype(np.float32)
    single = build_index(store, config, show_progress=False)
    assert [p.shards for p in list_parts(store, "all")] == [(0, 1, 2, 3, 4)]
    want = single.search(queries, 12)
    sharded = build_index(store, IndexConfig(kind="flat", preconditioner=Preconditioner.IDENTITY, shards_per_part=2),
                          show_progress=False)
    parts = list_parts(store, "all")
    assert [p.shards for p in parts] == [(0, 1), (2, 3), (4,)]
    assert [p.ntotal for p in parts] == [16, 16, 8]
    got = sharded.search(queries, 12)
    np.testing.assert_array_equal(got.sample_ids, want.sample_ids)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-6)
    ref = exact(store, queries, 12)
    np.testing.assert_array_equal(got.sample_ids, ref.sample_ids)
    # parts opened one by one (as the Ray fan-out does) and merged give the same answer
    reopened = FeatureStore.open(store.path)
    by_hand = merge_topk([open_part(reopened, "all", p).search(queries, 12) for p in list_parts(reopened, "all")], 12)
    np.testing.assert_array_equal(by_hand.sample_ids, want.sample_ids)
    assert GradIndex is ShardedIndex and ShardedIndex.open(reopened).ntotal == 40
    one = open_part(reopened, "all", "part-00004-00004").search(queries, 12)
    assert one.k == 12 and (one.sample_ids[:, 8:] == -1).all()  # a part with 8 vectors pads with -1


def test_parts_built_one_at_a_time_and_incremental_update_equal_a_rebuild(store, tmp_path):
    config = IndexConfig(kind="flat", preconditioner=Preconditioner.IDENTITY)
    queries = np.random.default_rng(2).normal(size=(5, store.dim)).astype(np.float32)
    want = exact(store, queries, 9)
    assert build_index(store, config, train_only=True, show_progress=False).ntotal == 0
    build_index(store, config, shards=[0, 1, 2], show_progress=False)  # one machine's part
    assert ShardedIndex.open(store).ntotal == 24
    with pytest.raises(ConfigError, match="already in parts"):
        build_index(store, config, shards=[2, 3], show_progress=False)
    build_index(store, config, shards=[3], show_progress=False)  # another machine's part
    updated = build_index(store, config, update=True, show_progress=False)  # the rest
    assert [p.shards for p in list_parts(store, "all")] == [(0, 1, 2), (3,), (4,)]
    got = updated.search(queries, 9)
    np.testing.assert_array_equal(got.sample_ids, want.sample_ids)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
    assert build_index(store, config, update=True, show_progress=False).ntotal == 40  # nothing new: unchanged
    with pytest.raises(ConfigError, match="shards 0..4"):
        build_index(store, config, shards=[9], show_progress=False)


def test_featurize_append_then_update_equals_a_rebuild(tmp_path):
    from click.testing import CliRunner

    from gradindex.cli import main
    from gradindex.features.append import featurize_append

    task = TinyTask()
    checkpoint = task.train(tmp_path / "tiny.pt")
    config = FeaturizeConfig(shard_size=8)
    grown = featurize(task, tmp_path / "grown", config, checkpoint=checkpoint, limit=24, show_progress=False)
    index_config = IndexConfig(kind="flat", preconditioner=Preconditioner.IDENTITY)
    build_index(grown, index_config, show_progress=False)
    grown, added = featurize_append(task, grown.path, checkpoint=checkpoint, show_progress=False)
    assert added == 16 and grown.num_samples == 40 and len(grown.manifest["shards"]) == 5
    assert featurize_append(task, grown.path, checkpoint=checkpoint, show_progress=False)[1] == 0
    full = featurize(task, tmp_path / "full", config, checkpoint=checkpoint, show_progress=False)
    ids_a, feats_a = grown.read()
    ids_b, feats_b = full.read()
    np.testing.assert_array_equal(ids_a, ids_b)
    for group in full.groups:
        np.testing.assert_allclose(feats_a[group], feats_b[group], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grown.read_gram()[group], full.read_gram()[group], rtol=1e-5, atol=1e-7)
    first_part = list_parts(grown, "all")[0]
    result = CliRunner().invoke(main, ["-q", "build-index", str(grown.path), "--kind", "flat",
                                       "--preconditioner", "identity", "--update"])
    assert result.exit_code == 0, result.output
    grown = FeatureStore.open(grown.path)
    parts = list_parts(grown, "all")
    assert [p.shards for p in parts] == [(0, 1, 2), (3, 4)] and parts[0] == first_part  # old part untouched
    queries = np.random.default_rng(3).normal(size=(6, grown.dim)).astype(np.float32)
    rebuilt = build_index(full, index_config, show_progress=False).search(queries, 10)
    got = GradIndex.open(grown).search(queries, 10)
    np.testing.assert_array_equal(got.sample_ids, rebuilt.sample_ids)
    np.testing.assert_allclose(got.scores, rebuilt.scores, rtol=1e-5, atol=1e-6)
    result = CliRunner().invoke(main, ["eval", "recall", str(grown.path), "-k", "5", "--queries", "4", "--json",
                                       "--trust-task"])
    assert result.exit_code == 0, result.output
    assert '"recall": 1.0' in result.output
