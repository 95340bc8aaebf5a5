"""Label-free Gram damping (gradindex.weights.damping): each criterion against an independent reference,
the manifest cache, and `--damping auto` through learn-weights, build-index and info."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import multivariate_normal
from sklearn.covariance import ledoit_wolf, oas

from gradindex.errors import ConfigError
from gradindex.cli import main
from gradindex.config import DampingCriterion, IndexConfig, LearnConfig, Preconditioner
from gradindex.weights.damping import (
    DAMPING_GRID, FoldStatistics, auto_damping, choose_damping, cv_log_likelihood, ledoit_wolf_shrinkage,
    oas_shrinkage, relative_damping,
)
from gradindex.index import build_index
from gradindex.weights.learn import learn_weights
from gradindex.query.attributor import score_setting, warn_if_weights_changed
from gradindex.store.feature_store import FeatureStore


def _features(n: int = 300, k: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, k)) @ rng.normal(size=(k, k)) * np.linspace(0.2, 3.0, k)


def _stats(x: np.ndarray, folds: int = 5, batch: int = 37) -> FoldStatistics:
    stats = FoldStatistics({"g": x.shape[1]}, folds)
    for start in range(0, len(x), batch):  # batches cross fold boundaries
        stats.update({"g": x[start:start + batch]})
    return stats


def test_fold_statistics_split_rows_round_robin():
    x = _features(53)
    stats = _stats(x)
    for f in range(5):
        rows = x[np.arange(len(x)) % 5 == f]
        np.testing.assert_allclose(stats.sums["g"][f], rows.T @ rows, rtol=1e-12)
    assert stats.counts.tolist() == [11, 11, 11, 10, 10]
    assert stats.fourth["g"] == pytest.approx(float(((x * x).sum(1) ** 2).sum()))
    np.testing.assert_allclose(stats.gram("g"), x.T @ x / len(x), rtol=1e-12)


def test_cv_likelihood_equals_scipy_held_out_log_density():
    x = _features(60, k=4)
    stats = _stats(x, folds=3)
    grid = (0.01, 0.3, 5.0)
    ours = cv_log_likelihood(stats.sums["g"], stats.counts, grid)
    fold = np.arange(len(x)) % 3
    for i, relative in enumerate(grid):
        total = 0.0
        for f in range(3):
            train, held = x[fold != f], x[fold == f]
            gram = train.T @ train / len(train)
            cov = gram + relative * np.trace(gram) / 4 * np.eye(4)
            total += multivariate_normal(np.zeros(4), cov).logpdf(held).sum()
        constant = -0.5 * 4 * np.log(2 * np.pi)  # ours drops it
        assert ours[i] == pytest.approx(total / len(x) - constant, rel=1e-9)


def test_cv_likelihood_shrinks_more_with_fewer_examples():
    """Few rows for the dimension -> a noisy Gram -> more damping; many rows -> less."""
    rng = np.random.default_rng(1)
    spectrum = np.linspace(0.2, 2.0, 30)
    chosen = {}
    for n in (40, 4000):
        stats = _stats(rng.normal(size=(n, 30)) * spectrum)
        chosen[n] = choose_damping(stats, DampingCriterion.CV_LIKELIHOOD)["g"]
    assert chosen[40] > chosen[4000]
    assert chosen[40] in DAMPING_GRID


def test_shrinkage_matches_scikit_learn():
    x = _features(80, k=7)
    stats = _stats(x)
    gram = stats.gram("g")
    _, expected_lw = ledoit_wolf(x, assume_centered=True)
    _, expected_oas = oas(x, assume_centered=True)
    assert ledoit_wolf_shrinkage(gram, stats.fourth["g"], stats.rows) == pytest.approx(expected_lw, rel=1e-9)
    assert oas_shrinkage(gram, stats.rows) == pytest.approx(expected_oas, rel=1e-9)
    assert relative_damping(0.2) == pytest.approx(0.25)
    assert relative_damping(1.0) == DAMPING_GRID[-1]


def test_shared_criterion_gives_every_group_one_value():
    rng = np.random.default_rng(2)
    stats = FoldStatistics({"a": 5, "b": 8})
    stats.update({"a": rng.normal(size=(50, 5)), "b": rng.normal(size=(50, 8)) * np.linspace(0.1, 4, 8)})
    shared = choose_damping(stats, DampingCriterion.CV_SHARED)
    assert len(set(shared.values())) == 1
    per_group = choose_damping(stats, DampingCriterion.CV_LIKELIHOOD)
    assert set(per_group) == {"a", "b"}


def test_auto_damping_is_cached_in_the_manifest(toy_store, tmp_path):
    import shutil

    path = tmp_path / "store"
    shutil.copytree(toy_store.path, path)
    store = FeatureStore.open(path)
    first = auto_damping(store, DampingCriterion.CV_LIKELIHOOD)
    assert set(first) == set(store.groups)
    entry = FeatureStore.open(path).manifest["damping_auto"]["cv-likelihood"]
    assert entry["damping"] == first
    entry["damping"] = {g: 0.5 for g in first}  # a second call reads the cache, not the store
    store.update_manifest({"damping_auto": {"cv-likelihood": entry}})
    assert auto_damping(FeatureStore.open(path), DampingCriterion.CV_LIKELIHOOD) == {g: 0.5 for g in first}


def test_auto_damping_flows_from_weights_to_index_and_info(toy_store, tmp_path):
    import shutil

    path = tmp_path / "store"
    shutil.copytree(toy_store.path, path)
    store = FeatureStore.open(path, trust_task=True)
    weights = learn_weights(store, LearnConfig(damping="auto", num_queries=16, reference_size=80, steps=20),
                            show_progress=False)
    resolved = weights.info["config"]["damping"]
    assert isinstance(resolved, dict) and set(resolved) == set(store.groups)
    assert weights.info["damping_requested"] == "auto"
    index = build_index(FeatureStore.open(path), IndexConfig(damping="auto"), show_progress=False)
    assert index.config.damping == resolved
    entry = FeatureStore.open(path).manifest["indexes"]["all"]
    assert entry["damping_requested"] == "auto" and entry["config"]["damping"] == resolved
    assert set(FeatureStore.open(path).manifest["weights"]["all"]) == {"gram@auto"}
    assert entry["weights"]["weights"] == weights.weights
    # the weights are kept for gram@auto: an index at a fixed damping has none learned and takes uniform ones
    fixed = build_index(FeatureStore.open(path), IndexConfig(damping=0.1), show_progress=False)
    assert fixed.config.damping == 0.1 and set(fixed.entry["weights"]["weights"].values()) == {1.0}
    rebuilt = build_index(FeatureStore.open(path), IndexConfig(damping="auto"), show_progress=False)
    store = FeatureStore.open(path)
    assert not warn_if_weights_changed(store, "all", rebuilt)  # gram@auto: the index's own weights
    assert score_setting(store) == (Preconditioner.GRAM, resolved, rebuilt.weights)
    out = CliRunner().invoke(main, ["info", str(path)])
    assert out.exit_code == 0, out.output
    assert "damping[all]" in out.output and "auto, per group" in out.output


def test_cli_rejects_a_bad_damping(toy_store):
    result = CliRunner().invoke(main, ["build-index", str(toy_store.path), "--damping", "lots"])
    assert result.exit_code == 2 and "auto" in result.output
    result = CliRunner().invoke(main, ["build-index", str(toy_store.path), "--damping", "-1"])
    assert result.exit_code == 2 and ">= 0" in result.output


# -- the label-free dampings of issue 21: mp, pinv, schedule ------------------------------------------------------
def test_mp_quantile_matches_sampled_spectra():
    from gradindex.weights.damping import mp_quantile

    rng = np.random.default_rng(0)
    for rows, k in ((4000, 400), (2000, 1000)):
        x = rng.normal(size=(rows, k))
        eigenvalues = np.linalg.eigvalsh(x.T @ x / rows)
        assert mp_quantile(k / rows) == pytest.approx(np.median(eigenvalues), rel=0.02)


def test_mp_damping_sits_at_the_noise_edge_of_a_spiked_spectrum():
    """Pure noise of variance 4 plus three strong spikes: the edge is 4·(1 + √(k/n))², found from the
    median although the spikes inflate the mean eigenvalue."""
    from gradindex.weights.damping import mp_damping

    rng = np.random.default_rng(1)
    rows, k = 3000, 300
    x = 2.0 * rng.normal(size=(rows, k))
    x[:, :3] += rng.normal(size=(rows, 3)) * 30.0
    eigenvalues = np.linalg.eigvalsh(x.T @ x / rows)
    relative = mp_damping(eigenvalues, rows)
    edge = 4.0 * (1 + np.sqrt(k / rows)) ** 2
    assert relative * eigenvalues.mean() == pytest.approx(edge, rel=0.05)
    assert (eigenvalues > relative * eigenvalues.mean()).sum() == 3  # only the spikes stand above it
    # wider than the sample: the n non-zero eigenvalues carry the law of ratio n/k
    wide = 2.0 * rng.normal(size=(200, 500))
    eigenvalues = np.linalg.eigvalsh(wide.T @ wide / 200)
    assert mp_damping(eigenvalues, 200) * eigenvalues.mean() == pytest.approx(4.0 * (1 + np.sqrt(2.5)) ** 2, rel=0.1)


def test_zero_damping_is_the_pseudo_inverse():
    from gradindex.features.precondition import inverse

    rng = np.random.default_rng(2)
    basis = rng.normal(size=(6, 3))
    gram = basis @ basis.T  # rank 3
    inv, lam = inverse(gram, 0.0)
    assert lam == 0.0
    np.testing.assert_allclose(inv, np.linalg.pinv(gram), atol=1e-8)
    np.testing.assert_allclose(gram @ inv @ gram, gram, atol=1e-8)


def test_named_dampings_resolve_per_group(toy_store):
    from gradindex.config import parse_damping
    from gradindex.weights.damping import resolve_damping, schedule_damping

    assert resolve_damping(toy_store, "pinv") == 0.0
    mp = resolve_damping(toy_store, parse_damping(" MP ", "damping"))
    assert set(mp) == set(toy_store.groups) and all(v > 0 for v in mp.values())
    assert resolve_damping(toy_store, "mp", Preconditioner.IDENTITY) == "mp"
    with pytest.raises(ConfigError, match="learning rates"):
        resolve_damping(toy_store, "schedule")  # the toy task does not say its schedule
    gram = np.diag([1.0, 3.0])  # mean eigenvalue 2: λ = 1/Σ η = 0.1 is relative damping 0.05
    assert schedule_damping(gram, 10.0) == pytest.approx(0.05)
