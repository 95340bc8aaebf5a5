"""Preconditioner math against explicit formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradindex.config import Preconditioner
from gradindex.errors import ConfigError
from gradindex.features.precondition import GramAccumulator, QueryPreconditioner, inverse


def test_gram_accumulates_over_batches_and_skips_wide_groups():
    rng = np.random.default_rng(0)
    phi = {"a": rng.normal(size=(30, 4)), "b": rng.normal(size=(30, 9))}
    acc = GramAccumulator({"a": 4, "b": 9}, max_dim=8)
    for start in range(0, 30, 7):
        acc.update({g: v[start:start + 7].astype(np.float32) for g, v in phi.items()})
    result = acc.result()
    assert acc.skipped == ["b"] and set(result) == {"a"} and acc.count == 30
    np.testing.assert_allclose(result["a"], phi["a"].T @ phi["a"] / 30, rtol=1e-5)


@pytest.mark.parametrize("damping", [1e-3, 0.1, 2.0])
def test_inverse_equals_explicit_damped_inverse(damping):
    rng = np.random.default_rng(1)
    phi = rng.normal(size=(50, 6)) * np.array([10, 1, 1, 0.1, 0.01, 5])
    gram = phi.T @ phi / 50
    got, lam = inverse(gram, damping)
    assert lam == pytest.approx(damping * np.trace(gram) / 6)
    np.testing.assert_allclose(got, np.linalg.inv(gram + lam * np.eye(6)), rtol=1e-8, atol=1e-10)


def test_singular_gram_without_damping_falls_back_to_pseudo_inverse():
    gram = np.diag([2.0, 0.0])
    got, lam = inverse(gram, 0.0)
    assert lam == 0.0
    np.testing.assert_allclose(got, np.diag([0.5, 0.0]))


def test_query_preconditioner_applies_inverse_per_group():
    rng = np.random.default_rng(2)
    grams = {"a": np.cov(rng.normal(size=(5, 40))), "b": np.eye(2) * 3}
    pre = QueryPreconditioner(Preconditioner.GRAM, grams, damping=0.01, groups=["a", "b"])
    features = {"a": torch.randn(3, 5), "b": torch.randn(3, 2)}
    out = pre(features)
    for group, gram in grams.items():
        explicit, _ = inverse(gram, 0.01)
        np.testing.assert_allclose(out[group].numpy(), features[group].numpy() @ explicit, rtol=1e-4, atol=1e-5)
    identity = QueryPreconditioner(Preconditioner.IDENTITY)
    assert identity(features)["a"] is features["a"]


def test_gram_preconditioner_needs_every_group():
    with pytest.raises(ConfigError, match="no Gram matrix for groups \\['b'\\]"):
        QueryPreconditioner(Preconditioner.GRAM, {"a": np.eye(2)}, 0.1, groups=["a", "b"])
