"""The top-k agreement objective (DESIGN §1.4) on planted score matrices, and its choice in learn_weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradindex.config import LearnConfig, LearnMethod
from gradindex.errors import ConfigError
from gradindex.weights.learn import _method_and_values, agreement, fit_weights


def _planted(seed: int = 0, queries: int = 24, references: int = 300, values: int = 4):
    """Group 0 ('concept'): a query scores the 25 references of its value high. Group 1 ('peaks'):
    every query has its own 5 random references far above the rest (high SNR, no shared value)."""
    rng = np.random.default_rng(seed)
    value = np.arange(queries) % values
    members = rng.permutation(references)[: 25 * values].reshape(values, 25)
    concept = rng.normal(size=(queries, references))
    peaks = rng.normal(size=(queries, references))
    for q in range(queries):
        concept[q, members[value[q]]] += 2.0
        peaks[q, rng.choice(references, 5, replace=False)] += 12.0
    return np.stack([concept, peaks]).astype(np.float32), value


def test_agreement_prefers_the_group_whose_topk_queries_of_one_value_share():
    scores, value = _planted()
    weights, info = fit_weights(scores, LearnConfig(), value)
    shares = info["shares"]
    assert shares[0] > 0.8, shares
    assert info["agreement_learned"] > info["agreement_uniform"]
    _, snr_info = fit_weights(scores, LearnConfig())  # the SNR objective goes for the peaks instead
    assert snr_info["shares"][1] > snr_info["shares"][0], snr_info["shares"]


def test_agreement_value_contrasts_same_and_different_pairs():
    value = np.array([0, 0, 1, 1])
    same = torch.as_tensor(value[:, None] == value[None, :])
    aligned = torch.tensor([[5.0, 0, 0, 0], [5.0, 0, 0, 0], [0, 0, 5.0, 0], [0, 0, 5.0, 0]])
    crossed = aligned[[0, 2, 1, 3]]  # the same rows, paired across values
    assert agreement(aligned, same) > 0 > agreement(crossed, same)


def test_agreement_needs_both_kinds_of_pairs():
    scores, value = _planted()
    with pytest.raises(ConfigError, match="share a concept value"):
        fit_weights(scores, LearnConfig(), np.zeros_like(value))
    with pytest.raises(ConfigError, match="query values"):
        fit_weights(scores, LearnConfig(), value[:3])


class _Task:
    def metadata(self, dataset):
        return {"style": np.array(["a", "b", "a", "c"])} if dataset == "labelled" else {}


def test_auto_uses_agreement_when_queries_carry_the_concept():
    task = _Task()
    method, values = _method_and_values(task, "labelled", "style", LearnMethod.AUTO)
    assert method is LearnMethod.AGREEMENT and list(values) == ["a", "b", "a", "c"]
    subset = torch.utils.data.Subset("labelled", [1, 3])  # a sample of the queries (of a split of them)
    assert list(_method_and_values(task, subset, "style", LearnMethod.AUTO)[1]) == ["b", "c"]
    nested = torch.utils.data.Subset(torch.utils.data.Subset("labelled", [0, 1, 3]), [0, 2])
    assert list(_method_and_values(task, nested, "style", LearnMethod.AUTO)[1]) == ["a", "c"]
    assert _method_and_values(task, "labelled", "all", LearnMethod.AUTO) == (LearnMethod.SNR, None)
    assert _method_and_values(task, "plain", "style", LearnMethod.AUTO) == (LearnMethod.SNR, None)
    with pytest.raises(ConfigError, match="--method snr"):
        _method_and_values(task, "plain", "style", LearnMethod.AGREEMENT)
