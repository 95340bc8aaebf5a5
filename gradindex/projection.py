"""Seeded random projections (DESIGN §1.1). Tensor in, tensor out; no I/O.

* :class:`Projector` maps ``[..., dim] -> [..., k]`` with a seeded matrix
  ``P [k, dim]``, ``E[PᵀP] = I`` (Gaussian N(0, 1/k) or Rademacher ±1/√k), or is
  the identity when ``k >= dim``. Large matrices are generated in column chunks
  (each from its own derived seed), so a projector never needs more than a
  bounded amount of memory.
* :class:`BlockProjector` holds what one module block needs: a ``left`` and a
  ``right`` projector for factorized blocks (gradient ``G = Σ_t u_t v_tᵀ``,
  projected as ``P_left G P_rightᵀ = Σ_t (P_left u_t)(P_right v_t)ᵀ``, i.e.
  ``(P_left ⊗ P_right) vec(G)`` with row-major ``vec``), or one dense projector
  for generic blocks.

Matrices are drawn on the CPU from ``derive_seed(seed, group, module, side)``
(``derive_seed(seed, group, "tie", key, side)`` for the blocks of a tied tensor) and
then moved to the device, so a store built on a GPU is queried on a CPU with the
same matrices.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from gradindex.config import ProjectionConfig, ProjectionKind
from gradindex.groups import FACTORIZED_KINDS, Block

#: bytes of projection matrix a Projector keeps in memory; beyond, chunks are regenerated per call
MAX_CACHED_BYTES = 1 << 30
#: bytes of one generated column chunk
CHUNK_BYTES = 1 << 26


def derive_seed(seed: int, *keys: str) -> int:
    """A stable 63-bit seed from a base seed and string keys (independent of Python's hash salt)."""
    text = "|".join([str(seed), *keys]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def random_matrix(kind: ProjectionKind, rows: int, cols: int, seed: int) -> torch.Tensor:
    """A ``[rows, cols]`` float32 CPU matrix with ``E[MᵀM] = I``, reproducible from ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if kind is ProjectionKind.GAUSSIAN:
        return torch.randn(rows, cols, generator=generator) / math.sqrt(rows)
    if kind is ProjectionKind.RADEMACHER:
        signs = torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.int8)
        return (signs.float() * 2 - 1) / math.sqrt(rows)
    raise ValueError(f"no random matrix for projection kind {kind}")


class Projector:
    """``x [..., dim] -> x Pᵀ [..., k]``; the identity when ``k >= dim`` or kind is IDENTITY."""

    def __init__(self, kind: ProjectionKind, dim: int, k: int, seed: int, device: torch.device | str = "cpu"):
        self.dim = dim
        self.is_identity = kind is ProjectionKind.IDENTITY or k >= dim
        self.k = dim if self.is_identity else k
        self.kind = kind
        self.seed = seed
        self.device = torch.device(device)
        chunk = max(1, CHUNK_BYTES // (4 * self.k))
        self._bounds = [(start, min(dim, start + chunk)) for start in range(0, dim, chunk)]
        self._chunks: list[torch.Tensor] | None = None
        if not self.is_identity and 4 * self.k * dim <= MAX_CACHED_BYTES:
            self._chunks = [self._make_chunk(i) for i in range(len(self._bounds))]

    def _make_chunk(self, index: int) -> torch.Tensor:
        start, stop = self._bounds[index]
        seed = self.seed if len(self._bounds) == 1 else derive_seed(self.seed, f"chunk{index}")
        return random_matrix(self.kind, self.k, stop - start, seed).to(self.device)

    def _chunk(self, index: int) -> torch.Tensor:
        return self._chunks[index] if self._chunks is not None else self._make_chunk(index)

    def matrix(self) -> torch.Tensor:
        """The whole ``[k, dim]`` matrix (identity included); for small projectors and tests."""
        if self.is_identity:
            return torch.eye(self.dim, device=self.device)
        return torch.cat([self._chunk(i) for i in range(len(self._bounds))], dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"projector expects last dimension {self.dim}, got shape {tuple(x.shape)}")
        if self.is_identity:
            return x
        if len(self._bounds) == 1:
            return x @ self._chunk(0).T
        out = None
        for index, (start, stop) in enumerate(self._bounds):
            part = x[..., start:stop] @ self._chunk(index).T
            out = part if out is None else out + part
        return out

    def columns(self, index: torch.Tensor) -> torch.Tensor:
        """``P[:, index]`` moved to the last axis: ``[*index.shape, k]`` (one-hot inputs)."""
        if self.is_identity:
            return torch.nn.functional.one_hot(index, self.dim).float()
        return self.matrix().T[index]


def factor_dims(left: int, right: int, k: int) -> tuple[int, int]:
    """Split a target dimension ``k`` into ``(k_left, k_right)`` for a ``[left, right]`` gradient.

    A side no larger than its share is kept whole (identity on that side); the
    other side gets the rest. The product is at most ``k`` unless the whole
    gradient already fits (then both sides are kept whole).
    """
    if left * right <= k:
        return left, right
    root = math.isqrt(k)
    if left <= root:
        return left, max(1, min(right, k // left))
    if right <= root:
        return max(1, min(left, k // right)), right
    return root, max(1, k // root)


@dataclass
class BlockProjector:
    """The projectors of one module block: ``left``/``right`` (factorized) or ``dense`` (generic)."""

    block: Block
    left: Projector | None = None
    right: Projector | None = None
    dense: Projector | None = None

    @property
    def out_dim(self) -> int:
        if self.dense is not None:
            return self.dense.k
        return self.left.k * self.right.k

    def dims(self) -> dict[str, int]:
        if self.dense is not None:
            return {"k": self.dense.k}
        return {"k_left": self.left.k, "k_right": self.right.k}

    def project_gradient(self, gradient: torch.Tensor) -> torch.Tensor:
        """Project full flattened block gradients ``[B, numel] -> [B, out_dim]`` (reference layout)."""
        if self.dense is not None:
            return self.dense(gradient)
        g = gradient.reshape(-1, self.block.left, self.block.right)
        out = torch.einsum("kl,blr,jr->bkj", self.left.matrix(), g, self.right.matrix())
        return out.reshape(gradient.shape[0], -1)


def make_block_projector(
    group: str, block: Block, config: ProjectionConfig, device: torch.device | str = "cpu"
) -> BlockProjector:
    """The seeded projector of ``block`` in ``group`` under ``config``."""
    k = config.dim_for(group)
    if config.kind is ProjectionKind.IDENTITY:
        k = block.numel
    # the blocks of a tied tensor share one projector (their contributions are summed)
    seed = (derive_seed(config.seed, group, "tie", block.tie) if block.tie
            else derive_seed(config.seed, group, block.module, ",".join(block.params)))
    if block.kind in FACTORIZED_KINDS:
        k_left, k_right = factor_dims(block.left, block.right, k)
        return BlockProjector(
            block,
            left=Projector(config.kind, block.left, k_left, derive_seed(seed, "left"), device),
            right=Projector(config.kind, block.right, k_right, derive_seed(seed, "right"), device),
        )
    return BlockProjector(block, dense=Projector(config.kind, block.numel, k, derive_seed(seed, "dense"), device))
