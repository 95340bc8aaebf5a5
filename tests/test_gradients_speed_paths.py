"""The engine's fast paths against a per-example autograd loop and explicit dense projections.

The projector takes output gradients at recorded gradient edges and asks autograd for no
parameter gradient unless it verifies (``verify=False`` is the featurization path); it
projects with row-reordered side matrices and combines small Kronecker heads elementwise
(head index innermost, positions in chunks), larger ones by einsum, single heads by a
broadcast product or ``bmm``. Each test here fails if a fast path changes the per-example
gradients, loses the pre-modification gradient of an output changed in place, mixes up
head order, or falls back to computing the weight gradients of a training step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import mixed_batch, mixed_loss, rows
from gradindex.config import ProjectionConfig, ProjectionKind
from gradindex.features.gradients import GradientProjector
from gradindex.features.groups import parameter_groups
from reference import dense_group_projection, per_example_gradients

IDENTITY = ProjectionConfig(kind=ProjectionKind.IDENTITY)


class InPlaceNet(nn.Module):
    """Every block kind with its output modified in place by a non-identity op afterwards."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.seq = nn.Linear(4, 5)  # 3-D input: its output is a view of a 2-D product
        self.flat = nn.Linear(5, 6)  # 2-D input: one position per example (broadcast path)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(6 + 2 * 3 * 3, 3)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h.mul_(1.5)  # embedding output
        h = self.norm(h)
        h.mul_(2.0).add_(0.1)  # generic output
        s = self.seq(h)
        torch.tanh_(s.mul_(0.7))  # view output
        f = self.flat(s.mean(1))
        f.mul_(3.0)
        torch.sigmoid_(f)  # plain 2-D output, twice
        c = self.conv(image)
        torch.relu_(c.mul_(-0.5))  # conv output
        return self.head(torch.cat([f, c.flatten(1)], dim=1))


def inplace_batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 7, (n, 5), generator=g), torch.randn(n, 1, 3, 3, generator=g),
            torch.randint(0, 3, (n,), generator=g))


def inplace_loss(model: nn.Module, batch) -> torch.Tensor:
    tokens, image, labels = batch
    return nn.functional.cross_entropy(model(tokens, image), labels, reduction="none")


def _features(model, config, batch, loss, verify):
    groups = parameter_groups(model)
    with GradientProjector(model, groups, config) as projector:
        return groups, projector(lambda: loss(model, batch), verify=verify), projector.projectors


@pytest.mark.parametrize("verify", [False, True])
def test_in_place_outputs_give_exact_per_example_gradients(verify):
    torch.manual_seed(0)
    model = InPlaceNet().eval()
    batch = inplace_batch(6)
    groups, features, _ = _features(model, IDENTITY, batch, inplace_loss, verify)
    expected = per_example_gradients(model, groups, lambda b: inplace_loss(model, b),
                                     [rows(batch, i) for i in range(6)])
    for group in groups:
        torch.testing.assert_close(features[group.name], expected[group.name], rtol=1e-5, atol=1e-6, msg=group.name)


def test_fast_path_projection_equals_dense_kronecker_projection():
    torch.manual_seed(0)
    model = InPlaceNet().eval()
    batch = inplace_batch(5, seed=2)
    config = ProjectionConfig(kind=ProjectionKind.RADEMACHER, proj_dim=6, seed=4)
    groups, features, projectors = _features(model, config, batch, inplace_loss, verify=False)
    full = per_example_gradients(model, groups, lambda b: inplace_loss(model, b), [rows(batch, i) for i in range(5)])
    for group in groups:
        want = dense_group_projection(projectors[group.name], full[group.name])
        torch.testing.assert_close(features[group.name], want, rtol=1e-4, atol=1e-5, msg=group.name)


def test_fast_path_equals_verified_path_on_the_mixed_net(mixed_net):
    """Linear used twice, in-place ReLU on a view, conv, embedding, generic blocks, root parameter."""
    batch = mixed_batch(7, seed=5)
    groups, fast, _ = _features(mixed_net, IDENTITY, batch, mixed_loss, verify=False)
    expected = per_example_gradients(mixed_net, groups, lambda b: mixed_loss(mixed_net, b),
                                     [rows(batch, i) for i in range(7)])
    for group in groups:
        torch.testing.assert_close(fast[group.name], expected[group.name], rtol=1e-5, atol=1e-6, msg=group.name)


