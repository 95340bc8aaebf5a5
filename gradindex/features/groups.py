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

Tied tensors (one parameter owned by several modules, e.g. GPT-2's ``lm_head``
and ``wte``) form one group (the first owner's by default; rules must give every
alias the same group). Each owner gets a block holding only the tied tensor,
marked with the same ``tie`` key (the first alias's full name): the blocks share
one projector and their per-example contributions are summed, which is the
projection of the tensor's full gradient. Tied blocks are factorized when every
owner has the same factorized layout (an ``embedding`` ``[V, d]`` and a
bias-free ``linear`` ``d -> V``), else all generic.

A block is one module's share of a group. Its ``kind`` says how per-example
gradients are taken (see :mod:`gradindex.features.gradients`):

* ``linear`` / ``conv1d`` / ``conv2d`` / ``embedding``: the gradient is a sum of
  outer products ``Σ_t u_t v_tᵀ`` of shape ``[left, right]`` and is projected in
  factorized form (``right`` counts the bias column when the bias is in the block).
  ``conv1d`` is Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2):
  ``y = x W + b`` with ``W`` stored ``[d_in, d_out]``; its layout is
  ``[d_out, d_in (+1)]`` like ``linear``'s, i.e. the transposed weight. It is
  recognised by class name and shape (transformers is never imported here);
* ``generic``: anything else; per-example gradients by a module-local VJP.

