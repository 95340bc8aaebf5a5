"""Seeded random projections (DESIGN §1.1). Tensor in, tensor out; no I/O.

* :class:`Projector` maps ``[..., dim] -> [..., k]`` with a seeded matrix
  ``P [k, dim]``, ``E[PᵀP] = I`` (Gaussian N(0, 1/k) or Rademacher ±1/√k), or is
  the identity when ``k >= dim``. Large matrices are generated in column chunks
  (each from its own derived seed), so a projector never needs more than a
  bounded amount of memory.
* :class:`BlockProjector` holds what one module block needs: ``left`` and
  ``right`` projectors for factorized blocks, or one dense projector for generic
  blocks. A factorized block's gradient is ``G = Σ_t u_t v_tᵀ`` (``[left, right]``);
  it is projected by ``r`` stacked independent Kronecker heads

      φ = (1/√r) [vec(P_l¹ G P_r¹ᵀ); …; vec(P_lʳ G P_rʳᵀ)],
      P_lⁱ G P_rⁱᵀ = Σ_t (P_lⁱ u_t)(P_rⁱ v_t)ᵀ,

  i.e. ``φ = P vec(G)`` with ``P = (1/√r)[P_l¹⊗P_r¹; …]`` (row-major ``vec``) and
  ``E[PᵀP] = I``. Heads are ``s_l × s_r`` (``factor_dim``, default 2), so
  ``r = k / (s_l s_r)``. One ``√k × √k`` head (LoGra) estimates inner products
  like two sketches of size √k — on the digits models its scores correlated
  only 0.79–0.83 with exact ones at k = 256 — while 64 heads of 2×2 reached
  0.92–0.98 at the same k; each side costs ``r·s = k/s`` per token.

Matrices are drawn on the CPU from ``derive_seed(seed, group, module, side)``
(``derive_seed(seed, group, "tie", key, side)`` for the blocks of a tied tensor) and
then moved to the device, so a store built on a GPU is queried on a CPU with the
same matrices.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field

import torch

from gradindex.config import ProjectionConfig, ProjectionKind
from gradindex.errors import StoreMismatchError
from gradindex.features.groups import FACTORIZED_KINDS, Block

#: bytes of projection matrix a Projector keeps in memory; beyond, chunks are regenerated per call
MAX_CACHED_BYTES = 1 << 30
#: bytes of one generated column chunk
CHUNK_BYTES = 1 << 26
#: heads of at most this many entries (s_l·s_r) are combined elementwise with the head index innermost
SMALL_HEAD = 16
#: elements of the temporary [B, T', s_l, s_r, r] product that combine() builds at a time
COMBINE_ELEMENTS = 1 << 22
#: version of how matrices are drawn (seed derivation, chunk seeds, head layout): bump it whenever the
#: same config would project to other numbers
PROJECTION_VERSION = 1


def projection_format() -> dict[str, int]:
    """What besides the :class:`ProjectionConfig` decides the projected numbers (the manifest records it)."""
    return {"version": PROJECTION_VERSION, "chunk_bytes": CHUNK_BYTES}


def check_projection_format(recorded: dict, where: str) -> None:
    """Refuse a store projected under another format: its matrices are not this code's."""
    current = projection_format()
    if recorded != current:
        raise StoreMismatchError(
            f"{where}: the store was projected with projection format {recorded}, this gradindex projects with "
            f"{current}; its query features would not match: featurize again with this version (or use the "
            "gradindex that wrote the store)"
        )


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
    """``x [..., dim] -> x Pᵀ [..., k]``; the identity when kind is IDENTITY, or ``k >= dim`` for a plain projector.

    Entries have variance ``1/norm_rows`` (default ``1/k``); a factorized side
    stacking ``r`` heads of ``s`` rows uses ``norm_rows = s``.
    """

    def __init__(self, kind: ProjectionKind, dim: int, k: int, seed: int, device: torch.device | str = "cpu",
                 norm_rows: int | None = None):
        self.dim = dim
        self.norm_rows = norm_rows
        # stacked heads (norm_rows given) stay random even when k >= dim
        self.is_identity = kind is ProjectionKind.IDENTITY or (norm_rows is None and k >= dim)
        self.k = dim if self.is_identity else k
        self.kind = kind
        self.seed = seed
        self.device = torch.device(device)
        self._row_order: torch.Tensor | None = None  # see reordered()
        chunk = max(1, CHUNK_BYTES // (4 * self.k))
        self._bounds = [(start, min(dim, start + chunk)) for start in range(0, dim, chunk)]
        self._chunks: list[torch.Tensor] | None = None
        if not self.is_identity and 4 * self.k * dim <= MAX_CACHED_BYTES:
            self._chunks = [self._make_chunk(i) for i in range(len(self._bounds))]

    def _make_chunk(self, index: int) -> torch.Tensor:
        start, stop = self._bounds[index]
        seed = self.seed if len(self._bounds) == 1 else derive_seed(self.seed, f"chunk{index}")
        matrix = random_matrix(self.kind, self.k, stop - start, seed)
        if self._row_order is not None:
            matrix = matrix[self._row_order]
        if self.norm_rows is not None:
            matrix *= math.sqrt(self.k / self.norm_rows)
        return matrix.to(self.device)

    def _chunk(self, index: int) -> torch.Tensor:
        return self._chunks[index] if self._chunks is not None else self._make_chunk(index)

    def matrix(self) -> torch.Tensor:
        """The whole ``[k, dim]`` matrix (identity included); for small projectors and tests."""
        if self.is_identity:
            return torch.eye(self.dim, device=self.device)
        if len(self._bounds) == 1:
            return self._chunk(0)  # the cached matrix itself (read-only use), not a copy per call
        return torch.cat([self._chunk(i) for i in range(len(self._bounds))], dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"projector expects last dimension {self.dim}, got shape {tuple(x.shape)}")
        if self.is_identity:
            return x
        if len(self._bounds) == 1:
            return _times_transpose(x, self._chunk(0))
        out = None
        for index, (start, stop) in enumerate(self._bounds):
            part = _times_transpose(x[..., start:stop], self._chunk(index))
            out = part if out is None else out + part
        return out

    def reordered(self, order: torch.Tensor) -> "Projector":
        """The same projector with its matrix rows (output coordinates) permuted: ``P[order]``."""
        if self.is_identity:
            raise ValueError("an identity projector has no random rows to reorder")
        other = copy.copy(self)
        other._row_order = order if self._row_order is None else self._row_order[order]
        if self._chunks is not None:
            other._chunks = [chunk[order.to(chunk.device)] for chunk in self._chunks]
        return other

    def columns(self, index: torch.Tensor) -> torch.Tensor:
        """``P[:, index]`` moved to the last axis: ``[*index.shape, k]`` (one-hot inputs)."""
        if self.is_identity:
            return torch.nn.functional.one_hot(index, self.dim).float()
        return self.matrix().T[index]


def _times_transpose(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``x [..., n] @ matrix[k, n]ᵀ`` as one 2-D GEMM (``F.linear`` on the flattened leading
    dimensions; ``@`` with a 3-D ``x`` costs a few times more per call on small inputs)."""
    out = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), matrix)
    return out.reshape(*x.shape[:-1], matrix.shape[0])


def factor_dims(left: int, right: int, k: int, factor_dim: int) -> tuple[int, int, int]:
    """``(heads, s_left, s_right)`` for a ``[left, right]`` gradient and target dimension ``k``.

    A gradient no larger than ``k`` is kept whole: ``(1, left, right)`` with
    identity sides. Otherwise heads are ``min(factor_dim, side)`` on each side and
    there are ``max(1, k // (s_left·s_right))`` of them.
    """
    if left * right <= k:
        return 1, left, right
    s_left, s_right = min(factor_dim, left), min(factor_dim, right)
    return max(1, k // (s_left * s_right)), s_left, s_right


@dataclass
class BlockProjector:
    """The projectors of one module block: ``left``/``right`` (factorized) or ``dense`` (generic).

    ``left``/``right`` hold the heads one after another (head-major rows); the
    gradient engine projects with ``combine_left``/``combine_right`` instead, the
    same matrices with the rows in the order :meth:`combine` reads fastest: for
    small heads (``s_l·s_r ≤ SMALL_HEAD``) head-minor (row ``i·r + h`` is row ``i``
    of head ``h``), so that the per-head outer products are elementwise products
    of contiguous ``[r]`` vectors rather than ``r`` tiny matrix products.
    """

    block: Block
    left: Projector | None = None
    right: Projector | None = None
    dense: Projector | None = None
    heads: int = 1
    head_minor: bool = field(init=False, default=False)
    combine_left: Projector | None = field(init=False, default=None)
    combine_right: Projector | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.dense is not None:
            return
        s_left, s_right = self.left.k // self.heads, self.right.k // self.heads
        self.head_minor = self.heads > 1 and s_left * s_right <= SMALL_HEAD
        self.combine_left, self.combine_right = self.left, self.right
        if self.head_minor:
            self.combine_left = self.left.reordered(_head_minor_order(self.heads, s_left))
            self.combine_right = self.right.reordered(_head_minor_order(self.heads, s_right))

    @property
    def out_dim(self) -> int:
        if self.dense is not None:
            return self.dense.k
        return self.left.k * self.right.k // self.heads

    def dims(self) -> dict[str, int]:
        if self.dense is not None:
            return {"k": self.dense.k}
        return {"heads": self.heads, "k_left": self.left.k // self.heads, "k_right": self.right.k // self.heads}

    def combine(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Sides projected by ``combine_left``/``combine_right``, ``[B, T, r·s_l]`` and ``[B, T, r·s_r]``,
        → ``[B, r·s_l·s_r]``: ``Σ_t`` of the per-head outer products, head-major ``(h, l, r)`` order."""
        batch, positions, heads = left.shape[0], left.shape[1], self.heads
        if heads == 1:
            if positions == 1:
                return (left.transpose(1, 2) * right).reshape(batch, -1)
            return torch.bmm(left.transpose(1, 2), right).reshape(batch, -1)
        if not self.head_minor:
            left = left.reshape(batch, positions, heads, -1)
            right = right.reshape(batch, positions, heads, -1)
            return torch.einsum("bthl,bthr->bhlr", left, right).reshape(batch, -1) / math.sqrt(heads)
        # contiguous: the head index must be the innermost, unit-stride axis of the products
        left = left.contiguous().reshape(batch, positions, -1, 1, heads)  # [B, T, s_l, 1, r]
        right = right.contiguous().reshape(batch, positions, 1, -1, heads)  # [B, T, 1, s_r, r]
        if positions == 1:
            out = (left * right)[:, 0]
        else:
            step = max(1, COMBINE_ELEMENTS // (batch * left.shape[2] * right.shape[3] * heads))
            out = None
            for t in range(0, positions, step):
                part = (left[:, t : t + step] * right[:, t : t + step]).sum(1)
                out = part if out is None else out + part
        return out.permute(0, 3, 1, 2).reshape(batch, -1) / math.sqrt(heads)  # [B, s_l, s_r, r] -> (h, l, r)

    def project_gradient(self, gradient: torch.Tensor) -> torch.Tensor:
        """Project full flattened block gradients ``[B, numel] -> [B, out_dim]`` (reference layout)."""
        if self.dense is not None:
            return self.dense(gradient)
        g = gradient.reshape(-1, self.block.left, self.block.right)
        left = self.left.matrix().reshape(self.heads, -1, self.block.left)
        right = self.right.matrix().reshape(self.heads, -1, self.block.right)
        out = torch.einsum("hkl,blr,hjr->bhkj", left, g, right) / math.sqrt(self.heads)
        return out.reshape(gradient.shape[0], -1)


def _head_minor_order(heads: int, size: int) -> torch.Tensor:
    """Row permutation taking head-major rows (``h·size + i``) to head-minor ones (``i·heads + h``)."""
    return torch.arange(heads * size).reshape(heads, size).T.reshape(-1)


def block_dims(group: str, block: Block, config: ProjectionConfig) -> dict[str, int]:
    """What :meth:`BlockProjector.dims` of ``block`` will be under ``config``, without drawing a matrix:
    ``{"heads", "k_left", "k_right"}`` (factorized) or ``{"k"}`` (dense)."""
    k = block.numel if config.kind is ProjectionKind.IDENTITY else config.dim_for(group)
    if block.kind in FACTORIZED_KINDS:
        heads, s_left, s_right = factor_dims(block.left, block.right, k, config.factor_dim)
        return {"heads": heads, "k_left": s_left, "k_right": s_right}
    return {"k": block.numel if k >= block.numel else k}


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
        dims = block_dims(group, block, config)
        heads, s_left, s_right = dims["heads"], dims["k_left"], dims["k_right"]
        if heads == 1 and s_left == block.left and s_right == block.right:
            kind = ProjectionKind.IDENTITY
        else:
            kind = config.kind
        return BlockProjector(
            block,
            left=Projector(kind, block.left, heads * s_left, derive_seed(seed, "left"), device, norm_rows=s_left),
            right=Projector(kind, block.right, heads * s_right, derive_seed(seed, "right"), device, norm_rows=s_right),
            heads=heads,
        )
    return BlockProjector(block, dense=Projector(config.kind, block.numel, k, derive_seed(seed, "dense"), device))
