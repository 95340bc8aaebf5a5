"""`gradindex serve --ray`: the HTTP API on Ray Serve over a two-node cluster on this machine.

``ray.cluster_utils.Cluster`` with 1 CPU per node, every node and Serve's proxy bound to
127.0.0.1. The index has 3 parts; the two parts deployments (1 CPU each) must land on the two
nodes. The reference is `gradindex query --json` without Ray: the same objects.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from same_answer import assert_same_answers  # noqa: E402
from test_serve import get, post, query_json  # noqa: E402

from gradindex.cli import main  # noqa: E402
from gradindex.config import FeaturizeConfig, IndexConfig, ServeConfig  # noqa: E402
from gradindex.features.distributed import loopback_only  # noqa: E402
from gradindex.features.run import featurize  # noqa: E402
from gradindex.index import build_index, list_parts  # noqa: E402
from gradindex.serve.ray_serve import APP, deploy, parts_name  # noqa: E402
from gradindex.task import load_task  # noqa: E402

TINY = f"{Path(__file__).parent / 'tiny_task.py'}:TinyTask"  # a file spec: replicas import it by path

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, store, queries file, JSON inputs, ray): the tiny store (3 index parts) on Serve, two nodes."""
    root = tmp_path_factory.mktemp("serve-ray")
    task = load_task(TINY)
    checkpoint = task.train(root / "tiny.pt")
    store = featurize(task, root / "store", FeaturizeConfig(batch_size=4, shard_size=8), checkpoint=checkpoint,
                      show_progress=False)
    build_index(store, IndexConfig(shards_per_part=2), show_progress=False)
    assert len(list_parts(store)) == 3
    x, y = (t.numpy() for t in task.query_dataset().tensors)
    np.savez(root / "queries.npz", x=x, y=y)
    with loopback_only() as ray:
        from ray import serve
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "object_store_memory": 128 << 20})
        try:
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=128 << 20)
            ray.init(address=cluster.address, log_to_driver=False)
            try:
                url = deploy(store, ["all"], ServeConfig(port=free_port(), max_wait_ms=50), checkpoint=checkpoint)
                yield url, store, root / "queries.npz", {"x": x.tolist(), "y": y.tolist()}, ray
                serve.shutdown()
            finally:
                ray.shutdown()
        finally:
            cluster.shutdown()


def test_answers_equal_query_json_and_parts_span_both_nodes(served):
    url, store, queries, inputs, ray = served
    assert url.startswith("http://127.0.0.1:")
    for k in (1, 6, 100):  # 100 > the 40 stored vectors
        status, body = post(url, {"inputs": inputs, "k": k})
        assert status == 200, body
        assert_same_answers(body["results"], query_json(store.path, queries, k))
    from ray import serve

    placed = [serve.get_deployment_handle(parts_name("all", i), app_name=APP).describe.remote().result()
              for i in range(2)]
    assert sorted(p for d in placed for p in d["parts"]) == sorted(p.name for p in list_parts(store))
    assert len({d["node"] for d in placed}) == 2  # one parts deployment per node (1 CPU each)


def test_health_info_errors_and_batching(served):
    url, store, queries, inputs, _ = served
    assert get(url, "/v1/health") == {"status": "ok", "concepts": ["all"]}
    info = get(url, "/v1/info")
    assert info["num_samples"] == 40 and info["served"] == {"all": {"kind": "flat", "vectors": 40}}
    status, body = post(url, {"inputs": {"x": [[1.0, 2.0]], "y": [0]}})
    assert status == 400 and set(body) == {"error"} and "shape" in body["error"]
    status, body = post(url, b"{")
    assert status == 400 and "not valid JSON" in body["error"]

    reference = query_json(store.path, queries, 5)
    before = get(url, "/v1/info")["batching"]

    def one(row: int) -> tuple[int, int, dict]:
        return (row, *post(url, {"inputs": {"x": inputs["x"][row:row + 1], "y": inputs["y"][row:row + 1]}, "k": 5}))

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, [i % 8 for i in range(16)]))
    for row, status, body in answers:
        assert status == 200, body
        assert_same_answers(body["results"], [{**reference[row], "query": 0}])
    after = get(url, "/v1/info")["batching"]
    assert after["items"] - before["items"] == 16 and after["batches"] - before["batches"] < 16


def test_cli_serve_ray_refuses_port_zero(served):
    result = CliRunner().invoke(main, ["serve", str(served[1].path), "--port", "0", "--ray", "auto"])
    assert result.exit_code == 2 and "--port 0" in result.output
    assert get(served[0], "/v1/health")["status"] == "ok"
