"""Seeded projectors: reproducibility, chunking, E[PᵀP] = I, dimension planning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import gradindex.features.projection as projection
from gradindex.config import ProjectionConfig, ProjectionKind
from gradindex.features.groups import Block
from gradindex.features.projection import Projector, derive_seed, factor_dims, make_block_projector, random_matrix
from reference import dense_block_matrix


def test_derive_seed_is_stable_and_key_sensitive():
    assert derive_seed(0, "fc1", "left") == derive_seed(0, "fc1", "left")
    assert len({derive_seed(0, "fc1", "left"), derive_seed(0, "fc1", "right"), derive_seed(1, "fc1", "left")}) == 3
    # a fixed function of the text (no Python hash salt): blake2b-64 of "0|a", top bit cleared
    assert derive_seed(0, "a") == 5635702516447729777
    in_subprocess = subprocess.run([sys.executable, "-c", "from gradindex.features.projection import derive_seed; print(derive_seed(0, 'a'))"],
                                   capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert int(in_subprocess.stdout) == 5635702516447729777


@pytest.mark.parametrize("kind", [ProjectionKind.GAUSSIAN, ProjectionKind.RADEMACHER])
def test_random_matrix_preserves_inner_products_in_expectation(kind):
    m = random_matrix(kind, 20000, 6, seed=3)
    torch.testing.assert_close(m.T @ m, torch.eye(6), atol=0.04, rtol=0)
    if kind is ProjectionKind.RADEMACHER:
        torch.testing.assert_close(m.abs(), torch.full_like(m, 20000 ** -0.5))


def test_chunked_and_regenerated_projectors_equal_the_cached_one(monkeypatch):
    x = torch.randn(5, 3000)
    whole = Projector(ProjectionKind.GAUSSIAN, 3000, 16, seed=7)
    monkeypatch.setattr(projection, "CHUNK_BYTES", 16 * 4 * 700)  # 700 columns per chunk
    chunked = Projector(ProjectionKind.GAUSSIAN, 3000, 16, seed=7)
    monkeypatch.setattr(projection, "MAX_CACHED_BYTES", 0)
    regenerated = Projector(ProjectionKind.GAUSSIAN, 3000, 16, seed=7)
    assert len(chunked._bounds) == 5 and regenerated._chunks is None
    torch.testing.assert_close(chunked(x), x @ chunked.matrix().T)
    torch.testing.assert_close(regenerated(x), chunked(x))
    assert whole(x).shape == (5, 16)


def test_identity_projector_and_columns():
    p = Projector(ProjectionKind.GAUSSIAN, 4, 10, seed=0)
    x = torch.randn(2, 4)
    assert p.is_identity and p(x) is x
    torch.testing.assert_close(p.columns(torch.tensor([[1, 3]])), torch.eye(4)[[1, 3]][None])
    q = Projector(ProjectionKind.GAUSSIAN, 9, 3, seed=0)
    torch.testing.assert_close(q.columns(torch.tensor([2, 5])), q.matrix().T[[2, 5]])
    with pytest.raises(ValueError, match="last dimension 9"):
        q(torch.randn(2, 8))


@pytest.mark.parametrize(
    "left,right,k,factor,expected",
    [(4, 5, 20, 2, (1, 4, 5)), (128, 65, 256, 2, (64, 2, 2)), (10, 1, 4, 2, (2, 2, 1)), (128, 65, 256, 16, (1, 16, 16))],
)
def test_factor_dims(left, right, k, factor, expected):
    assert factor_dims(left, right, k, factor) == expected


def test_stacked_kronecker_heads_preserve_inner_products_in_expectation():
    block = Block("m", ("weight", "bias"), "linear", 3, 4)
    total = torch.zeros(12, 12)
    seeds = 400
    for seed in range(seeds):
        bp = make_block_projector("g", block, ProjectionConfig(proj_dim=8, seed=seed))
        matrix = dense_block_matrix(bp)
        assert matrix.shape == (8, 12) and bp.heads == 2
        total += matrix.T @ matrix
    torch.testing.assert_close(total / seeds, torch.eye(12), atol=0.2, rtol=0)


def test_block_projector_dims_and_identity_when_small():
    small = make_block_projector("g", Block("m", ("weight",), "linear", 3, 4), ProjectionConfig(proj_dim=12))
    assert small.left.is_identity and small.right.is_identity and small.out_dim == 12
    generic = make_block_projector("g", Block("m", ("w",), "generic", 500, 1), ProjectionConfig(proj_dim=32))
    assert generic.out_dim == 32 and generic.dims() == {"k": 32}
    per_group = ProjectionConfig(proj_dim=32, group_dims=(("g", 8),))
    assert make_block_projector("g", Block("m", ("w",), "generic", 500, 1), per_group).out_dim == 8
