"""A Ray cluster with no shared disk, and its store on S3 (a real SeaweedFS server on 127.0.0.1).

Two loopback nodes (``ray.cluster_utils.Cluster``, 1 CPU each), each with its own
``GRADINDEX_HOME`` (so its own cache) and temporary folder; the store exists only in the bucket.
Ray workers featurize into S3 (one of them is killed mid-shard and replaced), the driver builds the
index from S3, and Ray actors on both nodes load the index parts from S3 into their own caches and
answer queries. Every shard, the Gram file and every answer equal a single-process local run's.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from gradindex.features.distributed import featurize_ray, loopback_only  # noqa: E402
from gradindex.features.run import featurize  # noqa: E402
from gradindex.index import GradIndex, build_index  # noqa: E402
from gradindex.index.ray_search import RayIndex  # noqa: E402
from gradindex.query.ray import open_ray_attributor
from gradindex.config import IndexConfig  # noqa: E402
from gradindex.query.attributor import Attributor  # noqa: E402
from gradindex.store.feature_store import FeatureStore  # noqa: E402
from gradindex.task import load_task  # noqa: E402
from s3_server import BUCKET  # noqa: E402
from same_answer import assert_same_ranking  # noqa: E402
from store_helpers import CONFIG  # noqa: E402
from test_s3_store import local_files, objects  # noqa: E402

TINY = f"{Path(__file__).parent / 'tiny_task.py'}:TinyTask"


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """Two Ray nodes on 127.0.0.1, each with its own GRADINDEX_HOME and TMPDIR; the S3 settings in
    every node's environment (and this driver's). Yields ``(ray, {node name: its home})``."""
    root = tmp_path_factory.mktemp("s3-ray")
    homes = {name: root / name for name in ("head", "worker")}
    for home in homes.values():
        (home / "tmp").mkdir(parents=True)
    s3 = s3_server.env(GRADINDEX_LEASE_SECONDS="3")
    saved = dict(os.environ)
    os.environ.update(s3)
    try:
        with loopback_only() as ray:
            from ray.cluster_utils import Cluster

            def node_env(name: str) -> dict[str, str]:
                return {**s3, "GRADINDEX_HOME": str(homes[name]), "GRADINDEX_CACHE": "",
                        "TMPDIR": str(homes[name] / "tmp")}

            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
                "env_vars": node_env("head")})
            try:
                cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", env_vars=node_env("worker"))
                ray.init(address=cluster.address, log_to_driver=False)
                try:
                    yield ray, homes
                finally:
                    ray.shutdown()
            finally:
                cluster.shutdown()
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.slow
def test_a_cluster_without_a_shared_disk_featurizes_indexes_and_queries_through_s3(cluster, s3_server, tmp_path):
    ray, homes = cluster
    task = load_task(TINY)
    checkpoint = task.train(tmp_path / "tiny.pt")  # the model file every node loads (the store is the subject)
    uri = f"s3://{BUCKET}/ray-{uuid.uuid4().hex[:8]}"
    reference = featurize(task, tmp_path / "local", CONFIG, checkpoint=checkpoint, show_progress=False)
    store = featurize_ray(task, uri, CONFIG, checkpoint=checkpoint, show_progress=False, max_retries=1,
                          fail_shards=[2])  # one worker dies mid-shard and is replaced
    assert store.path == uri
    assert store.manifest["ray"]["nodes"] == 2  # both nodes wrote shards, straight to the bucket
    assert store.manifest["shards"] == reference.manifest["shards"]
    assert store.manifest["gram"] == reference.manifest["gram"]
    remote, local = objects(s3_server, uri), local_files(tmp_path / "local")
    assert sorted(remote) == sorted(local)
    assert all(remote[name] == local[name] for name in local if name != "manifest.json")

    config = IndexConfig(shards_per_part=2)
    build_index(store, config, show_progress=False)  # read from S3 (this driver's cache)
    build_index(reference, config, show_progress=False)
    queries = np.random.default_rng(3).normal(size=(12, store.dim)).astype(np.float32)
    expected = GradIndex.open(reference).search(queries, 6)
    with RayIndex.open(uri) as index:
        assert len({actor["node"] for actor in index.describe()}) == 2  # parts held on both nodes
        top = index.search(queries, 6)
    assert_same_ranking(top.sample_ids, top.scores, expected.sample_ids, expected.scores)
    for name, home in homes.items():  # each node fetched its parts from S3 into its own cache
        assert list((home / "cache").rglob("*.faiss")), name
    assert not any(p.name == "manifest.json" for home in homes.values() for p in home.rglob("*"))

    attributor = open_ray_attributor(FeatureStore.open(uri, trust_task=True), checkpoint=checkpoint)
    try:
        got = attributor.attribute(task.query_dataset(), k=5)
    finally:
        attributor.close()
    local_attributor = Attributor.open(tmp_path / "local", checkpoint=checkpoint, trust_task=True)
    want = local_attributor.attribute(task.query_dataset(), k=5)
    local_attributor.close()
    assert_same_ranking(got.sample_ids, got.scores, want.sample_ids, want.scores)

    # serve --ray from the bucket: the parts deployments on both nodes answer what a local query does
    pytest.importorskip("ray.serve")
    pytest.importorskip("fastapi")
    from ray import serve

    from gradindex.config import ServeConfig
    from gradindex.serve.ray_serve import deploy
    from same_answer import assert_same_answers
    from test_serve import post, query_json
    from test_serve_ray import free_port

    x, y = (t.numpy() for t in task.query_dataset().tensors)
    np.savez(tmp_path / "queries.npz", x=x, y=y)
    url = deploy(FeatureStore.open(uri, trust_task=True), ["all"], ServeConfig(port=free_port(), max_wait_ms=0),
                 checkpoint=checkpoint)
    try:
        status, body = post(url, {"inputs": {"x": x.tolist(), "y": y.tolist()}, "k": 5})
    finally:
        serve.shutdown()
    assert status == 200, body
    assert_same_answers(body["results"], query_json(tmp_path / "local", tmp_path / "queries.npz", 5))
