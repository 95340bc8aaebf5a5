"""Ray paths on a local cluster bound to 127.0.0.1 with 2 CPUs (started once for the file).

References are single-process runs: the distributed store must equal `featurize`'s
bit for bit, a killed worker must leave nothing that looks complete, and a rerun
must fill exactly the gap.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("ray")

from gradindex.cli import main  # noqa: E402
from gradindex.config import FeaturizeConfig, IndexConfig  # noqa: E402
from gradindex.features.distributed import featurize_ray, local_ray  # noqa: E402
from gradindex.index.ray_search import RayIndex  # noqa: E402
from gradindex.errors import ArtifactNotFoundError, GradIndexError  # noqa: E402
from gradindex.features.run import featurize  # noqa: E402
from gradindex.index import GradIndex, build_index, list_parts  # noqa: E402
from gradindex.query.attributor import Attributor  # noqa: E402
from gradindex.store.feature_store import MANIFEST, FeatureStore, completed_shard, shard_name  # noqa: E402
from gradindex.task import load_task  # noqa: E402
from gradindex.weights.group_weights import GroupWeights, save_weights, scaled_vectors  # noqa: E402
from same_answer import assert_same_ranking  # noqa: E402

CONFIG = FeaturizeConfig(batch_size=4, shard_size=8)  # 40 examples -> 5 shards
TINY = f"{Path(__file__).parent / 'tiny_task.py'}:TinyTask"  # a file spec: Ray workers import it by path


@pytest.fixture(scope="module")
def cluster():
    """Started while RAY_ADDRESS names a cluster that does not exist (as a leftover
    /tmp/ray/ray_current_cluster does): a bare --ray must still start its own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ADDRESS", "127.0.0.1:9")
        with local_ray(num_cpus=2, object_store_memory=256 << 20, log_to_driver=False) as ray:  # small CI /dev/shm
            assert ray.cluster_resources()["CPU"] == 2
            yield ray


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(task, checkpoint, single-process reference store)."""
    folder = tmp_path_factory.mktemp("tiny")
    task = load_task(TINY)
    checkpoint = task.train(folder / "tiny.pt")
    reference = featurize(task, folder / "single", CONFIG, checkpoint=checkpoint, show_progress=False)
    return task, checkpoint, reference


def assert_same_store(store: FeatureStore, reference: FeatureStore) -> None:
    ids, feats = store.read()
    ref_ids, ref_feats = reference.read()
    np.testing.assert_array_equal(ids, ref_ids)
    assert len(np.unique(ids)) == len(ids)  # every sample id exactly once
    for group, block in ref_feats.items():
        assert feats[group].dtype == block.dtype
        np.testing.assert_array_equal(feats[group], block)  # bit for bit
    assert [s["sha256"] for s in store.manifest["shards"]] == [s["sha256"] for s in reference.manifest["shards"]]
    assert store.manifest["gram"] == reference.manifest["gram"]
    assert store.manifest["run_key"] == reference.manifest["run_key"]
    assert store.manifest["groups"] == reference.manifest["groups"]
    assert not list(store.path.rglob("*.tmp-*"))


def test_distributed_featurize_equals_single_process(cluster, tiny, tmp_path):
    task, checkpoint, reference = tiny
    store = featurize_ray(task, tmp_path / "ray", CONFIG, checkpoint=checkpoint, show_progress=False)
    assert_same_store(store, reference)


def test_killed_worker_leaves_no_complete_shard_and_rerun_fills_the_gap(cluster, tiny, tmp_path):
    task, checkpoint, reference = tiny
    out = tmp_path / "ray"
    with pytest.raises(GradIndexError, match="rerun with --resume"):
        featurize_ray(task, out, CONFIG, checkpoint=checkpoint, max_retries=0, fail_shards=[2], show_progress=False)
    assert not (out / MANIFEST).exists()
    with pytest.raises(ArtifactNotFoundError, match="incomplete"):
        FeatureStore.open(out)
    run_key = reference.manifest["run_key"]
    assert completed_shard(out, 2, run_key) is None and not (out / shard_name(2)).exists()
    assert list((out / "shards").glob(".part-00002.parquet.tmp-*"))  # the killed worker's partial file
    survivors = {i: (out / shard_name(i)).stat().st_ino for i in (0, 1, 3, 4)}
    assert all(completed_shard(out, i, run_key) is not None for i in survivors)

    store = featurize_ray(task, out, CONFIG, checkpoint=checkpoint, resume=True, show_progress=False)
    assert_same_store(store, reference)
    # the rerun kept the completed shards (same files) and only redid the killed one
    assert {i: (out / shard_name(i)).stat().st_ino for i in survivors} == survivors


def test_dead_worker_is_replaced_within_the_run(cluster, tiny, tmp_path):
    task, checkpoint, reference = tiny
    store = featurize_ray(task, tmp_path / "ray", CONFIG, checkpoint=checkpoint, max_retries=1, fail_shards=[0, 3],
                          show_progress=False)
    assert_same_store(store, reference)


def test_cli_featurize_on_ray_matches_single_process(cluster, tiny, tmp_path):
    task, checkpoint, reference = tiny
    args = ["-q", "featurize", TINY, "--out", f"file://{tmp_path / 'cli'}", "--checkpoint", str(checkpoint),
            "--batch-size", "4", "--shard-size", "8",
            "--ray", "--workers", "2"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(tmp_path / "cli")
    assert store.manifest["run_key"] == reference.manifest["run_key"]
    ids, feats = store.read()
    ref_ids, ref_feats = reference.read()
    np.testing.assert_array_equal(ids, ref_ids)
    for group, block in ref_feats.items():
        np.testing.assert_array_equal(feats[group], block)


# -- sharded lookups ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def indexed(tiny, tmp_path_factory):
    """A copy of the reference store with a flat index in 3 parts (store shards 0-1, 2-3, 4) and query vectors."""
    task, checkpoint, reference = tiny
    path = tmp_path_factory.mktemp("indexed") / "store"
    shutil.copytree(reference.path, path)
    store = FeatureStore.open(path, trust_task=True)
    build_index(store, IndexConfig(shards_per_part=2), show_progress=False)
    attributor = Attributor.open(store)
    queries = np.concatenate([
        attributor.query_vectors(task.query_dataset()),
        np.random.default_rng(0).normal(size=(12, store.dim)).astype(np.float32),
    ])
    attributor.close()
    return store, queries


def test_loopback_only(cluster):
    assert {node["NodeManagerAddress"] for node in cluster.nodes()} == {"127.0.0.1"}


@pytest.mark.parametrize("actors", [1, 2, None])
def test_sharded_query_equals_single_index(cluster, indexed, actors):
    store, queries = indexed
    assert len(list_parts(store)) == 3
    single = GradIndex.open(store)
    ids, feats = store.read()
    vectors = scaled_vectors(feats, single.weights, store.groups)
    with RayIndex.open(store, actors=actors) as index:
        assert len(index.describe()) == (actors or 2)  # default: 3 parts on 2 CPU slots
        for k in (1, 5, 100):  # 100 > ntotal: clipped to 40
            top = index.search(queries, k)
            expected = single.search(queries, k)
            assert_same_ranking(top.sample_ids, top.scores, expected.sample_ids, expected.scores)
            # independent reference: brute force over every stored vector
            brute = queries.astype(np.float64) @ vectors.T.astype(np.float64)
            order = np.argsort(-brute, axis=1, kind="stable")[:, : min(k, len(ids))]
            np.testing.assert_array_equal(top.sample_ids, ids[order])
            np.testing.assert_allclose(top.scores, np.take_along_axis(brute, order, 1), rtol=1e-5, atol=1e-5)


def test_cli_query_on_ray_equals_local(cluster, indexed, tmp_path):
    store, _ = indexed
    task = load_task(TINY)
    data = task.query_dataset().tensors
    np.savez(tmp_path / "queries.npz", x=data[0].numpy(), y=data[1].numpy())
    args = ["-q", "query", str(store.path), "--inputs", str(tmp_path / "queries.npz"), "-k", "6", "--json",
            "--trust-task"]
    runner = CliRunner()
    local = runner.invoke(main, args, catch_exceptions=False)
    remote = runner.invoke(main, [*args, "--ray", "--actors", "2"], catch_exceptions=False)
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    assert remote.output == local.output
    assert len(local.output.splitlines()) == len(data[0])
    # weights learned after the build: --ray warns as the local query does
    save_weights(store, GroupWeights("all", {g: 2.0 + i for i, g in enumerate(store.groups)}, {"method": "given"}))
    stale = runner.invoke(main, [*args, "--ray", "--actors", "2"], catch_exceptions=False)
    assert stale.exit_code == 0 and stale.stdout == local.stdout
    assert [line for line in stale.stderr.splitlines() if "build-index" in line], stale.stderr


def test_worker_whose_run_key_differs_is_refused(cluster, tiny):
    from gradindex.features.distributed import _WorkerPool

    task, checkpoint, _ = tiny
    with pytest.raises(GradIndexError, match="run key mismatch"):
        _WorkerPool(cluster, task, CONFIG, checkpoint, "cpu", None, "another run", None, 1, 5)
