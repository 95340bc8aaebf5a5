"""The paper's objective (LearnMethod.SSL): against a brute-force loss, a planted noise group,
what is and is not invariant, determinism, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gradindex.cli import main
from gradindex.config import LearnConfig, Preconditioner
from gradindex.weights.learn import fit_weights, learn_weights, ssl_loss
from gradindex.features.precondition import QueryPreconditioner

SSL = LearnConfig(method="ssl", steps=150, regularization=0.01)


def _scores(seed: int = 0, noise_scale: float = 1.0) -> np.ndarray:
    """[3 groups, 40 queries, 150 references]: groups 0 and 1 carry one sparse signal (a few references
    stand out per query) under their own noise; group 2 is pure noise of the same scale."""
    rng = np.random.default_rng(seed)
    signal = 5.0 * (rng.random((40, 150)) < 0.04) + 0.3 * rng.normal(size=(40, 150))
    return np.stack([signal + 0.5 * rng.normal(size=signal.shape), 2.0 * (signal + rng.normal(size=signal.shape)),
                     noise_scale * 2.0 * rng.normal(size=signal.shape)])


def test_ssl_loss_equals_a_per_query_loop():
    scores = torch.as_tensor(_scores()[0], dtype=torch.float64)
    expected = [-np.sort(row)[-7:].mean() / np.linalg.norm(row) for row in scores.numpy()]
    np.testing.assert_allclose(ssl_loss(scores, 7).numpy(), expected, rtol=1e-12)


def test_planted_pure_noise_group_is_turned_down():
    weights, info = fit_weights(_scores(), SSL)
    assert weights[2] < 0.5 * min(weights[0], weights[1])
    assert info["shares"][2] < info["uniform_shares"][2] / 2
    assert info["ssl_learned"] > info["ssl_uniform"]
    assert weights.mean() == pytest.approx(1.0)


def test_ssl_is_invariant_to_a_common_scale_and_deterministic():
    scores = _scores()
    weights, info = fit_weights(scores, SSL)
    for factor in (1e-6, 1e6):
        scaled, scaled_info = fit_weights(factor * scores, SSL)
        np.testing.assert_allclose(scaled, weights, rtol=1e-4)
        assert scaled_info["ssl_learned"] == pytest.approx(info["ssl_learned"], rel=1e-5)
    again, _ = fit_weights(scores, SSL)
    np.testing.assert_array_equal(again, weights)


def test_one_group_scale_only_matters_under_grad_dot():
    """Stated invariance: the loss sees only the products w_g·S_g, but the start (uniform w) and the pull
    λ‖w‖² are in raw units, so one group's scale changes what is learned (as it changes uniform
    grad-dot). Under the Gram preconditioner with relative damping a group's scores do not change when
    its gradients are rescaled (train and query side alike), so neither do the weights."""
    scores = _scores()
    weights, _ = fit_weights(scores, SSL)
    rescaled = scores.copy()
    rescaled[0] *= 30.0
    moved, _ = fit_weights(rescaled, SSL)
    assert not np.allclose(moved[0] * 30.0 / moved[1], weights[0] / weights[1], rtol=0.05)

    rng = np.random.default_rng(3)
    train, query = rng.normal(size=(200, 6)), rng.normal(size=(5, 6))
    gram = train.T @ train / len(train)

    def gram_scores(c: float) -> np.ndarray:
        precondition = QueryPreconditioner(Preconditioner.GRAM, {"g": c * c * gram}, 0.1, ["g"])
        psi = precondition({"g": torch.as_tensor(c * query, dtype=torch.float32)})["g"].numpy()
        return psi @ (c * train).T

    np.testing.assert_allclose(gram_scores(1e3), gram_scores(1.0), rtol=1e-3, atol=1e-5)


def test_a_group_with_no_gradient_gets_zero_weight():
    scores = _scores()
    scores[1] = 0.0
    weights, info = fit_weights(scores, LearnConfig(method="ssl", steps=20))
    assert weights[1] == 0.0 and info["shares"][1] == 0.0 and np.isfinite(weights).all()


@pytest.mark.parametrize("preconditioner", [Preconditioner.IDENTITY, Preconditioner.GRAM])
def test_ssl_drops_the_toy_tasks_noise_branch(toy_store, preconditioner):
    """The toy task's `noise` group: random gradients carrying most of the norm (see test_learn.py)."""
    config = LearnConfig(method="ssl", preconditioner=preconditioner, seed=1)
    first = learn_weights(toy_store, config, save=False, show_progress=False)
    second = learn_weights(toy_store, config, save=False, show_progress=False)
    assert first.weights == second.weights
    assert first.info["method"] == "ssl"
    assert first.info["shares"]["noise"] < first.info["uniform_shares"]["noise"]


def test_cli_learns_ssl_weights(toy_store, tmp_path):
    import shutil

    path = tmp_path / "store"
    shutil.copytree(toy_store.path, path)
    result = CliRunner().invoke(main, ["learn-weights", str(path), "--method", "ssl", "--steps", "30", "--trust-task",
                                       "--damping", "auto"])
    assert result.exit_code == 0, result.output
    assert "objective: ssl" in result.output and "damping auto, per group" in result.output
    info = CliRunner().invoke(main, ["info", str(path)])
    assert "ssl for gram" in info.output, info.output


@pytest.mark.parametrize("factor", [1e-3, 30.0, 1e4])
def test_ssl_with_group_norm_is_invariant_to_rescaling_one_group(factor):
    """With per-group normalisation (``--group-norm rms``) the ssl objective sees unit-rms groups: rescaling
    one group's scores leaves the shares (and so every weighted score w_g·S_g) unchanged and only rescales
    that group's raw weight inversely."""
    config = LearnConfig(method="ssl", group_norm="rms", steps=150, regularization=0.01)
    scores = _scores()
    weights, info = fit_weights(scores, config)
    one = scores.copy()
    one[1] *= factor
    rescaled, rescaled_info = fit_weights(one, config)
    np.testing.assert_allclose(rescaled_info["shares"], info["shares"], rtol=1e-4, atol=1e-7)
    ratio = rescaled / weights
    assert ratio[1] / ratio[0] == pytest.approx(1 / factor, rel=1e-4)
    assert ratio[2] / ratio[0] == pytest.approx(1.0, rel=1e-4)
    assert rescaled_info["ssl_learned"] == pytest.approx(info["ssl_learned"], rel=1e-5)
    assert info["shares"][2] < info["uniform_shares"][2] / 2  # and the noise group is still turned down
