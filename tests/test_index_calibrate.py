"""Self-calibrated search knobs: chosen on calibration queries, checked on held-out ones, recorded, used."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from gradindex.cli import main
from gradindex.config import IndexConfig, SearchConfig
from gradindex.index.topk import exact_topk, per_query_recall
from gradindex.index import GradIndex, build_index
from gradindex.index import calibrate as cal
from gradindex.features.precondition import GramAccumulator
from gradindex.store.feature_store import FeatureStore, commit_manifest, prepare_store, write_arrays, write_shard
from store_helpers import minimal_manifest

GROUPS = {"a": 24, "b": 16}
N = 4000


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Clustered, heavy-tailed synthetic features in two groups (no task: stored-row families only)."""
    rng = np.random.default_rng(0)
    dim = sum(GROUPS.values())
    centers = rng.normal(size=(16, dim))
    basis = rng.normal(size=(12, dim)) * np.linspace(3, 0.3, 12)[:, None]
    x = centers[rng.integers(0, 16, N)] + rng.normal(size=(N, 12)) @ basis * 0.5
    x *= (rng.lognormal(0, 1.0, N) / np.linalg.norm(x, axis=1))[:, None]
    feats = {"a": x[:, :24].astype(np.float32), "b": x[:, 24:].astype(np.float32)}
    path = prepare_store(tmp_path_factory.mktemp("calibrate") / "store")
    gram = GramAccumulator(GROUPS, 4096)
    gram.update(feats)
    shard = write_shard(path, 0, np.arange(N) * 2 + 1, feats)
    sha = write_arrays(path / "gram.npz", {f"g{i}": m for i, m in enumerate(gram.result().values())})
    commit_manifest(path, minimal_manifest([shard.to_dict()], GROUPS, gram={"sha256": sha, "count": N}))
    return FeatureStore.open(path)


def test_stored_row_families_are_query_vectors_of_the_partition(store):
    index = build_index(store, IndexConfig(concept="fam", kind="ivf", nlist=16), show_progress=False)
    side = cal.QuerySide.of(index)
    queries = cal.calibration_queries(store, side, per_family=20)
    assert queries.names == ("rows", "negated", "blend", "rescaled", "noisy")  # no task here
    assert queries.vectors.shape == (100, 40) and np.isfinite(queries.vectors).all()
    rows = queries.vectors[queries.family == 0]
    np.testing.assert_array_equal(queries.vectors[queries.family == 1], -rows)
    fit, held = queries.halves()
    assert len(fit.vectors) == len(held.vectors) == 50 and set(fit.family.tolist()) == set(range(5))
    again = cal.calibration_queries(store, side, per_family=20)
    np.testing.assert_array_equal(again.vectors, queries.vectors)  # seeded
    # a stored row's query vector is −H⁻¹φ(x) (Gram preconditioner, uniform weights), against an
    # independent inverse of the damped Gram matrix
    ids, feats = store.read()
    scaled = cal.sample_scaled_rows(store, index.weights, 2 * 20)
    u = cal.row_queries(store, side, scaled, 20)["rows"]
    gram = {g: f.T.astype(np.float64) @ f / len(f) for g, f in feats.items()}
    for g, (lo, hi) in {"a": (0, 24), "b": (24, 40)}.items():
        h = gram[g] + 0.1 * np.trace(gram[g]) / len(gram[g]) * np.eye(len(gram[g]))
        want = -np.linalg.solve(h, scaled[:, lo:hi].T).T
        assert any(np.allclose(u[0, lo:hi], w, rtol=1e-3, atol=1e-5) for w in want)


def test_exact_neighbours_of_the_build_pass_match_a_pass_over_the_store(store):
    index = build_index(store, IndexConfig(concept="ex", kind="ivfpq", nlist=16, pq_bytes=8), show_progress=False)
    side = cal.QuerySide.of(index)
    queries = cal.calibration_queries(store, side, per_family=10)
    running = cal.ExactNeighbours(side.to_search(queries.vectors), 10)
    from gradindex.index.build import iter_vector_batches

    for ids, vectors in iter_vector_batches(store, index.weights, side.transform, batch=700):
        running.observe(ids, vectors)
    want = cal.exact_neighbours(store, index, queries.vectors, 10)
    assert per_query_recall(running.result(), want).mean() >= 0.99  # balanced vs raw float sums: near-ties only
    np.testing.assert_allclose(running.result().scores, want.scores, rtol=1e-3, atol=1e-4)


