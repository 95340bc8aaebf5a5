"""Per-example, per-group projected gradients (DESIGN §1.1). No I/O.

In: a model, its :class:`~gradindex.features.groups.ParameterGroup` s, a projection
config and a closure returning per-example scalars ``[B]`` (losses or
measurements). Out: ``{group: Tensor[B, k_g]}`` with
``φ_g(x) = P_g ∇_{θ_g} f(x)``.

How: forward hooks see each block's module inputs and record the gradient edge
of its output (where ``∂/∂output`` arrives, before any later in-place op on the
output); one ``autograd.grad`` of ``Σ_b f_b`` to those edges gives every
example's output gradient ``δ`` at once (examples do not interact). Parameter
gradients are not requested (except to verify), so autograd skips the
weight-gradient products a training step computes. Factorized blocks (linear,
HF conv1d, conv2d, embedding) are projected side by side, ``Σ_t (P_l u_t)(P_r v_t)ᵀ``
(``t`` runs over tokens, pixels, noise draws), and never form the ``[left, right]``
per-example gradient; a conv's input side is
projected by convolving with ``P_r`` reshaped as kernels (no unfold). Generic
blocks (norms, attention, recurrent layers, odd parameters) get exact per-example
gradients from a module-local vector-Jacobian product (``torch.func.vmap`` over the
captured inputs and ``δ``; a per-row loop where vmap cannot trace the module) and a
dense projection. A generic module may take and return nested tuples (attention's
``(output, weights)``, an LSTM's ``(output, (h, c))``): every output tensor that
reaches the loss has its ``δ`` recorded, and where the examples sit in each input and
output comes from :mod:`gradindex.features.layouts` (``batch_first=False`` layouts,
attention masks, recurrent states). :meth:`GradientProjector.record` leaves the
recorded calls for :mod:`gradindex.features.positions` (token heatmaps).

A module's leading dimension may be ``R·B`` (``R`` contiguous copies per example,
e.g. noise draws); rows are summed per example. The blocks of a tied tensor (same
``Block.tie``) share one projector and their contributions are summed into one
feature block.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from gradindex.config import ProjectionConfig
from gradindex.errors import TaskError
from gradindex.features.groups import TRANSPOSED_KINDS, ParameterGroup, part_owners
from gradindex.features.layouts import call_layouts, module_batch_dims, output_rows, tensor_leaves
from gradindex.features.projection import BlockProjector, make_block_projector

logger = logging.getLogger(__name__)


@dataclass
class _Call:
    """What one module call left behind: projected input side and projected output gradient."""

    right: torch.Tensor | None = None  # factorized: [B', T, k_right] (linear/conv) or [B', T, k_left] (embedding)
    left: torch.Tensor | None = None  # factorized: the other side, from the output gradient
    args: tuple = ()  # generic: cloned inputs
    kwargs: dict = field(default_factory=dict)
    layouts: tuple = ()  # generic: (input leaf layouts, output leaf layouts), see gradindex.features.layouts
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)  # generic: output leaf -> raw gradient
    # where each output leaf's gradient δ arrives (before any in-place op), and its shape
    edges: dict[int, GradientEdge] = field(default_factory=dict)
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    batch_dim: int = 0  # factorized: the dimension of the examples in the module's input and output


class GradientProjector:
    """Computes projected per-example gradients of ``model`` for every group.

    Use as a context manager (hooks are removed on exit) or call :meth:`close`.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[ParameterGroup],
        projection: ProjectionConfig,
        device: torch.device | str = "cpu",
    ):
        self.model = model
        self.groups = list(groups)
        self.device = torch.device(device)
        modules = dict(model.named_modules())
        self.projectors: dict[str, list[BlockProjector]] = {
            group.name: [make_block_projector(group.name, block, projection, self.device) for block in group.blocks]
            for group in self.groups
        }
        self._blocks = [bp for group in self.groups for bp in self.projectors[group.name]]
        # block positions per feature part (one untied block, or every alias of one tied tensor)
        self._parts: list[list[int]] = []
        position = 0
        for group in self.groups:
            keys: dict[Any, list[int]] = {}
            for offset, bp in enumerate(self.projectors[group.name]):
                keys.setdefault(bp.block.tie or offset, []).append(position + offset)
            self._parts.extend(keys.values())
            position += len(self.projectors[group.name])
        self._modules = {bp.block.module: modules[bp.block.module] for bp in self._blocks}
        self._batch_dims = module_batch_dims(model)
        self._calls: dict[int, list[_Call]] = {}
        self._recording = False
        self._handles = []
        for position, bp in enumerate(self._blocks):
            module = self._modules[bp.block.module]
            self._handles.append(
                module.register_forward_hook(self._make_forward_hook(position, bp), with_kwargs=True)
            )

    # -- public -------------------------------------------------------------------------
    def group_dims(self) -> dict[str, int]:
        return {
            name: sum(blocks[i].out_dim for i in part_owners([bp.block for bp in blocks]))
            for name, blocks in self.projectors.items()
        }

    def recorded_calls(self, position: int) -> list[_Call]:
        """What :meth:`record` left for block ``position`` (blocks in group order): one entry per module call."""
        return self._calls.get(position, [])

    def host_module(self, bp: BlockProjector) -> nn.Module:
        """The module whose forward ``bp``'s gradients are taken through."""
        return self._modules[bp.block.module]

    def clear(self) -> None:
        """Drop what :meth:`record` left."""
        self._calls = {}

    def __call__(self, compute: Callable[[], torch.Tensor], verify: bool = False) -> dict[str, torch.Tensor]:
        """Run ``compute()`` (per-example scalars ``[B]``) and return ``{group: [B, k_g]}``.

        With ``verify=True`` the per-example results are checked against the
        autograd batch gradient: ``Σ_b φ_b`` must equal the projected ``Σ_b ∇f_b``.
        """
        batch, summed_per_block = self.record(compute, verify)
        features = {}
        position = 0
        for group in self.groups:
            # a part is one untied block, or all blocks of one tied tensor added up
            parts: dict[Any, list] = {}  # key -> [first block projector, phi, calls seen, full gradient]
            for offset, bp in enumerate(self.projectors[group.name]):
                calls = self._calls[position]
                phi = self._finish_block(bp, calls, batch)
                key = bp.block.tie or offset
                if key in parts:
                    parts[key][1] = parts[key][1] + phi
                    parts[key][2] += len(calls)
                else:  # every alias of a tied tensor receives its whole gradient: keep the first
                    parts[key] = [bp, phi, len(calls), summed_per_block.get(position, ())]
                position += 1
            for first_bp, phi, num_calls, block_sum in parts.values():
                if not num_calls:
                    self._check_ran(first_bp, group.name, block_sum)
                if verify:
                    self._verify(first_bp, group.name, phi, block_sum)
            phis = [part[1] for part in parts.values()]
            features[group.name] = phis[0] if len(phis) == 1 else torch.cat(phis, dim=1)
        self._calls = {}
        return features

    def record(self, compute: Callable[[], torch.Tensor],
               verify: bool = False) -> tuple[int, dict[int, list[torch.Tensor | None]]]:
        """Run ``compute()`` and one backward; leave every block's calls (projected sides, generic
        inputs and output gradients) in ``self._calls``. Returns the batch size ``B`` and the summed
        parameter gradients of the parts that are checked (``verify``; parts whose forward never ran)."""
        self._calls = {position: [] for position in range(len(self._blocks))}
        params = self._block_params()
        try:
            self._recording = True
            with torch.enable_grad():
                values = compute()
                if not isinstance(values, torch.Tensor) or values.ndim != 1:
                    shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
                    raise TaskError(f"the task must return one scalar per example, shape [B]; got {shape}")
                if not torch.isfinite(values).all():
                    raise TaskError("the task returned a non-finite loss or measurement (nan or inf)")
                if not values.requires_grad:
                    raise TaskError("the task's loss or measurement has no gradient: it does not depend on the "
                                    "model's trainable parameters (computed under no_grad, detached, or from "
                                    "another model?)")
        finally:
            self._recording = False
        # One backward to the recorded output edges gives every call's δ. Parameter gradients are
        # asked for only where they are checked (to verify; parts whose forward never ran), so
        # autograd skips the weight-gradient products of a training step everywhere else. Every
        # alias of a tied tensor receives its whole gradient: a part's first block stands for it.
        recorded = [(position, call, leaf) for position, calls in self._calls.items()
                    for call in calls for leaf in call.edges]
        checked = [positions[0] for positions in self._parts
                   if verify or not any(self._calls[position] for position in positions)]
        inputs = [call.edges[leaf] for _, call, leaf in recorded]
        inputs += [p for position in checked for p in params[position]]
        grads = torch.autograd.grad(values.sum(), inputs, allow_unused=True) if inputs else ()
        for (position, call, leaf), grad in zip(recorded, grads):
            if grad is not None:
                self._take_output_gradient(self._blocks[position], call, leaf, grad)
        for _, call, _ in recorded:
            call.edges = {}  # drop the references to the graph
        param_grads = iter(grads[len(recorded):])
        summed_per_block = {position: [next(param_grads) for _ in params[position]] for position in checked}
        return values.shape[0], summed_per_block

    @staticmethod
    def _check_ran(bp: BlockProjector, group: str, block_sum: list) -> None:
        if any(g is not None and bool(g.any()) for g in block_sum):
            raise TaskError(
                f"module {bp.block.module!r} (group {group!r}): its parameters received gradient but its "
                f"forward() never ran: another module uses its weights; take the group's gradients where "
                f"they are used with the group rule {_host_rule(bp, group)}"
            )

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "GradientProjector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- hooks ------------------------------------------------------------------------------
    def _block_params(self) -> list[list[torch.Tensor]]:
        return [
            [self._modules[bp.block.module].get_parameter(name) for name in bp.block.params]
            for bp in self._blocks
        ]

    def _make_forward_hook(self, position: int, bp: BlockProjector):
        block = bp.block

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self._recording:
                return
            call = _Call(batch_dim=self._batch_dims.get(block.module, 0))
            replaced = None
            if block.kind == "generic":
                leaves = tensor_leaves(output)
                if sum(leaf.requires_grad for leaf in leaves) > 1:
                    # one output may be computed from another inside the module (an LSTM cell's h from c):
                    # the gradient edge of the inner one would also carry what reaches it through the other.
                    # Copies receive only what the rest of the model sends back to each output.
                    replaced = tree_map(_copy_if_grad, output)
                    leaves = tensor_leaves(replaced)
                rows = output_rows(module, call.batch_dim, output)
                call.layouts = call_layouts(module, call.batch_dim, args, kwargs, output, rows)
            elif isinstance(output, torch.Tensor):
                leaves = [output]
            else:
                raise TaskError(f"module {block.module!r} returns {type(output).__name__}, not a tensor; "
                                f"take its gradients as a generic block: the group rule {_host_rule(bp, '')}")
            with torch.no_grad():
                self._capture_inputs(call, bp, module, args, kwargs)
            self._calls[position].append(call)
            for leaf, tensor in enumerate(leaves):
                if tensor.requires_grad:
                    call.edges[leaf] = get_gradient_edge(_gradient_target(tensor))
                    call.shapes[leaf] = tuple(tensor.shape)
            return replaced

        return hook

    @staticmethod
    def _capture_inputs(call: _Call, bp: BlockProjector, module: nn.Module, args: tuple, kwargs: dict) -> None:
        block = bp.block
        if block.kind in ("linear", "conv1d"):
            call.right = bp.combine_right(_with_bias_column(_as_rows(args[0].movedim(call.batch_dim, 0)), block))
        elif block.kind == "conv2d":
            call.right = _project_conv_input(args[0], module, bp)
        elif block.kind == "embedding":
            tokens = args[0].movedim(call.batch_dim, 0)
            tokens = tokens.reshape(tokens.shape[0], -1)
            onehot_side = bp.combine_left.columns(tokens)
            if module.padding_idx is not None:
                onehot_side = onehot_side * (tokens != module.padding_idx).unsqueeze(-1)
            call.left = onehot_side
        else:
            call.args, call.kwargs = tree_map(_detached_clone, (tuple(args), dict(kwargs)))

    @staticmethod
    def _take_output_gradient(bp: BlockProjector, call: _Call, leaf: int, grad: torch.Tensor) -> None:
        """Project (or keep, for generic blocks) the gradient ``δ`` of output leaf ``leaf`` of one call."""
        kind = bp.block.kind
        grad = grad.detach().reshape(call.shapes[leaf])
        if kind == "generic":
            call.deltas[leaf] = grad
            return
        grad = grad.float().movedim(call.batch_dim, 0)
        if kind in ("linear", "conv1d"):
            call.left = bp.combine_left(_as_rows(grad))
        elif kind == "conv2d":
            call.left = bp.combine_left(grad.flatten(2).transpose(1, 2))
        elif kind == "embedding":
            call.right = bp.combine_right(grad.reshape(grad.shape[0], -1, grad.shape[-1]))

    # -- combining --------------------------------------------------------------------------
    def _finish_block(self, bp: BlockProjector, calls: list[_Call], batch: int) -> torch.Tensor:
        out = None
        for call in calls:
            if bp.block.kind == "generic":
                if not call.deltas:
                    continue
                grads = self._generic_gradients(bp, call)
                phi = bp.dense(per_example(grads, batch, bp.block.module).sum(1))
            else:
                if call.left is None or call.right is None:
                    continue  # the output did not reach the loss: zero gradient
                left = per_example(call.left, batch, bp.block.module)
                right = per_example(call.right, batch, bp.block.module)
                phi = bp.combine(left, right)
            out = phi if out is None else out + phi
        return torch.zeros(batch, bp.out_dim, device=self.device) if out is None else out

    def _generic_gradients(self, bp: BlockProjector, call: _Call) -> torch.Tensor:
        """Exact per-row gradients ``[B', numel]`` of a generic block by a module-local VJP, vmapped over the
        examples (``B'`` rows along each leaf's examples dimension, see :mod:`gradindex.features.layouts`)."""
        module = self._modules[bp.block.module]
        params = {name: module.get_parameter(name).detach() for name in bp.block.params}
        in_layouts, out_layouts = call.layouts
        leaves, spec = tree_flatten((call.args, call.kwargs))
        dims, inserts, tensor_position = [], [], 0
        for position, leaf in enumerate(leaves):
            layout = in_layouts[tensor_position] if isinstance(leaf, torch.Tensor) else None
            tensor_position += isinstance(leaf, torch.Tensor)
            if layout is None or layout.dim is None:
                dims.append(None)
                inserts.append(None)
            elif layout.heads > 1:  # [B'·heads, ...] -> [B', heads, ...]; a row is the [heads, ...] of one call
                leaves[position] = leaf.reshape(-1, layout.heads, *leaf.shape[1:])
                dims.append(0)
                inserts.append(None)
            else:
                dims.append(layout.dim)
                inserts.append(layout.dim)
        chosen = sorted(call.deltas)
        out_dims = [out_layouts[leaf].dim for leaf in chosen]
        if None in out_dims:
            raise TaskError(f"module {bp.block.module!r}: an output that does not hold examples along a dimension "
                            "(an unbatched call) reached the loss; call it on a batch")
        deltas = [call.deltas[leaf] for leaf in chosen]
        dtype = _first_dtype(params)

        def row_gradient(p: dict, row_leaves: list, row_deltas: list) -> torch.Tensor:
            full = [leaf.unsqueeze(d) if d is not None else leaf for leaf, d in zip(row_leaves, inserts)]
            args, kwargs = tree_unflatten(full, spec)

            def local(q: dict) -> tuple:
                outputs = tensor_leaves(torch.func.functional_call(module, q, args, kwargs))
                return tuple(outputs[leaf] for leaf in chosen)

            _, vjp = torch.func.vjp(local, p)
            (grads,) = vjp(tuple(d.unsqueeze(o).to(dtype) for d, o in zip(row_deltas, out_dims)))
            return torch.cat([grads[name].reshape(-1).float() for name in bp.block.params])

        with warnings.catch_warnings():
            # torch's notice that vmap falls back to a loop for an op (attention, RNN kernels): a speed
            # note for torch's developers, not the user's concern
            warnings.filterwarnings("ignore", message=VMAP_FALLBACK_NOTICE, category=UserWarning)
            try:
                return torch.func.vmap(row_gradient, in_dims=(None, dims, out_dims))(params, leaves, deltas)
            except Exception as err:  # vmap cannot trace every forward (GRU); the row loop is exact too
                logger.debug("vmap failed for %s (%s); using a per-row loop", bp.block.module, err)
                rows = deltas[0].shape[out_dims[0]]
                return torch.stack([
                    row_gradient(params,
                                 [leaf if d is None else leaf.select(d, i) for leaf, d in zip(leaves, dims)],
                                 [delta.select(o, i) for delta, o in zip(deltas, out_dims)])
                    for i in range(rows)
                ])

    def _verify(self, bp: BlockProjector, group: str, phi: torch.Tensor, block_sum: list) -> None:
        full = [
            (g if g is not None else torch.zeros_like(self._modules[bp.block.module].get_parameter(name))).float()
            for g, name in zip(block_sum, bp.block.params)
        ]
        expected = bp.project_gradient(reference_layout(bp.block.kind, bp.block.params, full).unsqueeze(0))[0]
        got = phi.sum(0)
        scale = expected.norm().clamp_min(1e-12)
        error = float((got - expected).norm().detach() / scale)
        if error > 1e-3 and float(expected.norm()) > 1e-8:
            raise TaskError(
                f"module {bp.block.module!r} (group {group!r}): per-example gradients do not add up to the "
                f"batch gradient (relative error {error:.2e}): the module's weights are used outside its "
                f"forward(), or its output is a view modified in place; take its gradients where they are used "
                f"with the group rule {_host_rule(bp, group)}"
            )


