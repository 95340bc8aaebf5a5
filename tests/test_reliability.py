"""The ceiling and the two-way bootstrap against synthetic ground truth whose noise is known."""

from __future__ import annotations

import numpy as np
import pytest

from gradindex.errors import ConfigError
from gradindex.eval.lds import lds_per_query
from gradindex.eval.reliability import bootstrap_lds, bootstrap_se, lds_ceiling, paired_se, split_half_reliability


def _runs(signal_sd: float, noise_sd: float, runs: int, models: int, queries: int, seed: int = 0):
    """``(signal [M, Q], runs [R, M, Q])``: each run measures the subset's signal plus independent seed noise."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(0, signal_sd, (models, queries))
    return signal, signal + rng.normal(0, noise_sd, (runs, models, queries))


def _spearman_of_gaussians(pearson: float) -> float:
    """Spearman's rho of a bivariate normal with correlation ``pearson`` (Pearson 1907)."""
    return 6 / np.pi * np.arcsin(pearson / 2)


@pytest.mark.parametrize("runs", [2, 4, 5])
def test_split_half_reliability_matches_theory(runs):
    noise = 1.5  # the seed's share of one run's variance: 2.25 / 3.25 ≈ 0.69
    _, measured = _runs(1.0, noise, runs, models=400, queries=300)
    half = runs // 2
    # the two half-means correlate (Pearson) σ²/(σ² + σ_n²/h); Spearman's rho of that, stepped up to R runs
    r_half = _spearman_of_gaussians(1 / (1 + noise**2 / half))
    n = runs / half
    expected = n * r_half / (1 + (n - 1) * r_half)
    assert split_half_reliability(measured).mean() == pytest.approx(expected, abs=0.015)


def test_the_ceiling_is_what_a_perfect_estimator_reaches():
    """An estimator predicting the runs' common signal exactly scores about the ceiling, and the
    ceiling rises with R as the Spearman–Brown formula says."""
    signal, measured = _runs(1.0, 2.0, 8, models=300, queries=300, seed=1)
    for runs in (2, 4, 8):
        reliability, ceiling = lds_ceiling(measured[:runs])
        perfect = lds_per_query(signal, measured[:runs].mean(0)).mean()
        assert ceiling == pytest.approx(perfect, abs=0.02)
        assert reliability == pytest.approx(1 / (1 + 4.0 / runs), abs=0.03)  # Pearson theory σ²/(σ² + σ_n²/R)
    assert lds_ceiling(measured[:1]) is None
    with pytest.raises(ConfigError, match="R >= 2"):
        split_half_reliability(measured[:1])


def _dataset(rng, models: int, queries: int):
    """Predictions and measurements sharing model-level effects across queries: each model's subset
    shifts every query's prediction (``v``) and every measurement (``u``), so the queries' Spearman
    errors are correlated through the models: a standard error over queries alone is too small."""
    v, u = rng.normal(0, 1, (models, 1)), rng.normal(0, 1, (models, 1))
    predicted = v + rng.normal(0, 1, (models, queries))
    return predicted, predicted + 1.5 * u + rng.normal(0, 1, (models, queries))


def test_the_bootstrap_recovers_the_sampling_spread_over_models_and_queries():
    rng = np.random.default_rng(3)
    models, queries = 24, 40
    truth = np.std([lds_per_query(*_dataset(rng, models, queries)).mean() for _ in range(600)])
    boot, naive = [], []
    for _ in range(12):
        predicted, measured = _dataset(rng, models, queries)
        boot.append(bootstrap_se(bootstrap_lds([predicted], measured, replicates=300, seed=len(boot)))[0])
        per_query = lds_per_query(predicted, measured)
        naive.append(per_query.std(ddof=1) / np.sqrt(queries))
    assert 0.8 * truth < np.mean(boot) < 1.35 * truth  # two-way: right, at worst a little conservative
    assert np.mean(naive) < 0.6 * truth  # the queries alone miss most of it here


def test_paired_differences_cancel_what_the_estimators_share():
    rng = np.random.default_rng(4)
    predicted, measured = _dataset(rng, 32, 50)
    other = predicted + 0.2 * rng.normal(0, 1, predicted.shape)
    replicates = bootstrap_lds([predicted, other, predicted], measured, replicates=200)
    se = bootstrap_se(replicates)
    assert paired_se(replicates, 0, 2) == 0.0
    assert paired_se(replicates, 0, 1) < 0.5 * min(se[0], se[1])
    with pytest.raises(ConfigError, match="one \\[M, Q\\] shape"):
        bootstrap_lds([predicted[:3]], measured)