def test_outputs_that_miss_the_loss_or_are_used_twice():
    """An unused branch gets zeros; an output feeding the loss twice gets the summed gradient."""

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 4)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            self.unused(x)
            h = self.used(x)
            return (h * torch.tanh(h)).sum(1) + h.pow(2).mean(1)

    torch.manual_seed(0)
    model = Branches().eval()
    x = torch.randn(5, 3)
    loss = lambda m, batch: m(batch[0])  # noqa: E731
    groups, features, _ = _features(model, IDENTITY, (x,), loss, verify=False)
    expected = per_example_gradients(model, groups, lambda b: loss(model, b), [(x[i : i + 1],) for i in range(5)])
    torch.testing.assert_close(features["used"], expected["used"], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(features["unused"]) == 0


def test_weight_gradients_are_computed_only_to_verify():
    """The featurization path must not run the weight-gradient products of a training step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    reached = []
    for name, param in model.named_parameters():
        param.register_hook(lambda grad, name=name: reached.append(name))
    x = torch.randn(5, 4)
    with GradientProjector(model, parameter_groups(model), ProjectionConfig(proj_dim=4)) as projector:
        projector(lambda: model(x).logsumexp(1))
        assert reached == []
        projector(lambda: model(x).logsumexp(1), verify=True)
        assert sorted(reached) == sorted(name for name, _ in model.named_parameters())


def test_repeated_copies_with_one_position_each():
    """R contiguous copies of a plain 2-D example: the per-example sum goes through ``bmm``, R = 1
    through the broadcast product; both must equal per-example autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    x = torch.randn(4, 3)
    shifts = torch.randn(3, 3)
    for copies in (1, 3):
        def loss(m, batch, copies=copies):
            (xb,) = batch
            repeated = xb.repeat_interleave(copies, dim=0) + shifts[:copies].repeat(len(xb), 1)
            return m(repeated).pow(2).sum(1).reshape(len(xb), copies).mean(1)

        groups, features, _ = _features(model, IDENTITY, (x,), loss, verify=False)
        expected = per_example_gradients(model, groups, lambda b: loss(model, b), [(x[i : i + 1],) for i in range(4)])
        for group in groups:
            torch.testing.assert_close(features[group.name], expected[group.name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "proj_dim, factor_dim, small_head, combine_elements, head_minor",
    [
        (8, 2, 16, 1 << 22, True),  # 2×2 heads, head-minor elementwise combine, all positions at once
        (8, 2, 16, 1, True),  # the same, one position at a time
        (8, 2, 0, 1 << 22, False),  # 2×2 heads combined by einsum (head-major)
        (20, 3, 16, 1 << 22, True),  # 3×3 heads, two per block, remainder dropped
        (8, 64, 16, 1 << 22, False),  # one head per block: broadcast (one position) or bmm (several)
    ],
)
def test_every_combine_path_equals_dense_kronecker_projection(mixed_net, monkeypatch, proj_dim, factor_dim,
                                                               small_head, combine_elements, head_minor):
    import gradindex.features.projection as projection

    monkeypatch.setattr(projection, "SMALL_HEAD", small_head)
    monkeypatch.setattr(projection, "COMBINE_ELEMENTS", combine_elements)
    batch = mixed_batch(5, seed=7)
    config = ProjectionConfig(proj_dim=proj_dim, seed=3, factor_dim=factor_dim)
    groups, features, projectors = _features(mixed_net, config, batch, mixed_loss, verify=False)
    full = per_example_gradients(mixed_net, groups, lambda b: mixed_loss(mixed_net, b),
                                 [rows(batch, i) for i in range(5)])
    assert any(bp.head_minor for blocks in projectors.values() for bp in blocks) == head_minor
    for group in groups:
        want = dense_group_projection(projectors[group.name], full[group.name])
        torch.testing.assert_close(features[group.name], want, rtol=1e-4, atol=1e-5, msg=group.name)


@pytest.mark.parametrize("cached", [True, False])
def test_reordered_projector_is_the_row_permuted_matrix(monkeypatch, cached):
    import gradindex.features.projection as projection

    monkeypatch.setattr(projection, "CHUNK_BYTES", 4 * 6 * 7)  # 6 rows x 7 columns per chunk: 3 chunks
    if not cached:
        monkeypatch.setattr(projection, "MAX_CACHED_BYTES", 0)
    plain = projection.Projector(ProjectionKind.GAUSSIAN, dim=20, k=6, seed=9)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = plain.reordered(order)
    assert len(plain._bounds) == 3 and (plain._chunks is not None) == cached
    torch.testing.assert_close(permuted.matrix(), plain.matrix()[order])
    x = torch.randn(4, 2, 20)
    torch.testing.assert_close(permuted(x), plain(x)[..., order])
    torch.testing.assert_close(permuted(x), x @ permuted.matrix().T)
    tokens = torch.tensor([[0, 19], [7, 7]])
    torch.testing.assert_close(permuted.columns(tokens), plain.columns(tokens)[..., order])
    torch.testing.assert_close(permuted.reordered(order).matrix(), plain.matrix()[order][order])


class _TiedLM(nn.Module):
    """Embedding and a bias-free output Linear sharing one matrix (a factorized tie)."""

    def __init__(self, vocab: int = 9, dim: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.mix(self.emb(ids))
        h.mul_(1.3)  # in place on a view output
        return self.out(torch.tanh(h))


@pytest.mark.parametrize("kind", [ProjectionKind.IDENTITY, ProjectionKind.GAUSSIAN])
def test_tied_tensors_on_the_fast_path(kind):
    """Aliases of one tied tensor are summed into one part; without verify no parameter gradient is
    requested, and the features still equal one backward per example."""
    from lm_reference import assert_features_close, brute_force_features

    torch.manual_seed(0)
    model = _TiedLM().eval()
    groups = parameter_groups(model)
    assert any(block.tie for group in groups for block in group.blocks)
    items = [torch.randint(0, 9, (4,)) for _ in range(3)]

    def value(batch):
        return torch.log_softmax(model(batch), -1)[:, :, 2].mean(1)

    with GradientProjector(model, groups, ProjectionConfig(kind=kind, proj_dim=12)) as projector:
        fast = projector(lambda: value(torch.stack(items)))
        expected = brute_force_features(model, projector, items, value, torch.stack)
    assert_features_close(fast, expected)
