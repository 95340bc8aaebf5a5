"""The "same answer" definition (tests/same_answer.py, docs/same-answer.md) accepts exactly what it says."""

from __future__ import annotations

import numpy as np
import pytest
from same_answer import RTOL, assert_same_answers, assert_same_ranking, ranking_differences, same_ranking

IDS = [7, 3, 9, 4]
SCORES = [15365.826171875, 9000.5, 9000.0, 12.0]


def test_identical_and_last_bits_apart_are_the_same():
    assert ranking_differences(IDS, SCORES, IDS, SCORES) == []
    other_cpu = [15365.8203125, 9000.5 - 2 ** -7, 9000.0, 12.0 + 2 ** -20]  # the served-vs-CLI pair
    assert ranking_differences(IDS, other_cpu, IDS, SCORES) == []


def test_scores_beyond_the_tolerance_differ():
    off = [15365.826171875, 9000.5, 9000.0, 12.0 + 3 * RTOL * 15365.826171875]
    assert ranking_differences(IDS, off, IDS, SCORES)


def test_near_ties_may_swap_and_clear_gaps_may_not():
    tied = [15365.8, 9000.01, 9000.0, 12.0]
    assert ranking_differences([7, 9, 3, 4], [15365.8, 9000.01, 9000.0, 12.0], IDS, tied) == []
    assert ranking_differences([3, 7, 9, 4], SCORES, IDS, SCORES)  # 15365 vs 9000: not a tie


def test_an_id_past_k_is_allowed_only_in_a_tie_with_the_last_rank():
    scores = [100.0, 50.0, 20.0, 20.0]
    assert ranking_differences([7, 3, 9, 11], scores, IDS, scores) == []  # 11 tied with 4 past k
    assert ranking_differences([7, 3, 11, 9], scores, IDS, scores) == []
    assert ranking_differences([7, 11, 9, 4], scores, IDS, scores)  # 11 at rank 1 scores 50, the last 20


@pytest.mark.parametrize("ids, scores", [([7, 7, 9, 4], SCORES), (IDS, [np.nan, 9000.5, 9000.0, 12.0]),
                                         ([7, 3, 9, -1], SCORES), ([7, 3, 9], SCORES[:3])])
def test_duplicates_nan_padding_and_lengths_differ(ids, scores):
    assert ranking_differences(ids, scores, IDS, SCORES)


def test_array_and_json_forms():
    ids, scores = np.array([IDS, IDS]), np.array([SCORES, SCORES], np.float32)
    assert_same_ranking(ids, scores, ids, scores.astype(np.float64))
    assert same_ranking((ids, scores), (ids, scores)) and not same_ranking((ids[:, ::-1], scores), (ids, scores))
    answer = [{"query": 0, "results": [{"rank": i + 1, "sample_id": s, "score": v, "label": s % 2}
                                       for i, (s, v) in enumerate(zip(IDS, SCORES))]}]
    assert_same_answers(answer, answer)
    relabeled = [{"query": 0, "results": [{**r, "label": 5} for r in answer[0]["results"]]}]
    with pytest.raises(AssertionError):
        assert_same_answers(relabeled, answer)
    with pytest.raises(AssertionError):
        assert_same_answers([{**answer[0], "query": 1}], answer)
