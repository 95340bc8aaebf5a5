"""Ray paths on a two-node cluster on this machine (``ray.cluster_utils.Cluster``, 1 CPU per
node, every node bound to 127.0.0.1): distributed featurize and sharded query against
single-process references, with work landing on both nodes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from gradindex.config import FeaturizeConfig, IndexConfig  # noqa: E402
from gradindex.features.distributed import featurize_ray, loopback_only  # noqa: E402
from gradindex.index.ray_search import RayIndex  # noqa: E402
from gradindex.features.run import featurize  # noqa: E402
from gradindex.index import GradIndex, build_index  # noqa: E402
from gradindex.task import load_task  # noqa: E402
from same_answer import assert_same_ranking  # noqa: E402

CONFIG = FeaturizeConfig(batch_size=4, shard_size=8)
TINY = f"{Path(__file__).parent / 'tiny_task.py'}:TinyTask"


@pytest.fixture(scope="module")
def two_nodes():
    with loopback_only() as ray:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
            ray.init(address=cluster.address, log_to_driver=False)
            try:
                yield ray
            finally:
                ray.shutdown()
        finally:
            cluster.shutdown()


def test_two_nodes_on_loopback(two_nodes):
    nodes = [n for n in two_nodes.nodes() if n["Alive"]]
    assert len(nodes) == 2 and {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}


def test_featurize_and_query_across_two_nodes(two_nodes, tmp_path):
    task = load_task(TINY)
    checkpoint = task.train(tmp_path / "tiny.pt")
    reference = featurize(task, tmp_path / "single", CONFIG, checkpoint=checkpoint, show_progress=False)
    store = featurize_ray(task, tmp_path / "ray", CONFIG, checkpoint=checkpoint, show_progress=False,
                          max_retries=1, fail_shards=[4])  # one worker dies on the way and is replaced
    ids, feats = store.read()
    ref_ids, ref_feats = reference.read()
    np.testing.assert_array_equal(ids, ref_ids)
    for group, block in ref_feats.items():
        np.testing.assert_array_equal(feats[group], block)
    assert [s["sha256"] for s in store.manifest["shards"]] == [s["sha256"] for s in reference.manifest["shards"]]
    assert store.manifest["gram"] == reference.manifest["gram"]
    assert store.manifest["ray"]["workers"] == 2 and store.manifest["ray"]["nodes"] == 2  # both nodes worked

    shutil.rmtree(tmp_path / "single")
    build_index(store, IndexConfig(shards_per_part=2), show_progress=False)
    queries = np.random.default_rng(1).normal(size=(16, store.dim)).astype(np.float32)
    expected = GradIndex.open(store).search(queries, 7)
    with RayIndex.open(store) as index:
        placed = index.describe()
        assert len({actor["node"] for actor in placed}) == 2  # one actor per node
        top = index.search(queries, 7)
    assert_same_ranking(top.sample_ids, top.scores, expected.sample_ids, expected.scores)
