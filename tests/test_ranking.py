"""Ranking metrics over the whole training set (gradindex.eval.ranking) against brute force and sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from gradindex.errors import ConfigError
from gradindex.eval.ranking import concept_relevance, dense_scores, mean_metrics, ranking_metrics
from gradindex.index import TopK


def brute_force(scores, relevant, keep, k):
    """AP, recall@k, precision@k, recall@|G| of one query by explicit loops over the ranked candidates."""
    ranked = sorted((j for j in range(len(scores)) if keep[j]), key=lambda j: -scores[j])
    total = sum(relevant[j] for j in ranked)
    precisions, hits = [], 0
    for rank, j in enumerate(ranked, start=1):
        if relevant[j]:
            hits += 1
            precisions.append(hits / rank)
    top_k = sum(relevant[j] for j in ranked[:k])
    top_g = sum(relevant[j] for j in ranked[:total])
    return np.mean(precisions), top_k / total, top_k / k, top_g / total


def test_metrics_match_brute_force_and_sklearn_over_candidate_subsets():
    rng = np.random.default_rng(0)
    n, size = 7, 300
    scores = rng.normal(size=(n, size))  # continuous: no ties
    relevant = rng.random((n, size)) < rng.uniform(0.05, 0.5, size=(n, 1))
    keep = rng.random((n, size)) < 0.6
    every = ranking_metrics(scores, relevant, ks=(10, 100))
    subset = ranking_metrics(scores, relevant, keep, ks=(10, 100))
    for i in range(n):
        assert every["ap"][i] == pytest.approx(average_precision_score(relevant[i], scores[i]))
        assert subset["ap"][i] == pytest.approx(average_precision_score(relevant[i][keep[i]], scores[i][keep[i]]))
        for k in (10, 100):
            ap, recall, precision, r_precision = brute_force(scores[i], relevant[i], keep[i], k)
            assert subset["ap"][i] == pytest.approx(ap)
            assert subset[f"recall@{k}"][i] == pytest.approx(recall)
            assert subset[f"precision@{k}"][i] == pytest.approx(precision)
            assert subset["recall@G"][i] == pytest.approx(r_precision)
        assert subset["relevant"][i] == (relevant[i] & keep[i]).sum()


def test_perfect_and_reversed_rankings_and_empty_relevant_sets():
    relevant = np.array([[True, True, False, False, False], [False] * 5])
    perfect = np.array([[5.0, 4, 3, 2, 1], [5.0, 4, 3, 2, 1]])
    out = ranking_metrics(perfect, relevant, ks=(1, 2))
    assert out["ap"][0] == 1 and out["recall@G"][0] == 1 and out["recall@1"][0] == 0.5 and out["precision@2"][0] == 1
    assert np.isnan(out["ap"][1]) and out["relevant"][1] == 0
    worst = ranking_metrics(-perfect, relevant, ks=(2,))
    assert worst["ap"][0] == pytest.approx((1 / 4 + 2 / 5) / 2) and worst["recall@2"][0] == 0
    assert mean_metrics(out)["ap"] == 1.0  # the query with nothing relevant is left out
    # a 1-d candidate mask applies to every query; removing the first relevant example ranks the other first
    only = ranking_metrics(-perfect, relevant, np.array([True, False, True, True, True]), ks=(1,))
    assert only["ap"][0] == pytest.approx(1 / 4) and only["relevant"][0] == 1


def test_dense_scores_place_results_by_training_id_and_relevance_skips_unspecified():
    train_ids = np.array([30, 10, 20])
    top = TopK(scores=np.array([[3.0, 2.0, 1.0], [9.0, -1.0, 0.0]], dtype=np.float32),
               sample_ids=np.array([[20, 30, 10], [10, -1, -1]]))
    dense = dense_scores(top, train_ids)
    np.testing.assert_array_equal(dense, [[2.0, 1.0, 3.0], [-np.inf, 9.0, -np.inf]])
    relevance = concept_relevance(np.array(["a", "b", "a"]), np.array(["a", ""]))
    np.testing.assert_array_equal(relevance, [[True, False, True], [False, False, False]])


def test_bad_input_is_one_config_error():
    with pytest.raises(ConfigError, match="same"):
        ranking_metrics(np.zeros((2, 3)), np.zeros((2, 4), bool))
    with pytest.raises(ConfigError, match="NaN"):
        ranking_metrics(np.full((1, 2), np.nan), np.ones((1, 2), bool))
    with pytest.raises(ConfigError, match="positive"):
        ranking_metrics(np.zeros((1, 2)), np.ones((1, 2), bool), ks=(0,))


def test_caption_scores_rank_named_matches_first_in_a_seeded_random_order():
    from gradindex.eval.baselines import caption_scores

    values = np.array(["a", "b", "a", "a", "b", "a"])
    named = np.array([True, True, False, True, True, True])
    scores = caption_scores(values, named, np.array(["a", ""]), seed=1)
    top = np.argsort(-scores[0])[:3]
    assert set(top) == {0, 3, 5}  # the captions naming "a"; index 2 is an "a" its caption does not name
    assert scores[1].max() < 0.5  # a query naming nothing: noise alone
    np.testing.assert_array_equal(scores, caption_scores(values, named, np.array(["a", ""]), seed=1))
    assert not np.array_equal(scores, caption_scores(values, named, np.array(["a", ""]), seed=2))
    with pytest.raises(ConfigError, match="caption scores"):
        caption_scores(values, named[:3], np.array(["a"]))


def test_image_similarity_scores_against_brute_force():
    from gradindex.eval.baselines import pixel_scores, random_feature_scores, random_features

    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(9, 8, 8, 3), dtype=np.uint8)
    queries = np.concatenate([train[[4]], rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)])
    pixels = pixel_scores(queries, train)
    for i, q in enumerate(queries.astype(float)):
        for j, x in enumerate(train.astype(float)):
            assert pixels[i, j] == pytest.approx(-((q - x) ** 2).sum())
    assert pixels[0].argmax() == 4
    features = random_features(train, seed=3)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(features, random_features(train, seed=3))
    assert not np.allclose(features, random_features(train, seed=4))
    cosine = random_feature_scores(queries, train, seed=3)
    np.testing.assert_allclose(cosine, random_features(queries, seed=3) @ features.T, rtol=1e-5)
    assert cosine[0].argmax() == 4
