"""Weight learning: invariances, determinism, a planted uninformative group, concepts, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gradindex.cli import main
from gradindex.config import IndexConfig, LearnConfig, Preconditioner
from gradindex.errors import ConfigError
from gradindex.index import build_index
from gradindex.weights.learn import fit_weights, learn_weights, score_matrices, snr
from gradindex.query.attributor import Attributor
from gradindex.features.query import load_store_task, query_group_features
from gradindex.store.feature_store import FeatureStore
from gradindex.weights.group_weights import GroupWeights


def _structured_scores(seed: int = 0) -> np.ndarray:
    """[3 groups, 40 queries, 120 references]: a shared low-rank signal plus group noise of unequal scale."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(40, 4)) @ rng.normal(size=(4, 120))
    signal += 4 * (rng.random((40, 120)) < 0.03)  # a few references stand out per query
    scales, noise = [1.0, 30.0, 0.01], [0.5, 3.0, 1.0]
    return np.stack([s * (signal + n * rng.normal(size=signal.shape)) for s, n in zip(scales, noise)])


def test_snr_is_scale_and_shift_free():
    scores = torch.as_tensor(_structured_scores()[0])
    assert torch.allclose(snr(scores, 5), snr(1e4 * scores - 3.0, 5), rtol=1e-6)


def test_learning_is_invariant_to_rescaling_scores():
    scores = _structured_scores()
    config = LearnConfig(steps=60)
    weights, info = fit_weights(scores, config)
    for factor in (1e-4, 1e5):
        scaled, scaled_info = fit_weights(factor * scores, config)
        np.testing.assert_allclose(scaled, weights, rtol=1e-4)
        assert scaled_info["snr_learned"] == pytest.approx(info["snr_learned"], rel=1e-5)
    # rescaling one group only rescales that group's raw weight inversely (per-group normalisation)
    one = scores.copy()
    one[1] *= 1e3
    rescaled, rescaled_info = fit_weights(one, config)
    np.testing.assert_allclose(rescaled_info["shares"], info["shares"], rtol=1e-4, atol=1e-7)
    ratio = rescaled / weights
    assert ratio[1] / ratio[0] == pytest.approx(1e-3, rel=1e-4)
    assert ratio[2] / ratio[0] == pytest.approx(1.0, rel=1e-4)


def test_learning_moves_away_from_a_noisy_group():
    weights, info = fit_weights(_structured_scores(), LearnConfig())
    shares = np.array(info["shares"])
    assert shares[1] < min(shares[0], shares[2])  # group 1 has the worst signal-to-noise
    assert info["snr_learned"] > info["snr_uniform"]
    assert weights.mean() == pytest.approx(1.0)


def test_a_group_with_no_gradient_gets_zero_weight():
    scores = _structured_scores()
    scores[2] = 0.0
    weights, info = fit_weights(scores, LearnConfig(steps=30))
    assert weights[2] == 0.0 and info["shares"][2] == 0.0
    assert np.isfinite(weights).all()


def test_learning_is_deterministic_under_a_fixed_seed(toy_store):
    config = LearnConfig(num_queries=24, reference_size=100, steps=50, seed=3)
    first = learn_weights(toy_store, config, save=False, show_progress=False)
    second = learn_weights(toy_store, config, save=False, show_progress=False)
    assert first.weights == second.weights
    other = learn_weights(toy_store, LearnConfig(num_queries=24, reference_size=100, steps=50, seed=4),
                          save=False, show_progress=False)
    assert other.weights != first.weights


def _top(scores: np.ndarray, k: int) -> list[set]:
    return [set(row) for row in np.argsort(-scores, axis=1)[:, :k]]


