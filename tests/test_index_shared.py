"""The shared index (stored φ, each concept's weights on the query side) against per-concept partitions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from gradindex.cli import main
from gradindex.config import IndexConfig, SearchConfig
from gradindex.errors import ArtifactNotFoundError
from gradindex.index.topk import exact_topk
from gradindex.eval.evaluate import index_recall
from gradindex.index import build_index
from gradindex.index.shared import SHARED, open_concept_index, query_weights
from gradindex.query.attributor import Attributor
from gradindex.features.query import query_group_features
from gradindex.store.feature_store import FeatureStore
from gradindex.weights.group_weights import GroupWeights, save_weights


@pytest.fixture(scope="module")
def store(concept_store, tmp_path_factory):
    """A copy of the two-concept toy store with distinct learned-looking weights per concept."""
    path = tmp_path_factory.mktemp("shared") / "store"
    shutil.copytree(concept_store.path, path)
    store = FeatureStore.open(path, trust_task=True)
    rng = np.random.default_rng(0)
    for concept in ("first", "second"):
        weights = {g: float(w) for g, w in zip(store.groups, rng.lognormal(0, 1.5, len(store.groups)))}
        save_weights(store, GroupWeights(concept, weights, {"method": "test"}))
    return FeatureStore.open(path, trust_task=True)


def test_query_weights_put_all_of_w_on_the_query_side():
    w = GroupWeights("c", {"a": 4.0, "b": 0.25})
    assert query_weights(w).scales(["a", "b"]) == {"a": 4.0, "b": 0.25}


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_shared_top_k_equals_each_concepts_own_partition(store, kind):
    search = SearchConfig(nprobe=4096)  # ivf scans every cell: exact
    build_index(store, IndexConfig(concept=SHARED, kind=kind, nlist=4), GroupWeights.uniform(SHARED, store.groups),
                show_progress=False, search=search)
    for concept in ("all", "first", "second"):
        build_index(store, IndexConfig(concept=concept, kind=kind, nlist=4), show_progress=False, search=search)
        own = Attributor.open(store, concept, shared=False)
        shared = Attributor.open(store, concept, shared=True)
        assert shared.index.config.concept == SHARED and own.index.config.concept == concept
        queries = own.task.query_dataset()
        a, b = own.attribute(queries, k=8), shared.attribute(queries, k=8)
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-6)
        # and both are the exact top-k of τ_w = Σ_g w_g ψ_g·φ_g computed from the stored features
        psi = query_group_features(store, queries, concept)
        ids, feats = store.read()
        w = GroupWeights.from_manifest(store.manifest, concept, store.groups).weights
        want = exact_topk(np.concatenate([w[g] * psi[g] for g in store.groups], 1),
                          [(ids, np.concatenate([feats[g] for g in store.groups], 1))], 8)
        np.testing.assert_array_equal(b.sample_ids, want.sample_ids)
        own.close()
        shared.close()


def test_concept_without_a_partition_falls_back_to_the_shared_index(store, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(store.path, path)
    fresh = FeatureStore.open(path, trust_task=True)
    manifest = dict(fresh.manifest)
    manifest["indexes"] = {k: v for k, v in manifest.get("indexes", {}).items() if k != "second"}
    fresh.update_manifest({"indexes": manifest["indexes"]})
    if SHARED not in fresh.manifest["indexes"]:
        build_index(fresh, IndexConfig(concept=SHARED, kind="flat"), GroupWeights.uniform(SHARED, fresh.groups),
                    show_progress=False)
    index, weights = open_concept_index(fresh, "second")
    assert index.config.concept == SHARED and weights.scales(fresh.groups) == pytest.approx(
        GroupWeights.from_manifest(fresh.manifest, "second", fresh.groups).weights)
    with pytest.raises(ArtifactNotFoundError, match="no index for concept 'second'"):
        open_concept_index(fresh, "second", shared=False)


def test_shared_index_on_the_cli(store):
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "build-index", str(store.path), "--shared", "--kind", "flat"],
                           catch_exceptions=False)
    assert result.exit_code == 0 and f"'{SHARED}'" in result.output
    for concept in ("first", "second"):
        result = runner.invoke(main, ["-q", "eval", "recall", str(store.path), "--concept", concept, "--shared",
                                      "--json", "--trust-task"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        row = json.loads(result.output)
        assert row["recall"] == 1.0 and row["kind"] == "flat" and row["knobs"] is None
    result = runner.invoke(main, ["build-index", str(store.path), "--shared", "--concept", "first"])
    assert result.exit_code == 2 and "drop --concept" in result.output
    assert index_recall(FeatureStore.open(store.path, trust_task=True), "first", shared=True, k=5).recall == 1.0
