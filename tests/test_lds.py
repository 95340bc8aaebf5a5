"""LDS: Spearman against hand computation, the streamed prediction identity, the retraining cache."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import toy_spec
from gradindex.cli import main
from gradindex.config import LDSConfig, Preconditioner
from gradindex.errors import ConfigError, StoreMismatchError
from gradindex.weights.learn import score_matrices
from gradindex.eval.lds import (
    group_predictions,
    lds_per_query,
    predictions_from_scores,
    retrain,
    spearman_columns,
    subset_indices,
    subset_sums,
    weighted_predictions,
)
from gradindex.features.query import load_store_task, query_group_features
from gradindex.task import load_task


def test_spearman_matches_a_hand_computation_with_ties():
    # ranks of a: 1..5; ranks of b = [5, 6, 7, 8, 7]: 1, 2, 3.5, 5, 3.5 (tie -> average rank)
    # centred: [-2, -1, 0, 1, 2] and [-2, -1, .5, 2, .5]: covariance sum 8, squared norms 10 and 9.5
    a = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]])
    b = np.array([[5.0], [6.0], [7.0], [8.0], [7.0]])
    assert spearman_columns(a, b)[0] == pytest.approx(8 / np.sqrt(95))
    assert spearman_columns(a, -b)[0] == pytest.approx(-8 / np.sqrt(95))


def test_lds_of_a_tiny_example_by_hand():
    masks = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=bool)  # 4 models, 3 examples
    scores = np.array([[3.0, 1.0, -2.0]])  # one query
    predictions = predictions_from_scores(scores, masks)  # sums over each subset: 4, 1, -1, 3
    np.testing.assert_allclose(predictions[:, 0], [4.0, 1.0, -1.0, 3.0])
    measured = np.array([[1.0], [0.5], [-1.0], [2.0]])  # ranks 3, 2, 1, 4 vs predicted ranks 4, 2, 1, 3
    # Σd² = 1 + 0 + 0 + 1 = 2, ρ = 1 − 6·2 / (4·(16 − 1)) = 0.8
    assert lds_per_query(predictions, measured)[0] == pytest.approx(0.8)


def test_a_constant_prediction_correlates_zero():
    rho = spearman_columns(np.ones((6, 2)), np.arange(12.0).reshape(6, 2))
    np.testing.assert_array_equal(rho, [0.0, 0.0])


def test_subsets_are_seeded_and_stable_when_more_models_are_added():
    first = [subset_indices(100, 0.5, 7, j) for j in range(5)]
    again = [subset_indices(100, 0.5, 7, j) for j in range(8)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert all(len(s) == 50 and len(np.unique(s)) == 50 for s in again)
    assert not np.array_equal(first[0], first[1])
    assert len(subset_indices(101, 0.3, 0, 0)) == 30


def test_streamed_predictions_equal_full_score_sums(toy_store):
    """Σ_g w_g ψ_gᵀ(Σ_{i∈S_j} φ_g(x_i)) from subset sums equals masks @ the full weighted score matrix."""
    task = load_store_task(toy_store)
    queries = task.query_dataset()
    ids, train = toy_store.read()
    rng = np.random.default_rng(0)
    masks = rng.random((5, len(ids))) < 0.5
    weights = {"body.0": 0.5, "heads.0": 2.0, "noise": 0.1}
    query = query_group_features(toy_store, queries, preconditioner=Preconditioner.GRAM)
    full = sum(weights[g] * s for g, s in zip(toy_store.groups, score_matrices(query, train, toy_store.groups)))
    order = rng.permutation(len(ids))  # the task's order need not be the store's: matched by id
    streamed = weighted_predictions(group_predictions(query, subset_sums(toy_store, masks[:, order], ids[order])),
                                    weights)
    expected = predictions_from_scores(full, masks)  # float32 score matrices: compare at float32 precision
    np.testing.assert_allclose(streamed, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def _model_files(cache):
    return sorted((cache / "models").glob("model-*/*"))


def test_retraining_is_cached_and_resumable(tmp_path):
    task = load_task(toy_spec("ToyTask"))
    cache = tmp_path / "lds"
    first = retrain(task, cache, LDSConfig(num_models=3, fraction=0.5), workers=1, show_progress=False)
    assert first.masks.shape == (3, 200) and (first.masks.sum(1) == 100).all()
    assert first.measurements["all"].shape == (3, 48)
    files = _model_files(cache)
    stamps = [os.stat(f).st_mtime_ns for f in files]
    assert len(files) == 3
    more = retrain(task, cache, LDSConfig(num_models=4, fraction=0.5), workers=1, show_progress=False)
    assert [os.stat(f).st_mtime_ns for f in _model_files(cache)[:3]] == stamps  # finished models reused
    np.testing.assert_array_equal(more.measurements["all"][:3], first.measurements["all"])
    np.testing.assert_array_equal(more.masks[:3], first.masks)
    # another query set: measured on the cached checkpoints, nothing retrained
    queries = task.query_dataset()[:5]
    np.savez(tmp_path / "queries.npz", dummy=np.zeros(1))
    task.load_queries = lambda path: queries  # the toy task has no query file format
    subset = retrain(task, cache, LDSConfig(num_models=4, fraction=0.5), queries_file=tmp_path / "queries.npz",
                     workers=1, show_progress=False)
    assert [os.stat(f).st_mtime_ns for f in _model_files(cache)[:3]] == stamps
    np.testing.assert_allclose(subset.measurements["all"], more.measurements["all"][:, :5], rtol=1e-5)  # other batch shape, other BLAS sums
    with pytest.raises(StoreMismatchError, match="fraction"):
        retrain(task, cache, LDSConfig(num_models=3, fraction=0.3), workers=1, show_progress=False)


def test_parallel_workers_train_the_same_models(tmp_path):
    task = load_task(toy_spec("TwoConceptTask"))
    config = LDSConfig(num_models=3, seed=5)
    serial = retrain(task, tmp_path / "serial", config, workers=1, show_progress=False)
    parallel = retrain(task, tmp_path / "parallel", config, workers=2, show_progress=False)
    assert sorted(parallel.measurements) == ["all", "first", "second"]
    for concept in ("all", "first", "second"):
        np.testing.assert_allclose(parallel.measurements[concept], serial.measurements[concept], rtol=1e-5)
    assert not np.allclose(serial.measurements["first"], serial.measurements["second"])


def test_retrain_rejects_bad_input(tmp_path):
    task = load_task(toy_spec("ToyTask"))
    with pytest.raises(ConfigError, match="workers"):
        retrain(task, tmp_path / "a", workers=0)
    with pytest.raises(ConfigError, match="fraction"):
        LDSConfig(fraction=1.0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stray.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        retrain(task, tmp_path / "b", LDSConfig(num_models=3), workers=1)


def test_eval_lds_cli_reports_every_attribution(toy_store, tmp_path):
    runner = CliRunner()
    args = ["-q", "eval", "lds", str(toy_store.path), "--cache", str(tmp_path / "cache"), "--models", "10",
            "--workers", "1", "--json", "--trust-task"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    names = {(row["attribution"], row["preconditioner"]) for row in rows}
    for preconditioner in ("identity", "gram"):
        assert ("uniform", preconditioner) in names
        assert {(f"group {g}", preconditioner) for g in toy_store.groups} <= names
    lds = {(row["attribution"], row["preconditioner"]): row["lds"] for row in rows}
    # the planted noise group predicts nothing, and it swamps uniform grad-dot (its gradients dominate)
    for preconditioner in ("identity", "gram"):
        assert abs(lds[("group noise", preconditioner)]) < 0.12
    best_informative = max(lds[("group body.0", "identity")], lds[("group heads.0", "identity")])
    assert best_informative > lds[("uniform", "identity")] + 0.1
    table = runner.invoke(main, [a for a in args if a != "--json"])
    assert table.exit_code == 0 and "uniform" in table.output and " se " in table.output and "ceiling: unknown" in table.output


def test_runs_per_subset_average_seeds_and_keep_single_run_caches(tmp_path):
    task = load_task(toy_spec("ToyTask"))
    cache = tmp_path / "lds"
    single = retrain(task, cache, LDSConfig(num_models=3), workers=1, show_progress=False)
    stamps = [os.stat(f).st_mtime_ns for f in _model_files(cache)]
    double = retrain(task, cache, LDSConfig(num_models=3, runs_per_subset=2), workers=1, show_progress=False)
    files = _model_files(cache)
    assert [f.parent.name for f in files] == ["model-00000", "model-00000-run1", "model-00001", "model-00001-run1",
                                            "model-00002", "model-00002-run1"]
    assert [os.stat(f).st_mtime_ns for f in (files[0], files[2], files[4])] == stamps  # run 0 is the R = 1 model
    runs = double.runs["all"]
    assert runs.shape == (2, 3, 48) and double.runs_per_subset == 2
    np.testing.assert_array_equal(runs[0], single.measurements["all"])
    assert not np.allclose(runs[0], runs[1])  # another training seed
    np.testing.assert_allclose(double.measurements["all"], runs.mean(0))
    np.testing.assert_array_equal(double.masks, single.masks)  # the same subsets
    part = double.queries([3, 5])
    np.testing.assert_array_equal(part.runs["all"], runs[:, :, [3, 5]])
    assert single.ceiling() is None and double.ceiling() is not None
    with pytest.raises(ConfigError, match="training seed per run"):
        LDSConfig(runs_per_subset=2, training_seed=3)


def test_eval_lds_cli_reports_bootstrap_errors_and_the_ceiling(toy_store, tmp_path):
    args = ["-q", "eval", "lds", str(toy_store.path), "--cache", str(tmp_path / "cache"), "--models", "6",
            "--runs-per-subset", "2", "--workers", "1", "--bootstrap", "50", "--trust-task"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    ceilings = {row["ceiling"] for row in rows}
    assert len(ceilings) == 1 and 0 < ceilings.pop() <= 1
    assert all(row["se"] > 0 for row in rows)
    table = CliRunner().invoke(main, args)
    assert table.exit_code == 0 and "ceiling 0." in table.output and "6 subsets x 2 run(s)" in table.output
