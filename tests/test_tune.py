"""``gradindex tune``: the grid, its scores against an independent computation, the recorded default."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from gradindex.cli import main
from gradindex.config import LDSConfig, Preconditioner, TuneConfig
from gradindex.errors import ConfigError
from gradindex.eval.lds import predictions_from_scores, retrain
from gradindex.eval.tune import score_grid, tune_grid, tuned_setting
from gradindex.features.query import load_store_task, query_group_features
from gradindex.store.feature_store import FeatureStore
from gradindex.task import query_split_positions
from gradindex.weights.learn import score_matrices


@pytest.fixture
def store(toy_store, tmp_path):
    """A private copy of the toy store (tune writes its manifest)."""
    shutil.copytree(toy_store.path, tmp_path / "store")
    return FeatureStore.open(tmp_path / "store", trust_task=True)


def test_the_grid_takes_every_preconditioner_of_the_enum():
    config = TuneConfig(dampings=(0.0, 0.1, 10.0))
    grid = tune_grid(config)
    assert grid[0] == (Preconditioner.IDENTITY, None)
    assert len(grid) == 1 + (len(Preconditioner) - 1) * 3
    assert {p for p, _ in grid} == set(Preconditioner)
    with pytest.raises(ConfigError, match="at least 4 subsets"):
        TuneConfig(budget=6, runs_per_subset=2)
    with pytest.raises(ConfigError, match="methods"):
        TuneConfig(methods=("agreement",))


def test_scores_equal_lds_of_the_full_score_matrices(store, tmp_path):
    task = load_store_task(store)
    dataset = task.query_dataset()
    fit = query_split_positions(task, len(dataset))["fit"]
    queries = [dataset[int(i)] for i in fit]
    retrained = retrain(task, tmp_path / "lds", LDSConfig(num_models=4, runs_per_subset=2), workers=1,
                        show_progress=False, queries=dataset).queries(fit)
    config = TuneConfig(budget=8, dampings=(0.0, 0.1, 10.0), methods=("uniform", "snr"), replicates=50)
    result = score_grid(store, retrained, queries, config)
    assert len(result.rows) == len(tune_grid(config)) * 2
    scored = [r for r in result.rows if r.lds is not None]
    assert result.best.lds == max(r.lds for r in scored) and result.best.minus_best == 0
    assert all(r.se > 0 for r in scored) and all(r.minus_best <= 0 for r in scored)
    ids, train = store.read()
    for row in scored:
        if row.method != "uniform":
            continue
        preconditioner = Preconditioner(row.preconditioner)
        features = query_group_features(store, queries, preconditioner=preconditioner,
                                        damping=0.0 if row.damping is None else row.damping)
        full = sum(score_matrices(features, train, store.groups))  # [Q, N], the store's order
        order = {int(i): p for p, i in enumerate(ids)}
        masks = retrained.masks[:, [np.flatnonzero(retrained.sample_ids == i)[0] for i in ids]]
        assert len(order) == masks.shape[1]
        expected = retrained.lds(predictions_from_scores(full, masks)).mean()
        assert row.lds == pytest.approx(expected, abs=1e-3), row


def test_tune_records_the_best_setting_and_build_index_uses_it(store, tmp_path):
    runner = CliRunner()
    args = ["-q", "tune", str(store.path), "--budget", "8", "--workers", "1", "--cache", str(tmp_path / "lds"),
            "--trust-task"]
    result = runner.invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    best = out["best"]
    assert best["lds"] == max(r["lds"] for r in out["rows"] if r["lds"] is not None)
    assert len(out["rows"]) == len(tune_grid(TuneConfig())) * 3
    tuned = tuned_setting(FeatureStore.open(store.path).manifest)
    assert (tuned["preconditioner"], tuned["damping"], tuned["method"]) == \
        (best["preconditioner"], best["damping"], best["method"])
    info = runner.invoke(main, ["info", str(store.path)])
    assert "default setting (gradindex tune)" in info.output
    assert runner.invoke(main, ["-q", "build-index", str(store.path)]).exit_code == 0
    entry = FeatureStore.open(store.path).manifest["indexes"]["all"]
    assert entry["config"]["preconditioner"] == best["preconditioner"]
    if best["damping"] is not None:
        assert entry["config"]["damping"] == best["damping"]
    assert entry["weights"]["info"]["method"] == best["method"]
    # explicit flags override the tuned setting
    assert runner.invoke(main, ["-q", "build-index", str(store.path), "--preconditioner", "gram",
                                "--damping", "0.5"]).exit_code == 0
    entry = FeatureStore.open(store.path).manifest["indexes"]["all"]
    assert (entry["config"]["preconditioner"], entry["config"]["damping"]) == ("gram", 0.5)
    # eval lds reports the tuned setting on the eval queries, against the same cached models
    report = runner.invoke(main, ["-q", "eval", "lds", str(store.path), "--cache", str(tmp_path / "lds"), "--models",
                                  "4", "--runs-per-subset", "2", "--workers", "1", "--json", "--trust-task"])
    assert report.exit_code == 0, report.output
    names = [row["attribution"] for row in json.loads(report.stdout)]
    assert f"{'uniform' if best['method'] == 'uniform' else 'learned'} (tuned)" in names
    # the second run reuses every cached model; the table names the bootstrap
    table = runner.invoke(main, [*args, "--dry-run"])
    assert table.exit_code == 0 and "bootstrap" in table.output and "not recorded" in table.output


def test_a_tuned_uniform_setting_builds_with_uniform_weights(store):
    runner = CliRunner()
    assert runner.invoke(main, ["-q", "learn-weights", str(store.path), "--preconditioner", "identity",
                                "--trust-task"]).exit_code == 0
    store.update_manifest({"tuned": {"preconditioner": "identity", "damping": None, "method": "uniform", "lds": 0.5,
                                     "se": 0.1, "models": 4, "runs_per_subset": 2, "queries": 24, "ceiling": None}})
    result = runner.invoke(main, ["build-index", str(store.path), "--trust-task"])
    assert result.exit_code == 0, result.output
    assert "gradindex tune" in result.stderr
    entry = FeatureStore.open(store.path).manifest["indexes"]["all"]
    assert entry["config"]["preconditioner"] == "identity" and entry["weights"]["info"]["method"] == "uniform"