def test_one_deep_search_gives_the_recall_of_every_shallower_rerank(store):
    index = build_index(store, IndexConfig(concept="deep", kind="ivfpq", nlist=16, pq_bytes=4), show_progress=False)
    queries = cal.calibration_queries(store, cal.QuerySide.of(index), per_family=12)
    exact = cal.exact_neighbours(store, index, queries.vectors, 10)
    search = SearchConfig(nprobe=2)
    by_depth = cal.rerank_recalls(index, search, queries.vectors, exact, 10, [10, 20, 50, 200])
    for depth, recall in by_depth.items():
        direct = cal.measure(index, SearchConfig(nprobe=2, rerank=depth), queries.vectors, exact, 10)
        assert abs(direct.mean() - recall.mean()) <= 0.01  # equal up to PQ-score ties
    assert by_depth[200].mean() >= by_depth[10].mean()


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_build_with_target_recall_records_knobs_that_reach_it_on_held_out_queries(store, kind):
    config = IndexConfig(concept=f"c{kind}", kind=kind, nlist=16, pq_bytes=8, hnsw_m=8, ef_construction=20)
    index = build_index(store, config, show_progress=False, target_recall=0.9)
    entry = index.entry
    calibration = entry["calibration"]
    assert calibration["target"] == 0.9 and calibration["k"] == 10 and calibration["reached"]
    assert calibration["worst"] >= 0.9 and calibration["recall"] >= calibration["worst"]
    knob = {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "ef_search"}[kind]
    assert entry["search"][knob] > 0 and entry["search"] == calibration["search"]
    assert index.parts[0].search_config == SearchConfig.from_dict(entry["search"])  # used by default
    # an independent check on fresh queries of the same families (another seed)
    fresh = cal.calibration_queries(store, cal.QuerySide.of(index), per_family=40, seed=9)
    ids, feats = store.read()
    want = exact_topk(fresh.vectors, [(ids, np.concatenate([feats["a"], feats["b"]], 1))], 10)
    got = GradIndex.open(FeatureStore.open(store.path), f"c{kind}").search(fresh.vectors, 10)
    assert per_query_recall(got, want).mean() >= 0.85
    if kind == "ivfpq":  # a knob given at query time replaces that knob only
        opened = GradIndex.open(FeatureStore.open(store.path), f"c{kind}", search=SearchConfig(nprobe=1))
        assert opened.parts[0].search_config == SearchConfig(nprobe=1, rerank=entry["search"]["rerank"])


def test_cheapest_setting_reaches_the_target_and_the_next_cheaper_does_not(store):
    index = build_index(store, IndexConfig(concept="cheap", kind="ivfpq", nlist=16, pq_bytes=8), show_progress=False)
    queries = cal.calibration_queries(store, cal.QuerySide.of(index), per_family=24)
    exact = cal.exact_neighbours(store, index, queries.vectors, 10)
    setting, recall, reached = cal.cheapest_reaching(index, queries, exact, 0.9, 10)
    assert reached and min(queries.family_means(recall).values()) >= 0.9
    direct = cal.measure(index, setting, queries.vectors, exact, 10)
    assert min(queries.family_means(direct).values()) >= 0.9 - 0.01
    probes = [p for p in cal.NPROBE_GRID if p < setting.nprobe]
    if probes:  # one probe value less does not reach at any re-rank depth tried
        below = SearchConfig(nprobe=probes[-1], rerank=160 * 10)
        assert min(queries.family_means(cal.measure(index, below, queries.vectors, exact, 10)).values()) < 0.9
    # knobs given explicitly stay fixed; only the others are calibrated
    fixed, _, _ = cal.cheapest_reaching(index, queries, exact, 0.9, 10, SearchConfig(nprobe=2))
    assert fixed.nprobe == 2


def test_unreachable_target_is_reported_not_hidden(store):
    index = build_index(store, IndexConfig(concept="hard", kind="hnsw", hnsw_m=4, ef_construction=8),
                        show_progress=False)
    result = cal.calibrate(store, index, 1.0, fixed=SearchConfig(ef_search=16),
                           queries=cal.calibration_queries(store, cal.QuerySide.of(index), per_family=16))
    assert result.search.ef_search == 16
    if not result.reached:
        assert "NOT reached" in cal.describe(result, "hnsw")


def test_cli_build_calibrates_with_the_tasks_queries_and_info_prints_the_knobs(concept_store, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(concept_store.path, path)
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "build-index", str(path), "--kind", "ivf", "--nlist", "4",
                                  "--target-recall", "0.9"], catch_exceptions=False)
    assert result.exit_code == 0 and "calibrated knobs: nprobe" in result.output, result.output
    entry = json.loads((path / "manifest.json").read_text())["indexes"]["all"]
    assert "task" not in entry["calibration"]["families"]  # a file task runs only with consent
    result = runner.invoke(main, ["-q", "build-index", str(path), "--kind", "ivf", "--nlist", "4",
                                  "--target-recall", "0.9", "--trust-task"], catch_exceptions=False)
    entry = json.loads((path / "manifest.json").read_text())["indexes"]["all"]
    assert "task" in entry["calibration"]["families"]  # the toy task's own queries joined the calibration
    info = runner.invoke(main, ["info", str(path)], catch_exceptions=False).output
    assert "search knobs nprobe" in info and "held-out queries" in info
    result = runner.invoke(main, ["-q", "eval", "recall", str(path), "--json", "--trust-task"], catch_exceptions=False)
    row = json.loads(result.output)
    assert row["knobs"]["nprobe"] >= 1 and row["knobs_recall"] >= 0.95 and row["reached"]
    assert row["worst"] <= row["p5"] <= row["recall"] and 0 <= row["certified"] <= 1
    assert "adaptive default: recall mean" in info and "certified" in info  # the held-out distribution
    result = runner.invoke(main, ["-q", "eval", "recall", str(path), "--json", "--trust-task", "--exact-certified",
                                  "--nprobe", "1"], catch_exceptions=False)
    row = json.loads(result.output)
    assert row["recall"] == row["worst"] == 1.0 and row["certified"] == 1.0 and row["rows_reranked"] > 0
    table = runner.invoke(main, ["-q", "eval", "recall", str(path), "--trust-task", "--nprobe", "1", "--no-adaptive"],
                          catch_exceptions=False).output
    assert "p5" in table and "worst" in table and "certified" in table
    result = runner.invoke(main, ["-q", "build-index", str(path), "--kind", "ivf", "--nlist", "4",
                                  "--target-recall", "0"], catch_exceptions=False)
    assert "calibrated" not in result.output
    info = runner.invoke(main, ["info", str(path)], catch_exceptions=False).output
    assert "(0 = default; not calibrated)" in info
