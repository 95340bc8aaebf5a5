"""Per-example projected gradients against a per-example autograd loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import mixed_batch, mixed_loss, rows
from gradindex.config import ProjectionConfig, ProjectionKind
from gradindex.errors import TaskError
from gradindex.features.gradients import GradientProjector
from gradindex.features.groups import parameter_groups
from reference import dense_group_projection, per_example_gradients


def _engine_features(model, groups, config, batch, loss=mixed_loss, verify=True):
    with GradientProjector(model, groups, config) as projector:
        return projector(lambda: loss(model, batch), verify=verify), projector.projectors


def test_block_kinds_cover_every_path(mixed_net):
    kinds = {g.name: {b.kind for b in g.blocks} for g in parameter_groups(mixed_net)}
    assert kinds == {"embed": {"embedding"}, "norm": {"generic"}, "shared": {"linear"}, "conv": {"conv2d"},
                     "head": {"linear"}, "scale": {"generic"}}


def test_identity_projection_equals_per_example_autograd(mixed_net):
    groups = parameter_groups(mixed_net)
    batch = mixed_batch(7)
    features, _ = _engine_features(mixed_net, groups, ProjectionConfig(kind=ProjectionKind.IDENTITY), batch)
    expected = per_example_gradients(mixed_net, groups, lambda b: mixed_loss(mixed_net, b),
                                     [rows(batch, i) for i in range(7)])
    for group in groups:
        got, want = features[group.name], expected[group.name]
        assert got.shape == want.shape, group.name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=group.name)


@pytest.mark.parametrize("kind", [ProjectionKind.GAUSSIAN, ProjectionKind.RADEMACHER])
def test_factorized_projection_equals_dense_kronecker_projection(mixed_net, kind):
    """Every block (linear with bias, conv with bias, embedding, generic) against explicit P_left ⊗ P_right."""
    groups = parameter_groups(mixed_net)
    batch = mixed_batch(5, seed=3)
    config = ProjectionConfig(kind=kind, proj_dim=8, seed=11)
    features, projectors = _engine_features(mixed_net, groups, config, batch)
    full = per_example_gradients(mixed_net, groups, lambda b: mixed_loss(mixed_net, b),
                                 [rows(batch, i) for i in range(5)])
    for group in groups:
        want = dense_group_projection(projectors[group.name], full[group.name])
        torch.testing.assert_close(features[group.name], want, rtol=1e-4, atol=1e-5, msg=group.name)
        assert any(not (bp.dense or bp.left).is_identity for bp in projectors[group.name]) or group.numel <= 8


def test_split_weight_and_bias_groups():
    from gradindex.config import GroupRule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    rules = [GroupRule("*.bias", "biases"), GroupRule("0.weight", "first")]
    groups = parameter_groups(model, rules)
    assert [g.name for g in groups] == ["first", "biases", "2"]
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))

    def loss(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="none")

    features, projectors = _engine_features(model, groups, ProjectionConfig(proj_dim=6, seed=2), (x, y), loss)
    full = per_example_gradients(model, groups, lambda b: loss(model, b), [(x[i:i + 1], y[i:i + 1]) for i in range(6)])
    for group in groups:
        torch.testing.assert_close(features[group.name], dense_group_projection(projectors[group.name], full[group.name]),
                                   rtol=1e-4, atol=1e-5)


def test_conv_variants_equal_dense_projection():
    """Stride, dilation, 'same' padding, rectangular kernels, weight-only and bias-only blocks."""
    from gradindex.config import GroupRule

    torch.manual_seed(0)
    convs = nn.ModuleList([
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        nn.Conv2d(3, 4, 3, padding="same", bias=False),
        nn.Conv2d(4, 2, 1),
    ])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = convs

        def forward(self, x):
            for conv in self.convs:
                x = torch.tanh(conv(x))
            return x.flatten(1).sum(1)

    model = Net().eval()
    groups = parameter_groups(model, [GroupRule("convs.2.bias", "last-bias")])
    x = torch.randn(4, 2, 7, 6)

    def value(m, batch):
        return m(batch[0]) ** 2

    features, projectors = _engine_features(model, groups, ProjectionConfig(proj_dim=10, seed=5), (x,), value)
    full = per_example_gradients(model, groups, lambda b: value(model, b), [(x[i:i + 1],) for i in range(4)])
    for group in groups:
        torch.testing.assert_close(features[group.name], dense_group_projection(projectors[group.name], full[group.name]),
                                   rtol=1e-4, atol=1e-5, msg=group.name)


def test_repeated_copies_per_example_are_summed():
    """A loss that runs R contiguous copies of each example (noise draws) gets per-example sums."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).eval()
    groups = parameter_groups(model)
    x = torch.randn(4, 3)
    noise = torch.randn(4 * 3, 3)

    def value(m, batch):
        (xb,) = batch
        index = batch_index(xb)
        repeated = xb.repeat_interleave(3, dim=0) + noise[index.repeat_interleave(3) * 3 % len(noise)]
        return m(repeated).reshape(len(xb), 3).pow(2).mean(1)

    def batch_index(xb):
        return torch.tensor([int((x == row).all(1).nonzero()[0]) for row in xb])

    features, _ = _engine_features(model, groups, ProjectionConfig(kind=ProjectionKind.IDENTITY), (x,), value)
    full = per_example_gradients(model, groups, lambda b: value(model, b), [(x[i:i + 1],) for i in range(4)])
    for group in groups:
        torch.testing.assert_close(features[group.name], full[group.name], rtol=1e-5, atol=1e-6)


def test_wrong_loss_shape_is_a_task_error(mixed_net):
    groups = parameter_groups(mixed_net)
    with GradientProjector(mixed_net, groups, ProjectionConfig()) as projector:
        with pytest.raises(TaskError, match=r"shape \[B\]"):
            projector(lambda: mixed_loss(mixed_net, mixed_batch(3)).sum())
        with pytest.raises(TaskError, match="non-finite"):
            projector(lambda: mixed_loss(mixed_net, mixed_batch(3)) * float("nan"))


def test_hooks_are_removed_and_inactive_outside_calls(mixed_net):
    groups = parameter_groups(mixed_net)
    projector = GradientProjector(mixed_net, groups, ProjectionConfig())
    mixed_loss(mixed_net, mixed_batch(2)).sum().backward()  # plain training use: nothing recorded
    assert projector._calls == {}
    projector.close()
    assert all(not m._forward_hooks for m in mixed_net.modules())


def test_projection_is_reproducible_and_seeded(mixed_net):
    groups = parameter_groups(mixed_net)
    batch = mixed_batch(4)
    a, _ = _engine_features(mixed_net, groups, ProjectionConfig(proj_dim=4, seed=3), batch)
    b, _ = _engine_features(mixed_net, groups, ProjectionConfig(proj_dim=4, seed=3), batch)
    c, _ = _engine_features(mixed_net, groups, ProjectionConfig(proj_dim=4, seed=4), batch)
    for name in a:
        assert torch.equal(a[name], b[name])
    assert any(not torch.allclose(a[name], c[name]) for name in a)
