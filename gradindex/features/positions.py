"""Per-position split of a projected-gradient score (token heatmaps). No I/O.

In: a :class:`~gradindex.features.gradients.GradientProjector`, a closure returning
per-example scalars ``[B]`` (training losses), query directions ``{group: [Q, k_g]}``
and the number of positions ``L`` (tokens) of the examples. Out: ``[B, L, Q]`` with

    Σ_t out[b, t, q] = Σ_g directions_g[q] · φ_g(x_b)

(to float rounding), i.e. the score of example ``b`` for query ``q`` split over
its positions. Each block's share is split by *where the gradient leaves the
module*: the part of ``φ_g`` carried by the module's output at position ``t``.

* factorized blocks (linear, conv1d, embedding): position ``t`` contributes the
  projected ``(P_l δ_t)(P_r a_t)ᵀ`` — the summand of the stored feature itself;
* generic blocks (norms, attention, recurrent layers): ``dᵀ P ∇θ = ⟨J_θ (Pᵀd), δ⟩``,
  so one forward-mode JVP of the module in the parameter direction ``Pᵀd`` gives
  every position's share ``⟨(J_θ Pᵀd)_t, δ_t⟩``. Where torch has no forward
  derivative (its attention kernels), ``dᵀ P VJP(δ ⊙ 1_t)`` instead: the
  module-local VJP of the output gradient kept at position ``t`` only, one per
  position (vmapped); both add up to the block's share because they are linear in δ;
* a call whose output has no axis of ``L`` positions (a pooled head, an RNN's
  last state, pixels) cannot be localised: its share is spread evenly over the
  ``L`` positions. So are ``R`` copies of an example (noise draws): summed first.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from gradindex.features.gradients import VMAP_FALLBACK_NOTICE, GradientProjector, _Call, per_example
from gradindex.features.layouts import tensor_leaves
from gradindex.features.groups import part_owners
from gradindex.features.projection import BlockProjector


def position_scores(projector: GradientProjector, compute: Callable[[], torch.Tensor],
                    directions: Mapping[str, torch.Tensor], length: int) -> torch.Tensor:
    """``[B, length, Q]``: each example's score ``Σ_g d_g·φ_g`` for each of ``Q`` directions, split over positions."""
    batch, _ = projector.record(compute)
    out = None
    position = 0
    try:
        for group in projector.groups:
            blocks = projector.projectors[group.name]
            slices = _part_slices(blocks)
            direction = directions[group.name].to(projector.device, torch.float32)
            for offset, bp in enumerate(blocks):
                part = direction[:, slices[bp.block.tie or offset]]  # [Q, out_dim]
                for call in projector.recorded_calls(position):
                    share = _call_positions(projector, bp, call, part, batch, length)
                    if share is not None:
                        out = share if out is None else out + share
                position += 1
    finally:
        projector.clear()
    if out is None:
        return torch.zeros(batch, length, len(next(iter(directions.values()))), device=projector.device)
    return out


def _part_slices(blocks: list[BlockProjector]) -> dict[Any, slice]:
    """Columns of each feature part (key: tie or block offset) within its group's ``[k_g]``."""
    slices, start = {}, 0
    positions = part_owners([bp.block for bp in blocks])
    for offset in positions:
        bp = blocks[offset]
        slices[bp.block.tie or offset] = slice(start, start + bp.out_dim)
        start += bp.out_dim
    return slices


def _call_positions(projector: GradientProjector, bp: BlockProjector, call: _Call, part: torch.Tensor,
                    batch: int, length: int) -> torch.Tensor | None:
    """One call's share ``[B, length, Q]`` (``None``: its output did not reach the loss)."""
    if bp.block.kind == "generic":
        if not call.deltas:
            return None
        rows = _generic_positions(projector, bp, call, part, length)  # [B', T, Q]
    else:
        if call.left is None or call.right is None:
            return None
        left, right = call.left, call.right  # [B', T, ·]
        rows_, positions = left.shape[0], left.shape[1]
        phi = bp.combine(left.reshape(rows_ * positions, 1, -1), right.reshape(rows_ * positions, 1, -1))
        rows = (phi @ part.T).reshape(rows_, positions, -1)  # [B', T, Q]
    examples = per_example(rows.flatten(1), batch, bp.block.module)  # [B, R·T·Q]
    examples = examples.reshape(batch, -1, rows.shape[1], rows.shape[2]).sum(1)  # copies summed
    if rows.shape[1] == length:
        return examples
    return examples.sum(1, keepdim=True).expand(batch, length, -1) / length  # spread evenly


