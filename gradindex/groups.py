"""Parameter groups of a model.

In: an ``nn.Module`` and a sequence of :class:`~gradindex.config.GroupRule`.
Out: a list of :class:`ParameterGroup`, each made of module :class:`Block` s.

Default: one group per module that directly owns trainable parameters (weight
and bias together), named after the module; parameters owned by the root module
get one group each, named after the parameter. Rules (glob over full parameter
names, first match wins) merge modules into one group, split a module's
parameters apart, or exclude parameters (``group=None``). A rule's group name
may contain ``{param}`` (the full parameter name) and ``{module}`` (its module's
name): ``*.bias={param}`` gives every bias a group of its own. Frozen parameters
(``requires_grad=False``) are never attributed.

A block is one module's share of a group. Its ``kind`` says how per-example
gradients are taken (see :mod:`gradindex.gradients`):

* ``linear`` / ``conv2d`` / ``embedding``: the gradient is a sum of outer
  products ``Σ_t u_t v_tᵀ`` of shape ``[left, right]`` and is projected in
  factorized form (``right`` counts the bias column when the bias is in the block);
* ``generic``: anything else; per-example gradients by a module-local VJP.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from gradindex.config import GroupRule
from gradindex.errors import ConfigError

FACTORIZED_KINDS = ("linear", "conv2d", "embedding")


@dataclass(frozen=True)
class Block:
    """The parameters ``params`` (local names) of module ``module`` that belong to one group."""

    module: str
    params: tuple[str, ...]
    kind: str
    left: int  # factorized kinds: rows of the gradient matrix; generic: number of elements
    right: int  # factorized kinds: columns (bias column included); generic: 1

    @property
    def numel(self) -> int:
        return self.left * self.right

    def param_names(self) -> list[str]:
        prefix = f"{self.module}." if self.module else ""
        return [prefix + name for name in self.params]

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "params": list(self.params), "kind": self.kind,
                "left": self.left, "right": self.right}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Block":
        return cls(data["module"], tuple(data["params"]), data["kind"], data["left"], data["right"])


@dataclass(frozen=True)
class ParameterGroup:
    name: str
    blocks: tuple[Block, ...]

    @property
    def numel(self) -> int:
        return sum(block.numel for block in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "blocks": [block.to_dict() for block in self.blocks]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ParameterGroup":
        return cls(data["name"], tuple(Block.from_dict(b) for b in data["blocks"]))


def parameter_groups(model: nn.Module, rules: Sequence[GroupRule] = ()) -> list[ParameterGroup]:
    """Split ``model``'s trainable parameters into groups (see the module docstring)."""
    modules = dict(model.named_modules())
    # group name -> module name -> local parameter names, in model order
    assignment: dict[str, dict[str, list[str]]] = {}
    aliases: dict[int, list[str]] = {}
    for module_name, module in modules.items():
        for local_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full_name = f"{module_name}.{local_name}" if module_name else local_name
            group = _match(full_name, module_name, rules, default=module_name or local_name)
            if group is None:
                continue
            aliases.setdefault(id(param), []).append(full_name)
            assignment.setdefault(group, {}).setdefault(module_name, []).append(local_name)
    for names in aliases.values():
        if len(names) > 1:
            raise ConfigError(
                f"parameter groups: {' and '.join(map(repr, names))} are one tied tensor, which per-module "
                f"gradients would split; untie them or exclude every alias (rules "
                + ", ".join(f"'{n}=-'" for n in names) + ")"
            )
    if not assignment:
        raise ConfigError("parameter groups: the model has no trainable parameter left after the group rules")
    groups = []
    for group_name, per_module in assignment.items():
        blocks = tuple(_make_block(name, modules[name], tuple(params)) for name, params in per_module.items())
        groups.append(ParameterGroup(group_name, blocks))
    return groups


def _match(full_name: str, module_name: str, rules: Sequence[GroupRule], default: str) -> str | None:
    for rule in rules:
        if fnmatch.fnmatchcase(full_name, rule.pattern):
            if rule.group is None:
                return None
            return rule.group.replace("{param}", full_name).replace("{module}", module_name or full_name)
    return default


def unused_rules(model: nn.Module, rules: Sequence[GroupRule]) -> list[GroupRule]:
    """Rules that match no trainable parameter (probably typos)."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return [rule for rule in rules if not any(fnmatch.fnmatchcase(n, rule.pattern) for n in names)]


def _make_block(module_name: str, module: nn.Module, params: tuple[str, ...]) -> Block:
    has_weight = "weight" in params
    has_bias = "bias" in params
    plain = set(params) <= {"weight", "bias"}
    if plain and isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        right = module.in_features * has_weight + has_bias
        return Block(module_name, params, "linear", module.out_features, right)
    if (
        plain
        and isinstance(module, nn.Conv2d)
        and type(module).forward is nn.Conv2d.forward
        and module.groups == 1
        and module.padding_mode == "zeros"
    ):
        kh, kw = module.kernel_size
        right = module.in_channels * kh * kw * has_weight + has_bias
        return Block(module_name, params, "conv2d", module.out_channels, right)
    if (
        params == ("weight",)
        and isinstance(module, nn.Embedding)
        and type(module).forward is nn.Embedding.forward
        and module.max_norm is None
        and not module.scale_grad_by_freq
    ):
        return Block(module_name, params, "embedding", module.num_embeddings, module.embedding_dim)
    numel = sum(getattr(module, name).numel() for name in params)
    return Block(module_name, params, "generic", numel, 1)
