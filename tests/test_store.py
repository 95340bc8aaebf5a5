"""Feature store: round trip, checksums, atomic writes, interrupted and resumed featurize."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gradindex.config import FeaturizeConfig, ProjectionConfig, StorageDtype
from gradindex.errors import ArtifactNotFoundError, ConfigError, StoreMismatchError
from gradindex.features.run import featurize
from gradindex.store.feature_store import MANIFEST, FeatureStore, atomic_write_json, commit_manifest, prepare_store, write_shard
from store_helpers import minimal_manifest
from tiny_task import CrashingTask, TinyTask


def _write_store(path, rows=10, dtype=np.float32):
    rng = np.random.default_rng(0)
    ids = np.arange(rows, dtype=np.int64) * 3
    feats = {"a": rng.normal(size=(rows, 5)).astype(dtype), "b.c": rng.normal(size=(rows, 2)).astype(dtype)}
    meta = {"label": rng.integers(0, 9, rows), "name": np.array([f"x{i}" for i in range(rows)])}
    prepare_store(path)
    shards = [write_shard(path, 0, ids[:6], {k: v[:6] for k, v in feats.items()}, {k: v[:6] for k, v in meta.items()}),
              write_shard(path, 1, ids[6:], {k: v[6:] for k, v in feats.items()}, {k: v[6:] for k, v in meta.items()})]
    commit_manifest(path, minimal_manifest(shards, {"a": 5, "b.c": 2}, metadata_columns=["label", "name"]))
    return ids, feats, meta


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip(tmp_path, dtype):
    ids, feats, meta = _write_store(tmp_path / "s", dtype=dtype)
    store = FeatureStore.open(tmp_path / "s")
    got_ids, got = store.read()
    np.testing.assert_array_equal(got_ids, ids)
    for group in feats:
        assert got[group].dtype == dtype
        np.testing.assert_array_equal(got[group], feats[group])
    meta_ids, got_meta = store.read_metadata()
    np.testing.assert_array_equal(meta_ids, ids)
    np.testing.assert_array_equal(got_meta["label"], meta["label"])
    assert list(got_meta["name"]) == list(meta["name"])
    assert store.dim == 7 and store.num_samples == 10


def test_checksum_mismatch_is_detected(tmp_path):
    _write_store(tmp_path / "s")
    shard = tmp_path / "s" / "shards" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    store = FeatureStore.open(tmp_path / "s")
    with pytest.raises(StoreMismatchError, match="checksum mismatch in shards/part-00001"):
        store.read()


def test_truncated_or_missing_shard_is_refused_on_open(tmp_path):
    _write_store(tmp_path / "s")
    shard = tmp_path / "s" / "shards" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StoreMismatchError, match="bytes"):
        FeatureStore.open(tmp_path / "s")
    shard.unlink()
    with pytest.raises(ArtifactNotFoundError, match="missing"):
        FeatureStore.open(tmp_path / "s")


def test_missing_or_foreign_store(tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="no feature store"):
        FeatureStore.open(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{not json")
    with pytest.raises(StoreMismatchError, match="not valid JSON"):
        FeatureStore.open(tmp_path / "bad")
    atomic_write_json(tmp_path / "bad" / MANIFEST, {"format_version": 99})
    with pytest.raises(StoreMismatchError, match="format version"):
        FeatureStore.open(tmp_path / "bad")


def _crashed_run(tmp_path):
    """A featurize of the tiny task into ``tmp_path/store`` interrupted after its first shard:
    ``(task, checkpoint, config)`` to resume it with."""
    task = TinyTask()
    checkpoint = task.train(tmp_path / "tiny.pt")
    config = FeaturizeConfig(batch_size=4, shard_size=8)
    with pytest.raises(KeyboardInterrupt):
        featurize(CrashingTask(crash_at=4), tmp_path / "store", config, checkpoint=checkpoint, show_progress=False)
    return task, checkpoint, config


def test_interrupted_featurize_leaves_no_complete_looking_store(tmp_path):
    task, checkpoint, config = _crashed_run(tmp_path)
    assert not (tmp_path / "store" / MANIFEST).exists()
    assert not list((tmp_path / "store").rglob("*.tmp-*"))
    with pytest.raises(ArtifactNotFoundError, match="incomplete"):
        FeatureStore.open(tmp_path / "store")
    # one complete shard (8 rows) landed before the crash; resume keeps it and finishes the rest
    assert (tmp_path / "store" / "shards" / "part-00000.json").exists()
    resumed = featurize(task, tmp_path / "store", config, checkpoint=checkpoint, resume=True, show_progress=False)
    clean = featurize(task, tmp_path / "clean", config, checkpoint=checkpoint, show_progress=False)
    ids_r, feats_r = resumed.read()
    ids_c, feats_c = clean.read()
    np.testing.assert_array_equal(ids_r, ids_c)
    for group in feats_c:
        np.testing.assert_array_equal(feats_r[group], feats_c[group])  # bit for bit
    assert [s["sha256"] for s in resumed.manifest["shards"]] == [s["sha256"] for s in clean.manifest["shards"]]


def test_resume_ignores_shards_of_a_different_run(tmp_path):
    task, checkpoint, config = _crashed_run(tmp_path)
    other = FeaturizeConfig(batch_size=4, shard_size=8, projection=ProjectionConfig(seed=9))
    resumed = featurize(task, tmp_path / "store", other, checkpoint=checkpoint, resume=True, show_progress=False)
    clean = featurize(task, tmp_path / "clean", other, checkpoint=checkpoint, show_progress=False)
    for group, block in clean.read()[1].items():
        np.testing.assert_array_equal(resumed.read()[1][group], block)


def test_existing_store_needs_overwrite_and_overwrite_drops_manifest_first(tmp_path):
    task = TinyTask()
    checkpoint = task.train(tmp_path / "tiny.pt")
    featurize(task, tmp_path / "store", checkpoint=checkpoint, show_progress=False)
    with pytest.raises(ConfigError, match="--overwrite"):
        featurize(task, tmp_path / "store", checkpoint=checkpoint, show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        featurize(CrashingTask(crash_at=1), tmp_path / "store", checkpoint=checkpoint, overwrite=True,
                  show_progress=False)
    assert not (tmp_path / "store" / MANIFEST).exists()


def test_float16_storage_and_manifest_contents(tmp_path):
    task = TinyTask()
    checkpoint = task.train(tmp_path / "tiny.pt")
    config = FeaturizeConfig(dtype=StorageDtype.FLOAT16, projection=ProjectionConfig(proj_dim=8))
    store = featurize(task, tmp_path / "store", config, checkpoint=checkpoint, show_progress=False)
    full = featurize(task, tmp_path / "full", FeaturizeConfig(projection=ProjectionConfig(proj_dim=8)),
                     checkpoint=checkpoint, show_progress=False)
    half, single = store.read()[1], full.read()[1]
    for group in single:
        assert half[group].dtype == np.float16
        np.testing.assert_allclose(half[group].astype(np.float32), single[group], rtol=2e-3, atol=1e-4)
    manifest = json.loads((tmp_path / "store" / MANIFEST).read_text())
    assert manifest["dtype"] == "float16"
    assert manifest["model_fingerprint"] and manifest["task"]["task"].endswith("TinyTask")
    assert [g["name"] for g in manifest["groups"]] == ["hidden", "out"]
    assert all("sha256" in s and s["rows"] > 0 for s in manifest["shards"])
    assert manifest["config"]["projection"]["proj_dim"] == 8
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["num_samples"] == 40
    assert torch.is_tensor(torch.as_tensor(store.read_gram()["hidden"]))