A block's ``module`` is where its gradients are taken (its *host*), and its
``params`` are named relative to it (``out_proj.weight``). The host is the owning
module, except where the owner's weights are used by an ancestor's forward:
``nn.MultiheadAttention`` calls its ``out_proj`` functionally, so ``out_proj``'s
block is hosted by the attention module. A rule's group may name the host
itself, ``GROUP@MODULE`` (``GROUP@`` for the whole model): the parameters'
gradients are then taken through ``MODULE``'s forward, which must be where they
are used (for a weight reused outside its module, e.g. a tied output layer
computed with ``F.linear(h, self.embed.weight)``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from gradindex.config import GroupRule
from gradindex.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a model is inspected, so `info` does not load it
    from torch import nn

FACTORIZED_KINDS = ("linear", "conv1d", "conv2d", "embedding")
#: factorized kinds whose layout ``[left, right]`` is the stored weight transposed
TRANSPOSED_KINDS = ("conv1d",)


@dataclass(frozen=True)
class Block:
    """The parameters ``params`` (local names) of module ``module`` that belong to one group."""

    module: str
    params: tuple[str, ...]
    kind: str
    left: int  # factorized kinds: rows of the gradient matrix; generic: number of elements
    right: int  # factorized kinds: columns (bias column included); generic: 1
    tie: str = ""  # tied tensor key: blocks of one group with the same tie share a projector and are summed

    @property
    def numel(self) -> int:
        return self.left * self.right

    def param_names(self) -> list[str]:
        prefix = f"{self.module}." if self.module else ""
        return [prefix + name for name in self.params]

    def to_dict(self) -> dict[str, Any]:
        out = {"module": self.module, "params": list(self.params), "kind": self.kind,
               "left": self.left, "right": self.right}
        if self.tie:
            out["tie"] = self.tie
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Block":
        return cls(data["module"], tuple(data["params"]), data["kind"], data["left"], data["right"],
                   data.get("tie", ""))


@dataclass(frozen=True)
class ParameterGroup:
    name: str
    blocks: tuple[Block, ...]

    @property
    def numel(self) -> int:
        """Trainable elements of the group (a tied tensor counts once)."""
        return sum(self.blocks[i].numel for i in part_owners(self.blocks))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "blocks": [block.to_dict() for block in self.blocks]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ParameterGroup":
        return cls(data["name"], tuple(Block.from_dict(b) for b in data["blocks"]))


def part_owners(blocks: Sequence[Block]) -> list[int]:
    """Positions of the blocks that own a feature part: untied ones and the first block of each tie."""
    seen: set[str] = set()
    positions = []
    for position, block in enumerate(blocks):
        if block.tie:
            if block.tie in seen:
                continue
            seen.add(block.tie)
        positions.append(position)
    return positions


def parameter_groups(model: nn.Module, rules: Sequence[GroupRule] = ()) -> list[ParameterGroup]:
    """Split ``model``'s trainable parameters into groups (see the module docstring)."""
    modules = dict(model.named_modules())
    # every owner (module name, local name) of each trainable tensor, in model order
    owners: dict[int, list[tuple[str, str]]] = {}
    for module_name, module in modules.items():
        for local_name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                owners.setdefault(id(param), []).append((module_name, local_name))
    # group name -> (module name, tie key) -> local parameter names, in model order
    assignment: dict[str, dict[tuple[str, str], list[str]]] = {}
    for aliases in owners.values():
        first_module, first_local = aliases[0]
        default = first_module or first_local
        full_names = [_full_name(m, p) for m, p in aliases]
        chosen = {_match(name, first_module, rules, default) for name in full_names}
        if len(chosen) > 1:
            raise ConfigError(
                f"parameter groups: {' and '.join(map(repr, full_names))} are one tied tensor, and the group "
                f"rules put its aliases in different groups ({', '.join(sorted(map(str, chosen)))}); give every "
                "alias the same group (or '-' to exclude them all)"
            )
        group = chosen.pop()
        if group is None:
            continue
        group, host = _split_host(group)
        tie = full_names[0] if len(aliases) > 1 else ""
        for module_name, local_name in aliases:
            where = _host(modules, module_name, host, _full_name(module_name, local_name))
            relative = _full_name(module_name, local_name)[len(where) + 1 if where else 0:]
            assignment.setdefault(group, {}).setdefault((where, tie), []).append(relative)
    if not assignment:
        raise ConfigError("parameter groups: the model has no trainable parameter left after the group rules")
    groups = []
    for group_name, per_module in assignment.items():
        blocks = [_make_block(name, modules[name], tuple(params)) for (name, _), params in per_module.items()]
        ties = [tie for (_, tie) in per_module]
        groups.append(ParameterGroup(group_name, _tie_blocks(blocks, ties)))
    return groups


def _split_host(group: str) -> tuple[str, str | None]:
    """``GROUP@MODULE`` -> ``(GROUP, MODULE)``; a plain group name has no host (``None``)."""
    name, sep, host = group.partition("@")
    if sep and not name:
        raise ConfigError(f"group rule: {group!r} names a host but no group; write GROUP@MODULE")
    return (name, host) if sep else (group, None)


def _host(modules: dict[str, nn.Module], module_name: str, host: str | None, param: str) -> str:
    """The module whose forward a parameter's gradients are taken through (see the module docstring)."""
    from torch import nn

    if host is None:
        ancestor = module_name
        while ancestor:
            ancestor = ancestor.rpartition(".")[0]
            if isinstance(modules[ancestor], nn.MultiheadAttention):
                return ancestor  # it uses its out_proj's weights functionally
        return module_name
    if host not in modules or not (host == "" or module_name == host or module_name.startswith(host + ".")):
        raise ConfigError(f"group rule: host {host!r} of {param!r} is not a module containing it; name an "
                          f"ancestor of {module_name!r} (or nothing after '@' for the whole model)")
    return host


def _full_name(module_name: str, local_name: str) -> str:
    return f"{module_name}.{local_name}" if module_name else local_name


def _tie_blocks(blocks: list[Block], ties: list[str]) -> tuple[Block, ...]:
    """Mark tied blocks; tied blocks of different layouts all fall back to ``generic``."""
    out = list(blocks)
    for tie in sorted(set(ties) - {""}):
        positions = [i for i, t in enumerate(ties) if t == tie]
        layouts = {(blocks[i].kind in FACTORIZED_KINDS, blocks[i].kind in TRANSPOSED_KINDS, blocks[i].left,
                    blocks[i].right) for i in positions}
        factorized = len(layouts) == 1 and next(iter(layouts))[0]
        for i in positions:
            block = blocks[i]
            if factorized:
                out[i] = replace(block, tie=tie)
            else:
                out[i] = Block(block.module, block.params, "generic", block.numel, 1, tie)
    return tuple(out)


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
    from torch import nn

    has_weight = "weight" in params
    has_bias = "bias" in params
    plain = set(params) <= {"weight", "bias"}
    if plain and isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        right = module.in_features * has_weight + has_bias
        return Block(module_name, params, "linear", module.out_features, right)
    if plain and _is_hf_conv1d(module):
        d_in, d_out = module.weight.shape
        return Block(module_name, params, "conv1d", d_out, d_in * has_weight + has_bias)
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
    numel = sum(module.get_parameter(name).numel() for name in params)
    return Block(module_name, params, "generic", numel, 1)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (``y = x W + b``, ``W [d_in, d_out]``), recognised without importing it."""
    from torch import nn

    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, nn.Parameter)
        and weight.ndim == 2
        and getattr(module, "nf", None) == weight.shape[1]
        and (bias is None or tuple(bias.shape) == (weight.shape[1],))
    )