def reference_layout(kind: str, params: Sequence[str], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Flatten one example's full parameter gradients of a block into the projectors' layout.

    linear/conv1d/conv2d: row-major ``[out, in (+1 bias column)]`` (conv1d stores its
    weight ``[in, out]``: transposed here); embedding: ``[vocab, dim]``; generic: the
    parameters flattened and concatenated in block order. Returns ``[numel]``.
    """
    if kind in ("generic", "embedding"):
        return torch.cat([g.reshape(-1) for g in grads])
    by_name = dict(zip(params, grads))
    columns = []
    if "weight" in by_name:
        weight = by_name["weight"].T if kind in TRANSPOSED_KINDS else by_name["weight"]
        columns.append(weight.reshape(weight.shape[0], -1))
    if "bias" in by_name:
        columns.append(by_name["bias"].reshape(-1, 1))
    return torch.cat(columns, dim=1).reshape(-1)


def _gradient_target(output: torch.Tensor) -> torch.Tensor:
    """The tensor whose gradient edge receives ``∂/∂output`` even if ``output`` is later modified in place.

    A plain tensor's edge (like a tensor hook) survives in-place ops, but a view's does not
    (``nn.Linear`` on a 3-D input returns a view of a 2-D product: an in-place op on it reroutes the
    gradient around the view node): then the edge is the view's base's, which holds the same
    elements in the same order when the view is a contiguous reshape of it.
    """
    base = output._base
    if base is not None and base.numel() == output.numel() and base.is_contiguous() and output.is_contiguous():
        return base
    return output


#: torch's notice that vmap loops over an op without a batching rule (a note for torch's developers)
VMAP_FALLBACK_NOTICE = r"There is a performance drop because we have not yet implemented the batching rule"


def _host_rule(bp: BlockProjector, group: str) -> str:
    """A group rule that takes ``bp``'s parameters' gradients through the whole model's forward."""
    prefix = f"{bp.block.module}." if bp.block.module else ""
    pattern = f"{prefix}*" if len(bp.block.params) > 1 else prefix + bp.block.params[0]
    return f"'{pattern}={group or bp.block.module or bp.block.params[0]}@'"


def _copy_if_grad(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) and value.requires_grad else value


def _detached_clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _first_dtype(params: dict) -> torch.dtype:
    return next(iter(params.values())).dtype


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B', ..., d] -> [B', T, d]`` (T = 1 for plain vectors), float32, detached (a view made under
    ``no_grad`` still requires grad, and an identity projector would keep it)."""
    return x.detach().reshape(x.shape[0], -1, x.shape[-1]).float()


def _with_bias_column(rows: torch.Tensor, block) -> torch.Tensor:
    parts = []
    if "weight" in block.params:
        parts.append(rows)
    if "bias" in block.params:
        parts.append(rows.new_ones(rows.shape[0], rows.shape[1], 1))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def _project_conv_input(x: torch.Tensor, module: nn.Conv2d, bp: BlockProjector) -> torch.Tensor:
    """``P_right`` applied to every input patch (bias column included): ``[B', L, k_right]``."""
    if x.ndim != 4:
        raise TaskError(f"conv module {bp.block.module!r}: expected a [B, C, H, W] input, got {tuple(x.shape)}")
    matrix = bp.combine_right.matrix()  # [k_right, C*kh*kw (+1)]
    has_weight = "weight" in bp.block.params
    rows = x.shape[0]
    if has_weight:
        patch_cols = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        kernel = matrix[:, :patch_cols].reshape(-1, module.in_channels, *module.kernel_size)
        bias = matrix[:, patch_cols].contiguous() if "bias" in bp.block.params else None  # the bias column
        projected = F.conv2d(x.float(), kernel, bias, module.stride, module.padding, module.dilation)
        return projected.flatten(2).transpose(1, 2)  # [B', L, k_right]
    # bias only: the input side is the constant 1 at every output position
    out_hw = F.conv2d(x[:, :1].float(), x.new_zeros(1, 1, *module.kernel_size).float(), None,
                      module.stride, module.padding, module.dilation).shape[-2:]
    return matrix[:, 0].expand(rows, out_hw[0] * out_hw[1], -1)


def per_example(rows: torch.Tensor, batch: int, module: str) -> torch.Tensor:
    """``[B', ..., k] -> [B, R·..., k]`` where ``B' = R·B`` holds R contiguous copies per example."""
    if rows.shape[0] % batch:
        raise TaskError(
            f"module {module!r} saw a leading dimension of {rows.shape[0]}, not a multiple of the batch size "
            f"{batch}; modules must see examples (or R contiguous copies of each) along dimension 0"
        )
    return rows.reshape(batch, -1, rows.shape[-1])
