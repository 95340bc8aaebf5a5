"""Parameter groups: defaults, rules, frozen and tied parameters."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradindex.config import GroupRule
from gradindex.errors import ConfigError
from gradindex.features.groups import parameter_groups, unused_rules


def _net():
    net = nn.Sequential(OrderedDict([("a", nn.Linear(3, 4)), ("n", nn.LayerNorm(4)), ("b", nn.Linear(4, 2))]))
    net.register_parameter("temperature", nn.Parameter(torch.ones(1)))
    return net


def test_default_one_group_per_module_and_root_parameters_by_name():
    groups = parameter_groups(_net())
    assert [(g.name, [(b.module, b.params, b.kind) for b in g.blocks]) for g in groups] == [
        ("temperature", [("", ("temperature",), "generic")]),
        ("a", [("a", ("weight", "bias"), "linear")]),
        ("n", [("n", ("weight", "bias"), "generic")]),
        ("b", [("b", ("weight", "bias"), "linear")]),
    ]
    assert groups[1].numel == 16 and groups[1].blocks[0].left == 4 and groups[1].blocks[0].right == 4


def test_rules_merge_split_and_exclude():
    rules = [GroupRule("temperature", None), GroupRule("*.bias", "biases"), GroupRule("[ab].weight", "linears")]
    groups = parameter_groups(_net(), rules)
    assert [g.name for g in groups] == ["linears", "biases", "n"]
    assert [(b.module, b.params) for b in groups[0].blocks] == [("a", ("weight",)), ("b", ("weight",))]
    assert [(b.module, b.params, b.kind) for b in groups[1].blocks] == [
        ("a", ("bias",), "linear"), ("n", ("bias",), "generic"), ("b", ("bias",), "linear")]
    assert groups[1].blocks[0].right == 1  # bias-only linear block: the constant-1 column


def test_frozen_parameters_are_not_attributed():
    net = _net()
    net.a.requires_grad_(False)
    assert "a" not in [g.name for g in parameter_groups(net)]


def test_tied_parameters_form_one_group_with_tied_blocks():
    net = nn.Sequential(OrderedDict([("embed", nn.Embedding(5, 3)), ("mid", nn.Linear(3, 3)),
                                     ("head", nn.Linear(3, 5, bias=False))]))
    net.head.weight = net.embed.weight
    groups = parameter_groups(net)
    assert [g.name for g in groups] == ["embed", "mid"]
    tied = groups[0].blocks
    assert [(b.module, b.kind, b.tie) for b in tied] == [("embed", "embedding", "embed.weight"),
                                                        ("head", "linear", "embed.weight")]
    assert groups[0].numel == 15  # the tied tensor counts once
    with pytest.raises(ConfigError, match="different groups"):
        parameter_groups(net, [GroupRule("head.weight", "head")])
    groups = parameter_groups(net, [GroupRule("embed.weight", None), GroupRule("head.weight", None)])
    assert [g.name for g in groups] == ["mid"]


def test_nothing_left_and_unused_rules():
    net = _net()
    with pytest.raises(ConfigError, match="no trainable parameter"):
        parameter_groups(net, [GroupRule("*", None)])
    rules = [GroupRule("a.*", "x"), GroupRule("zzz*", "y")]
    assert unused_rules(net, rules) == [rules[1]]


@pytest.mark.parametrize("text,expected", [("a.*=first", GroupRule("a.*", "first")), ("*.bias = -", GroupRule("*.bias", None))])
def test_rule_parsing(text, expected):
    assert GroupRule.parse(text) == expected


@pytest.mark.parametrize("text", ["a.*", "=x", "a.*="])
def test_bad_rules(text):
    with pytest.raises(ConfigError, match="PATTERN=GROUP"):
        GroupRule.parse(text)


def test_special_modules_fall_back_to_generic():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                        nn.Embedding(5, 3, max_norm=1.0))
    assert [g.blocks[0].kind for g in parameter_groups(net)] == ["generic", "generic", "generic"]