@pytest.mark.parametrize("preconditioner", [Preconditioner.IDENTITY, Preconditioner.GRAM])
def test_planted_uninformative_group_is_switched_off(toy_store, preconditioner):
    """The noise branch's gradients are δ·(30 z)ᵀ with a random z per example: no information,
    most of the gradient norm. Learned weights drop it and recover the noise-free top-k."""
    config = LearnConfig(preconditioner=preconditioner)
    weights = learn_weights(toy_store, config, save=False, show_progress=False)
    uniform_shares = weights.info["uniform_shares"]
    assert uniform_shares["noise"] == max(uniform_shares.values())  # it dominates uniform scores
    assert weights.info["shares"]["noise"] <= 0.05
    assert weights.weights["noise"] / sum(weights.weights.values()) <= 0.05

    task = load_store_task(toy_store)
    queries = task.query_dataset()
    query = query_group_features(toy_store, queries, preconditioner=preconditioner, damping=config.damping)
    _, train = toy_store.read()
    groups = toy_store.groups
    per_group = dict(zip(groups, score_matrices(query, train, groups)))

    def top(w: dict[str, float]) -> list[set]:
        return _top(sum(w[g] * per_group[g] for g in groups), 10)

    def overlap_with_noise_free(w: dict[str, float]) -> float:
        found, clean = top(w), top({**w, "noise": 0.0})
        return float(np.mean([len(a & b) / 10 for a, b in zip(found, clean)]))

    uniform = overlap_with_noise_free({g: 1.0 for g in groups})
    learned = overlap_with_noise_free(weights.weights)
    print(f"top-10 overlap with the noise-free attribution: uniform {uniform:.3f}, learned {learned:.3f}")
    assert learned > uniform + 0.1, (uniform, learned)
    assert learned >= 0.9


def test_saved_weights_feed_the_index_of_their_setting_only(toy_store, tmp_path):
    store = FeatureStore.open(toy_store.path, trust_task=True)
    learned = learn_weights(store, LearnConfig(steps=30), concept="all", show_progress=False)
    reopened = FeatureStore.open(store.path)
    assert GroupWeights.from_manifest(reopened.manifest, "all", store.groups).weights == learned.weights
    uniform = {g: 1.0 for g in store.groups}  # weights are kept per setting: none learned for these
    assert build_index(reopened, IndexConfig(concept="c1", preconditioner="identity"),
                       show_progress=False).weights.weights == uniform
    assert build_index(reopened, IndexConfig(concept="c2", damping=0.5), show_progress=False).weights.weights == uniform
    with pytest.raises(ConfigError, match="learned for preconditioner gram"):  # given weights of another setting
        build_index(reopened, IndexConfig(concept="c3", preconditioner="identity"), learned, show_progress=False)
    index = build_index(reopened, IndexConfig(), show_progress=False)
    assert index.weights.weights == learned.weights
    attributor = Attributor.open(reopened, trust_task=True)
    top = attributor.attribute(load_store_task(reopened, trust_task=True).query_dataset(), k=5)
    attributor.close()
    assert top.sample_ids.shape == (48, 5)


def test_concepts_learn_their_own_weights_through_the_cli(concept_store, tmp_path):
    runner = CliRunner()
    path = str(concept_store.path)
    shares = {}
    for concept in ("first", "second"):
        result = runner.invoke(main, ["-q", "learn-weights", path, "--concept", concept, "--steps", "50",
                                      "--trust-task"])
        assert result.exit_code == 0, result.output
        assert "mean SNR" in result.output
        manifest = json.loads((concept_store.path / "manifest.json").read_text())
        shares[concept] = manifest["weights"][concept]["gram@0.1"]["info"]["shares"]
    # each concept's measurement has no gradient through the other concept's head
    assert shares["first"]["heads.1"] == 0.0 and shares["first"]["heads.0"] > 0.05
    assert shares["second"]["heads.0"] == 0.0 and shares["second"]["heads.1"] > 0.05
    info = runner.invoke(main, ["info", path])
    assert info.exit_code == 0 and "w[first]" in info.output and "w[second]" in info.output
    assert "weights 'first': snr for gram" in info.output
    png = tmp_path / "weights.png"
    plot = runner.invoke(main, ["weights", "plot", path, "--out", str(png)])
    assert plot.exit_code == 0 and png.stat().st_size > 1000
    built = runner.invoke(main, ["-q", "build-index", path, "--concept", "second"])
    assert built.exit_code == 0, built.output
    bad = runner.invoke(main, ["learn-weights", path, "--concept", "third", "--trust-task"])
    assert bad.exit_code == 2 and "the task measures all, first, second" in bad.output
