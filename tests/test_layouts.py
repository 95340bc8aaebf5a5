"""Every standard torch.nn module with the default groups: per-example gradients against a per-example
autograd loop (attention with masks and either layout, transformer layers, recurrent layers, weights
reused by another module), and the batch layouts they rest on."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradindex.config import GroupRule, ProjectionConfig, ProjectionKind
from gradindex.errors import ConfigError, TaskError
from gradindex.features.gradients import GradientProjector
from gradindex.features.groups import parameter_groups
from gradindex.features.layouts import module_batch_dims
from reference import dense_group_projection, per_example_gradients


def _check(model, loss, inputs, rules=(), proj_dim=None):
    """Engine features of ``loss(model, batch)`` equal the per-example autograd loop's (identity), or the
    explicit dense projection of them (``proj_dim``); returns the groups."""
    groups = parameter_groups(model, rules)
    n = inputs[0].shape[0]
    config = (ProjectionConfig(kind=ProjectionKind.IDENTITY) if proj_dim is None
              else ProjectionConfig(proj_dim=proj_dim, seed=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing reaches the user
        with GradientProjector(model, groups, config) as projector:
            got = projector(lambda: loss(model, inputs), verify=True)
            projectors = projector.projectors
    want = per_example_gradients(model, groups, lambda b: loss(model, b),
                                 [tuple(t[i:i + 1] for t in inputs) for i in range(n)])
    for group in groups:
        expected = want[group.name] if proj_dim is None else dense_group_projection(projectors[group.name],
                                                                                    want[group.name])
        assert bool(expected.abs().sum() > 0), group.name
        torch.testing.assert_close(got[group.name], expected, rtol=1e-4, atol=1e-5, msg=group.name)
    return groups


class _Attention(nn.Module):
    def __init__(self, batch_first: bool, kdim: int | None = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.batch_first = batch_first
        self.head = nn.Linear(8, 3)

    def forward(self, x, memory, pad, mask3):
        if not self.batch_first:
            x, memory = x.transpose(0, 1), memory.transpose(0, 1)
        out, _ = self.attn(x, memory, memory, key_padding_mask=pad, attn_mask=mask3.flatten(0, 1),
                           need_weights=False)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out).pow(2).mean((1, 2))


def _attention_inputs(n=4, t=5, s=6, kdim=8):
    torch.manual_seed(1)
    pad = torch.zeros(n, s)  # float like the attention mask (torch deprecates mixing them)
    pad[0, -2:] = -1e4
    pad[2, -1] = -1e4
    mask3 = torch.randn(n, 2, t, s) * 0.5  # float mask, per example and head
    return torch.randn(n, t, 8), torch.randn(n, s, kdim), pad, mask3


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
def test_multihead_attention_with_masks_either_layout(batch_first, kdim):
    torch.manual_seed(0)
    model = _Attention(batch_first, kdim).eval()
    groups = _check(model, lambda m, b: m(*b), _attention_inputs(kdim=kdim or 8))
    names = {g.name: [(b.module, b.params) for b in g.blocks] for g in groups}
    assert names["attn.out_proj"] == [("attn", ("out_proj.weight", "out_proj.bias"))]  # hosted by attention


def test_multihead_attention_projected_and_merged_into_one_group():
    torch.manual_seed(0)
    model = _Attention(True).eval()
    _check(model, lambda m, b: m(*b), _attention_inputs(), rules=[GroupRule("attn.*", "attention")], proj_dim=16)


def test_tuple_outputs_of_a_bare_attention_module():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(4, 2).eval()  # batch_first=False: [T, B, E]
    x = torch.randn(3, 5, 4)

    def loss(m, b):
        out, weights = m(b[0].transpose(0, 1), b[0].transpose(0, 1), b[0].transpose(0, 1))
        return out.pow(2).sum((0, 2)) + weights.pow(2).sum((1, 2))  # both outputs reach the loss

    _check(attention, loss, (x,))


def _causal(t):
    return nn.Transformer.generate_square_subsequent_mask(t)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_and_decoder(batch_first):
    torch.manual_seed(0)

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 8)
            self.encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first), 2,
                norm=nn.LayerNorm(8), enable_nested_tensor=False)
            self.decoder = nn.TransformerDecoder(
                nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=True), 1)
            self.out = nn.Linear(8, 11)

        def forward(self, src, tgt, pad):
            a, b = self.embed(src), self.embed(tgt)
            if not batch_first:
                a, b = a.transpose(0, 1), b.transpose(0, 1)
            memory = self.encoder(a, src_key_padding_mask=pad)
            h = self.decoder(b, memory, tgt_mask=_causal(tgt.shape[1]), memory_key_padding_mask=pad)
            if not batch_first:
                h = h.transpose(0, 1)
            return self.out(h)

    model = Seq2Seq().eval()
    src, tgt = torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4, 5))
    pad = torch.zeros(4, 6, dtype=torch.bool)
    pad[1, -2:] = True

    def loss(m, b):
        logits = m(b[0], b[1], b[2])
        return nn.functional.cross_entropy(logits.flatten(0, 1), b[1].flatten(), reduction="none").view(
            len(b[0]), -1).mean(1)

    groups = _check(model, loss, (src, tgt, pad))
    assert sum("self_attn" in g.name for g in groups) == 6  # in_proj and out_proj of 3 layers
    groups = _check(model, loss, (src, tgt, pad), proj_dim=8)


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_layers(cell, batch_first):
    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cell(3, 5, num_layers=2, batch_first=batch_first, bidirectional=cell is nn.GRU)
            self.head = nn.Linear(5 * (2 if cell is nn.GRU else 1), 2)

        def forward(self, x, h0):
            if not batch_first:
                x = x.transpose(0, 1)
            state = h0.transpose(0, 1).contiguous()
            if cell is nn.LSTM:
                state = (state, torch.zeros_like(state))
            out, last = self.rnn(x, state)
            if not batch_first:
                out = out.transpose(0, 1)
            hidden = last[0] if cell is nn.LSTM else last
            return self.head(out).pow(2).mean((1, 2)) + hidden.pow(2).mean((0, 2))

    model = Tagger().eval()
    layers = 4 if cell is nn.GRU else 2
    _check(model, lambda m, b: m(*b), (torch.randn(4, 6, 3), torch.randn(4, layers, 5)))


def test_tied_output_layer_and_a_weight_reused_functionally():
    torch.manual_seed(0)

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(9, 6)
            self.mix = nn.Linear(6, 6)
            self.lm_head = nn.Linear(6, 9, bias=False)
            self.lm_head.weight = self.embed.weight  # one tensor, two modules

        def forward(self, tokens):
            return self.lm_head(torch.tanh(self.mix(self.embed(tokens))))

    class Reused(TiedLM):
        def forward(self, tokens):  # the output layer computed with the embedding's weight directly
            return nn.functional.linear(torch.tanh(self.mix(self.embed(tokens))), self.embed.weight)

    def loss(m, b):
        logits = m(b[0])
        return nn.functional.cross_entropy(logits.flatten(0, 1), b[0].flatten(), reduction="none").view(
            len(b[0]), -1).sum(1)

    tokens = (torch.randint(0, 9, (5, 4)),)
    _check(TiedLM().eval(), loss, tokens)
    reused = Reused().eval()
    reused.lm_head = None
    with pytest.raises(TaskError, match=r"'embed\.weight=embed@'"):
        _check(reused, loss, tokens)
    _check(reused, loss, tokens, rules=[GroupRule.parse("embed.weight=embed@")])


def test_unsupported_use_names_a_rule_that_works():
    class Borrow(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return nn.functional.linear(x, self.inner.weight, self.inner.bias).pow(2).sum(1)

    model = Borrow().eval()
    x = (torch.randn(3, 4),)
    with pytest.raises(TaskError, match=r"group rule 'inner\.\*=inner@'") as info:
        _check(model, lambda m, b: m(b[0]), x)
    _check(model, lambda m, b: m(b[0]), x, rules=[GroupRule.parse(info.value.args[0].split("'")[-2])])


def test_host_rules_are_validated():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="not a module containing it"):
        parameter_groups(model, [GroupRule.parse("0.*=first@1")])
    groups = parameter_groups(model, [GroupRule.parse("0.*=first@")])
    assert [(b.module, b.params, b.kind) for b in groups[0].blocks] == [("", ("0.weight", "0.bias"), "generic")]


def test_batch_dims_follow_batch_first():
    model = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 8), 1, enable_nested_tensor=False),
                          nn.Linear(4, 4), nn.LSTM(4, 4, batch_first=True))
    dims = module_batch_dims(model)
    assert dims["0.layers.0.linear1"] == dims["0.layers.0.norm1"] == dims["0.layers.0.self_attn"] == 1
    assert dims["1"] == dims["2"] == 0


def test_cli_featurizes_a_transformer_encoder_with_default_groups_silently(tmp_path):
    """The issue's example: a classifier built from nn.TransformerEncoderLayer featurizes with the default
    groups (attention included) under -q with nothing on stderr, and its features are exact."""
    import subprocess
    import sys

    from conftest import toy_spec
    from gradindex.store.feature_store import FeatureStore

    spec = toy_spec("EncoderTask")
    done = subprocess.run([sys.executable, "-m", "gradindex", "-q", "featurize", spec, "--out", str(tmp_path / "s"),
                           "--proj-kind", "identity", "--batch-size", "7"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    from gradindex.task import load_task

    task = load_task(spec)
    model = task.load_model(None)
    groups = parameter_groups(model)
    assert {"enc.layers.0.self_attn", "enc.layers.0.self_attn.out_proj"} <= {g.name for g in groups}
    items = task.train_dataset()[:5]
    want = per_example_gradients(model, groups, lambda b: task.compute_train_loss(b, model),
                                 [task.collate([item]) for item in items])
    ids, feats = FeatureStore.open(tmp_path / "s").read()
    assert list(ids[:5]) == [0, 1, 2, 3, 4]
    for group in ("enc.layers.0.self_attn", "enc.layers.1.self_attn.out_proj", "enc.layers.1.linear1"):
        got = torch.as_tensor(feats[group][:5])
        torch.testing.assert_close(got, want[group], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_recurrent_cells_with_outputs_computed_from_each_other(cell):
    """An LSTM cell's h is computed from its c inside the module: both reach the loss, and each output's
    gradient must count only what the rest of the model sends back (no double counting through h)."""
    torch.manual_seed(0)

    class Unrolled(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell(3, 4)

        def forward(self, x, h):
            state = (h, torch.zeros_like(h)) if cell is nn.LSTMCell else h
            total = 0
            for t in range(x.shape[1]):  # the same cell called at every step
                state = self.cell(x[:, t], state)
                h_t = state[0] if cell is nn.LSTMCell else state
                total = total + h_t.pow(2).sum(1) + (state[1].sum(1) if cell is nn.LSTMCell else 0)
            return total

    _check(Unrolled().eval(), lambda m, b: m(*b), (torch.randn(4, 3, 3), torch.randn(4, 4)))
