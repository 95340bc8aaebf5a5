"""Independent references for the tests: a per-example autograd loop and explicit dense projectors.

Nothing here is used by the package; the package is tested against it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gradindex.features.gradients import reference_layout
from gradindex.features.groups import ParameterGroup, part_owners
from gradindex.features.projection import BlockProjector


def per_example_gradients(
    model: torch.nn.Module,
    groups: Sequence[ParameterGroup],
    compute: Callable[[object], torch.Tensor],
    batches: Sequence[object],
) -> dict[str, torch.Tensor]:
    """Full per-example gradients ``{group: [n, numel_g]}``, one ``autograd.grad`` per example.

    ``compute(batch)`` returns ``[1]`` for a single-example batch.
    """
    modules = dict(model.named_modules())
    out: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
    for batch in batches:
        value = compute(batch)
        assert value.shape == (1,)
        for group in groups:
            blocks = [group.blocks[i] for i in part_owners(group.blocks)]  # a tied tensor once
            params = [modules[b.module].get_parameter(name) for b in blocks for name in b.params]
            grads = torch.autograd.grad(value[0], params, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            parts, position = [], 0
            for block in blocks:
                count = len(block.params)
                parts.append(reference_layout(block.kind, block.params, grads[position : position + count]))
                position += count
            out[group.name].append(torch.cat(parts).detach())
    return {name: torch.stack(rows) for name, rows in out.items()}


def dense_block_matrix(bp: BlockProjector) -> torch.Tensor:
    """The explicit ``[k, numel]`` matrix of a block projector: stacked ``P_lⁱ ⊗ P_rⁱ / √r``, or the dense one."""
    if bp.dense is not None:
        return bp.dense.matrix()
    lefts = bp.left.matrix().reshape(bp.heads, -1, bp.block.left)
    rights = bp.right.matrix().reshape(bp.heads, -1, bp.block.right)
    return torch.cat([torch.kron(l, r) for l, r in zip(lefts, rights)]) / bp.heads**0.5


def dense_group_projection(projectors: Sequence[BlockProjector], gradients: torch.Tensor) -> torch.Tensor:
    """Project full group gradients ``[n, numel_g]`` block by block with the explicit matrices."""
    outputs, start = [], 0
    for position in part_owners([bp.block for bp in projectors]):  # a tied tensor once
        bp = projectors[position]
        stop = start + bp.block.numel
        outputs.append(gradients[:, start:stop] @ dense_block_matrix(bp).T)
        start = stop
    return torch.cat(outputs, dim=1)
