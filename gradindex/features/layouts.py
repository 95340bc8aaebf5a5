"""Where the examples sit in a module's inputs and outputs (the batch layout). No I/O.

In: a module and the ``args``/``kwargs``/output of one call. Out: per tensor leaf
(in :func:`torch.utils._pytree.tree_flatten` order) a :class:`LeafLayout`: the
dimension that indexes examples, or ``None`` for a tensor shared by all examples.

The gradient engine needs it twice: factorized blocks (linear, conv, embedding)
turn their inputs into ``[B', T, d]`` rows, and generic blocks vmap a
module-local VJP over the examples. Most modules see examples along dimension 0.
The exceptions in ``torch.nn`` are handled here by what the modules document:

* ``batch_first=False`` (the default of ``nn.MultiheadAttention``,
  ``nn.Transformer*`` and ``nn.RNN``/``GRU``/``LSTM``): sequences are ``[T, B, E]``,
  so examples are dimension 1 — for the module and every module inside a
  ``batch_first=False`` transformer layer (its linears and norms);
* ``nn.MultiheadAttention``: ``key_padding_mask [B, S]`` is batch-first always; a 2-D
  ``attn_mask [T, S]`` is shared; a 3-D one is ``[B·heads, T, S]`` (examples are
  groups of ``heads`` rows); the attention weights output is ``[B, (heads,) T, S]``;
* ``nn.RNN``/``GRU``/``LSTM``: the hidden states ``h [layers, B, H]`` (and LSTM's
  ``c``) are dimension 1 whatever ``batch_first`` says.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from gradindex.errors import TaskError

_TRANSFORMER_PARTS = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
                      nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclass(frozen=True)
class LeafLayout:
    """Examples along ``dim`` (``None``: shared by all examples); ``heads > 1``: dimension 0 holds
    ``B·heads`` rows, ``heads`` consecutive rows per example (a 3-D attention mask)."""

    dim: int | None
    heads: int = 1


SHARED = LeafLayout(None)


def module_batch_dims(model: nn.Module) -> dict[str, int]:
    """``{module name: dimension of the examples in its sequence inputs}`` (0 or 1) for every module.

    A module with ``batch_first=False`` (or inside a ``torch.nn`` transformer whose
    layers have it) sees ``[T, B, ...]``: dimension 1. Everything else: 0.
    """
    dims: dict[str, int] = {}
    for name, module in model.named_modules():
        parent = dims.get(name.rpartition(".")[0], 0) if name else 0
        own = _declared_batch_first(module)
        if own is not None:
            dims[name] = 0 if own else 1
        elif isinstance(module, (nn.Linear, nn.LayerNorm, nn.Dropout, nn.ModuleList, nn.Sequential)):
            dims[name] = parent  # parts of a transformer layer see its layout
        else:
            dims[name] = 0
    return dims


def _declared_batch_first(module: nn.Module) -> bool | None:
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
        return bool(module.batch_first)
    if isinstance(module, _TRANSFORMER_PARTS):
        attention = next((m for m in module.modules() if isinstance(m, nn.MultiheadAttention)), None)
        return None if attention is None else bool(attention.batch_first)
    return None


def call_layouts(module: nn.Module, batch_dim: int, args: tuple, kwargs: dict, output: Any,
                 rows: int) -> tuple[list[LeafLayout], list[LeafLayout]]:
    """Layouts of the tensor leaves of ``(args, kwargs)`` and of ``output``, in pytree order.

    ``rows`` is the number of examples (or copies) the call saw, read off its
    first output; a leaf of an ordinary module is batched when it has that many
    entries along ``batch_dim``.
    """
    if isinstance(module, nn.MultiheadAttention):
        return _attention_layouts(module, args, kwargs, output)
    if isinstance(module, nn.RNNBase):
        return _rnn_layouts(module, args, kwargs, output)
    return ([_plain(leaf, batch_dim, rows) for leaf in tensor_leaves((args, kwargs))],
            [_plain(leaf, batch_dim, rows) for leaf in tensor_leaves(output)])


def output_rows(module: nn.Module, batch_dim: int, output: Any) -> int:
    """How many examples (or copies) a call saw: the size of its first output along the examples' dimension."""
    leaves = tensor_leaves(output)
    if not leaves:
        raise TaskError(f"module {type(module).__name__} returned no tensor; it cannot be attributed")
    first = leaves[0]
    dim = batch_dim if first.ndim > batch_dim else 0
    return first.shape[dim] if first.ndim else 1


def _plain(leaf: torch.Tensor, dim: int, rows: int) -> LeafLayout:
    return LeafLayout(dim) if leaf.ndim > dim and leaf.shape[dim] == rows else SHARED


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    """The tensors of a nested output or argument structure, in pytree order."""
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _bound(module: nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    return inspect.signature(module.forward).bind(*args, **kwargs)


def _attention_layouts(module: nn.MultiheadAttention, args: tuple, kwargs: dict,
                       output: Any) -> tuple[list[LeafLayout], list[LeafLayout]]:
    bound = _bound(module, args, kwargs).arguments
    batched = bound["query"].ndim == 3
    seq = (0 if module.batch_first else 1) if batched else None

    def layout(name: str, value: torch.Tensor) -> LeafLayout:
        if not batched:
            return SHARED
        if name in ("query", "key", "value"):
            return LeafLayout(seq)
        if name == "key_padding_mask":
            return LeafLayout(0)
        if name == "attn_mask" and value.ndim == 3:
            return LeafLayout(0, heads=module.num_heads)
        return SHARED

    inputs = _by_position(module, args, kwargs, layout)
    outputs = [LeafLayout(seq) if batched else SHARED]
    if len(tensor_leaves(output)) > 1:  # attention weights [B, (heads,) T, S]
        outputs.append(LeafLayout(0) if batched else SHARED)
    return inputs, outputs


def _rnn_layouts(module: nn.RNNBase, args: tuple, kwargs: dict,
                 output: Any) -> tuple[list[LeafLayout], list[LeafLayout]]:
    bound = _bound(module, args, kwargs).arguments
    data = bound["input"]
    if not isinstance(data, torch.Tensor):
        raise TaskError(f"{type(module).__name__} was called with a {type(data).__name__}; gradindex attributes "
                        "recurrent layers on padded tensors only (pad the batch instead of packing it)")
    batched = data.ndim == 3
    seq = (0 if module.batch_first else 1) if batched else None
    hidden = 1 if batched else None

    def layout(name: str, value: torch.Tensor) -> LeafLayout:
        return LeafLayout(seq if name == "input" else hidden)

    inputs = _by_position(module, args, kwargs, layout)
    count = len(tensor_leaves(output))
    return inputs, [LeafLayout(seq)] + [LeafLayout(hidden)] * (count - 1)


def _by_position(module: nn.Module, args: tuple, kwargs: dict, layout) -> list[LeafLayout]:
    """``layout(argument name, leaf)`` for every tensor leaf of ``(args, kwargs)`` in pytree order."""
    signature = inspect.signature(module.forward)
    names = list(signature.parameters)
    out = []
    for position, value in enumerate(args):
        out.extend(layout(names[position], leaf) for leaf in tensor_leaves(value))
    for name, value in kwargs.items():
        out.extend(layout(name, leaf) for leaf in tensor_leaves(value))
    return out