def _generic_positions(projector: GradientProjector, bp: BlockProjector, call: _Call, part: torch.Tensor,
                       length: int) -> torch.Tensor:
    """``[B', length, Q]``: one VJP of the call per (row, position), vmapped, each with the output gradient
    kept at that row and position only (outputs without a position axis: the row's, spread evenly)."""
    module = projector.host_module(bp)
    names = bp.block.params
    params = {name: module.get_parameter(name).detach() for name in names}
    dense = bp.dense
    tangents = part if dense.is_identity else part @ dense.matrix()  # [Q, numel] = (Pᵀ d)ᵀ
    chosen = sorted(call.deltas)
    _, out_layouts = call.layouts
    deltas = [call.deltas[leaf] for leaf in chosen]
    batch_dims = [out_layouts[leaf].dim for leaf in chosen]
    rows = deltas[0].shape[batch_dims[0]]
    position_axes = [_position_axis(delta, dim, length) for delta, dim in zip(deltas, batch_dims)]

    def local(p: dict) -> tuple:
        outputs = tensor_leaves(torch.func.functional_call(module, p, call.args, call.kwargs))
        return tuple(outputs[leaf] for leaf in chosen)

    try:  # forward mode: one JVP per direction, ⟨(J v)_t, δ_t⟩ at every position at once
        return _by_jvp(local, params, names, tangents, deltas, batch_dims, position_axes, length)
    except NotImplementedError:  # no forward derivative (torch's attention kernels): VJPs per position
        pass
    _, vjp = torch.func.vjp(local, params)

    def share(row_hot: torch.Tensor, position_hot: torch.Tensor) -> torch.Tensor:
        cotangents = []
        for delta, dim, axis in zip(deltas, batch_dims, position_axes):
            mask = _along(row_hot, dim, delta.ndim)
            mask = mask * (_along(position_hot, axis, delta.ndim) if axis is not None else 1.0 / length)
            cotangents.append(delta * mask.to(delta.dtype))
        (grads,) = vjp(tuple(cotangents))
        return tangents @ torch.cat([grads[name].reshape(-1).float() for name in names])  # [Q]

    row_hot = torch.eye(rows, device=part.device).repeat_interleave(length, dim=0)  # [B'·L, B']
    position_hot = torch.eye(length, device=part.device).repeat(rows, 1)  # [B'·L, L]
    per_vjp = sum(p.numel() for p in params.values()) + sum(d.numel() for d in deltas)
    chunk = max(1, (1 << 24) // per_vjp)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=VMAP_FALLBACK_NOTICE, category=UserWarning)
        out = torch.func.vmap(share, chunk_size=chunk)(row_hot, position_hot)  # [B'·L, Q]
    return out.reshape(rows, length, -1)


def _by_jvp(local, params: dict, names, tangents: torch.Tensor, deltas: list, batch_dims: list, position_axes: list,
            length: int) -> torch.Tensor:
    """``[B', length, Q]`` from one forward-mode JVP per direction, vmapped over the directions (raises
    NotImplementedError where torch has no forward derivative)."""
    sizes = [params[name].numel() for name in names]

    def one(tangent: torch.Tensor) -> torch.Tensor:
        pieces = {name: piece.reshape(params[name].shape).to(params[name].dtype)
                  for name, piece in zip(names, tangent.split(sizes))}
        _, jvps = torch.func.jvp(local, (params,), (pieces,))
        total = 0
        for jvp, delta, dim, axis in zip(jvps, deltas, batch_dims, position_axes):
            product = jvp.float() * delta.float()
            if axis is None:  # no position axis: the row's total, spread evenly
                row = product.movedim(dim, 0).reshape(product.shape[dim], -1).sum(-1, keepdim=True)
                total = total + row.expand(-1, length) / length
            else:
                product = product.movedim((dim, axis), (0, 1))
                total = total + product.reshape(product.shape[0], length, -1).sum(-1)
        return total  # [B', length]

    chunk = max(1, (1 << 24) // max(1, sum(d.numel() for d in deltas)))
    return torch.func.vmap(one, out_dims=-1, chunk_size=chunk)(tangents)  # [B', length, Q]


def _position_axis(delta: torch.Tensor, batch_dim: int, length: int) -> int | None:
    """The first axis of ``delta`` other than the examples' one with ``length`` entries (None: none)."""
    return next((axis for axis in range(delta.ndim) if axis != batch_dim and delta.shape[axis] == length), None)


def _along(vector: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """``vector [n]`` shaped to broadcast along ``axis`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = vector.shape[0]
    return vector.reshape(shape)
