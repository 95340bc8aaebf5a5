"""Per-position split of scores: sums to the sequence score for every block kind, and a linear block's
positions equal the explicit Kronecker projection of δ_t a_tᵀ."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradindex.config import ProjectionConfig, ProjectionKind
from gradindex.features.gradients import GradientProjector
from gradindex.features.groups import parameter_groups
from gradindex.features.positions import position_scores
from reference import dense_block_matrix

VOCAB, WIDTH, LENGTH = 11, 8, 6


class _LM(nn.Module):
    """Embedding (tied output layer), attention (batch_first=False), norm, MLP, and a pooled side head
    whose share has no position axis."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, 2)
        self.norm = nn.LayerNorm(WIDTH)
        self.mlp = nn.Linear(WIDTH, WIDTH)
        self.pooled = nn.Linear(WIDTH, 1)
        self.out = nn.Linear(WIDTH, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        a, _ = self.attn(h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), attn_mask=mask,
                         need_weights=False)
        h = self.norm(h + a.transpose(0, 1))
        h = h + torch.tanh(self.mlp(h))
        return self.out(h), self.pooled(h.mean(1))[:, 0]


def _loss(model, tokens):
    logits, pooled = model(tokens)
    nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return nll.view(len(tokens), -1).mean(1) + 0.1 * pooled.pow(2)


@pytest.mark.parametrize("kind", [ProjectionKind.IDENTITY, ProjectionKind.GAUSSIAN])
def test_positions_sum_to_the_score(kind):
    torch.manual_seed(0)
    model = _LM().eval()
    groups = parameter_groups(model)
    tokens = torch.randint(0, VOCAB, (3, LENGTH))
    config = ProjectionConfig(kind=kind, proj_dim=16, seed=4)
    with GradientProjector(model, groups, config) as projector:
        features = projector(lambda: _loss(model, tokens))
        directions = {g: torch.randn(2, block.shape[1]) for g, block in features.items()}
        split = position_scores(projector, lambda: _loss(model, tokens), directions, LENGTH)
    assert split.shape == (3, LENGTH, 2)
    want = sum(features[g] @ directions[g].T for g in features)  # [B, Q]
    torch.testing.assert_close(split.sum(1), want, rtol=1e-4, atol=1e-5)
    for name in ("attn", "norm", "pooled"):  # every group alone (generic, hosted, spread)
        alone = {g: d * (g == name) for g, d in directions.items()}
        with GradientProjector(model, groups, config) as projector:
            part = position_scores(projector, lambda: _loss(model, tokens), alone, LENGTH)
        torch.testing.assert_close(part.sum(1), features[name] @ directions[name].T, rtol=1e-4, atol=1e-5)
        if name == "pooled":  # no position axis: spread evenly
            torch.testing.assert_close(part, part[:, :1].expand_as(part))
        else:
            assert not torch.allclose(part, part[:, :1].expand_as(part))


def test_linear_positions_equal_the_explicit_projection_of_each_outer_product():
    torch.manual_seed(0)
    model = _LM().eval()
    groups = [g for g in parameter_groups(model) if g.name == "mlp"]
    tokens = torch.randint(0, VOCAB, (2, LENGTH))
    seen = {}
    handle = model.mlp.register_forward_hook(lambda m, args, out: seen.update(a=args[0], out=out))
    with GradientProjector(model, groups, ProjectionConfig(proj_dim=12, seed=1)) as projector:
        direction = {"mlp": torch.randn(1, projector.group_dims()["mlp"])}
        split = position_scores(projector, lambda: _loss(model, tokens), direction, LENGTH)[..., 0]
        matrix = dense_block_matrix(projector.projectors["mlp"][0])
    values = _loss(model, tokens)
    delta = torch.autograd.grad(values.sum(), seen["out"])[0]  # [B, T, out]
    handle.remove()
    a = torch.cat([seen["a"], torch.ones(2, LENGTH, 1)], dim=-1).detach()  # bias column
    for b in range(2):
        for t in range(LENGTH):
            outer = torch.outer(delta[b, t], a[b, t]).reshape(-1)
            expected = float(direction["mlp"][0] @ (matrix @ outer))
            assert split[b, t].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
