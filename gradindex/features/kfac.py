"""K-FAC and EK-FAC factors and the query-side inverse (DESIGN §1.2). No store I/O.

In: a model, its :class:`~gradindex.features.groups.ParameterGroup` s and a closure
returning per-example losses ``[B]`` (labels sampled from the model for the true
Fisher, the training labels for the empirical one). Out: :class:`Factors`.

Per linear / HF conv1d / conv2d block (one untied module; bias = an appended 1 on
the input side, the projectors' ``[out, in (+1)]`` layout):

* ``A = Σ_{n,t} a aᵀ / #rows`` (input rows: tokens, conv patches) and
  ``S = Σ_{n,t} δ δᵀ / N`` (``δ = ∂ℓ_n/∂output`` per row): for one row per example
  ``A ⊗ S`` is exactly K-FAC's ``E[a aᵀ] ⊗ E[s sᵀ]``; with T rows per example it is
  ``E[vec G vec Gᵀ]`` under K-FAC's independence assumption (cross-row terms dropped).
* ``A = Q_A diag(e_A) Q_Aᵀ``, ``S = Q_S diag(e_S) Q_Sᵀ`` (float64 ``eigh``).
* EK-FAC (second pass, per-example gradients ``G_n [out, in']``):
  ``Λ = Σ_n (Q_Sᵀ G_n Q_A)² / N``  ``[out, in']``.

Blocks the factors do not cover (embeddings, generic blocks such as norms, grouped
convs, the blocks of a tied tensor) get the diagonal of the per-example gradients'
second moment, ``D = Σ_n g_n² / N`` ``[numel]``, from the same second pass.

Inverse (:class:`FactorInverse`), per block, damping ``λ = ρ · mean(eigenvalues)``
(``ρ`` = the relative ``damping``; 0.1 is kronfluence's heuristic):

    H⁻¹G = Q_S [(Q_Sᵀ G Q_A) ⊘ (Λ + λ)] Q_Aᵀ     (K-FAC: Λ = e_S e_Aᵀ)
    H⁻¹g = g ⊘ (D + λ)                          (diagonal blocks)

:func:`~gradindex.features.transformed.factor_query_projector` computes a query's full per-block gradient, applies
``H⁻¹`` and then the *same* seeded projection as the stored rows: ``{group: [B, k_g]}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge

from gradindex.config import ProjectionConfig, ProjectionKind
from gradindex.errors import ConfigError, TaskError
from gradindex.features.gradients import GradientProjector, _as_rows, _gradient_target, _with_bias_column
from gradindex.features.groups import Block, ParameterGroup, part_owners
from gradindex.features.precondition import Damping, group_damping

logger = logging.getLogger(__name__)

#: block kinds K-FAC covers (the others get the diagonal)
KRONECKER_KINDS = ("linear", "conv1d", "conv2d")
FACTOR_PRECONDITIONERS = ("kfac", "ekfac")


def is_factor_preconditioner(preconditioner: Any) -> bool:
    return getattr(preconditioner, "value", preconditioner) in FACTOR_PRECONDITIONERS


@dataclass
class KroneckerFactors:
    """One block's eigenbases and eigenvalues (float64): ``q_a [in', in']``, ``q_s [out, out]``,
    ``eig_a [in']``, ``eig_s [out]``, and EK-FAC's corrected ``lam [out, in']`` (None before pass 2)."""

    q_a: np.ndarray
    eig_a: np.ndarray
    q_s: np.ndarray
    eig_s: np.ndarray
    lam: np.ndarray | None = None

    def eigenvalues(self, kind: str) -> np.ndarray:
        """``[out, in']``: EK-FAC's ``Λ`` or K-FAC's ``e_S e_Aᵀ`` (negative round-off clipped)."""
        if kind == "ekfac":
            if self.lam is None:
                raise ConfigError("EK-FAC: the factors hold no corrected eigenvalues; fit them again")
            return self.lam
        return np.outer(np.clip(self.eig_s, 0, None), np.clip(self.eig_a, 0, None))


@dataclass
class Factors:
    """Per part key (``group/module``): Kronecker factors or a diagonal ``[numel]``; ``info`` goes
    into the manifest (fisher, counts)."""

    kron: dict[str, KroneckerFactors] = field(default_factory=dict)
    diag: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for key, f in self.kron.items():
            out.update({f"{key}|q_a": f.q_a, f"{key}|eig_a": f.eig_a, f"{key}|q_s": f.q_s, f"{key}|eig_s": f.eig_s})
            if f.lam is not None:
                out[f"{key}|lam"] = f.lam
        out.update({f"{key}|diag": d for key, d in self.diag.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], info: Mapping[str, Any] | None = None) -> "Factors":
        factors = cls(info=dict(info or {}))
        keys = {name.rsplit("|", 1)[0] for name in arrays}
        for key in keys:
            if f"{key}|diag" in arrays:
                factors.diag[key] = np.asarray(arrays[f"{key}|diag"], np.float64)
            else:
                factors.kron[key] = KroneckerFactors(
                    *(np.asarray(arrays[f"{key}|{n}"], np.float64) for n in ("q_a", "eig_a", "q_s", "eig_s")),
                    lam=np.asarray(arrays[f"{key}|lam"], np.float64) if f"{key}|lam" in arrays else None)
        return factors


def part_key(group: str, block: Block) -> str:
    return f"{group}/{block.tie or block.module}"


def kronecker_blocks(model: nn.Module, groups: Sequence[ParameterGroup]) -> dict[str, tuple[Block, nn.Module]]:
    """``{part key: (block, module)}`` of the blocks K-FAC covers: untied linear/conv1d/conv2d
    (conv2d with ``groups == 1``)."""
    modules = dict(model.named_modules())
    out = {}
    for group in groups:
        for block in group.blocks:
            module = modules[block.module]
            if block.tie or block.kind not in KRONECKER_KINDS:
                continue
            if block.kind == "conv2d" and (module.groups != 1 or module.padding_mode != "zeros"):
                continue
            out[part_key(group.name, block)] = (block, module)
    return out


def group_parts(groups: Sequence[ParameterGroup]) -> list[tuple[str, list[tuple[str, Block]]]]:
    """``[(group, [(part key, owning block)])]`` in the order the projectors lay features out."""
    return [(g.name, [(part_key(g.name, g.blocks[i]), g.blocks[i]) for i in part_owners(list(g.blocks))])
            for g in groups]


def input_rows(block: Block, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A block's input rows ``[rows, in']`` (bias column appended): tokens, or conv2d patches."""
    if block.kind == "conv2d":
        patches = F.unfold(x.float(), module.kernel_size, module.dilation, module.padding, module.stride)
        rows = patches.transpose(1, 2)  # [B', L, C·kh·kw]
    else:
        rows = _as_rows(x)
    rows = _with_bias_column(rows, block)
    return rows.reshape(-1, rows.shape[-1])


def output_rows(block: Block, grad: torch.Tensor) -> torch.Tensor:
    """A block's output-gradient rows ``[rows, out]`` in the order of :func:`input_rows`."""
    if block.kind == "conv2d":
        grad = grad.flatten(2).transpose(1, 2)
    return grad.reshape(-1, grad.shape[-1]).float()


class CovarianceAccumulator:
    """Hooks that accumulate ``Σ a aᵀ`` and ``Σ δ δᵀ`` (float64) for the K-FAC blocks of ``model``.

    Call :meth:`step` with a closure returning per-example losses ``[B]`` once per batch."""

    def __init__(self, model: nn.Module, groups: Sequence[ParameterGroup], device: torch.device):
        self.blocks = kronecker_blocks(model, groups)
        self.a_sums = {k: torch.zeros(b.right, b.right, dtype=torch.float64, device=device)
                       for k, (b, _) in self.blocks.items()}
        self.s_sums = {k: torch.zeros(b.left, b.left, dtype=torch.float64, device=device)
                       for k, (b, _) in self.blocks.items()}
        self.a_rows = dict.fromkeys(self.blocks, 0)
        self.examples = 0
        self._targets: list[tuple[str, torch.Tensor]] = []
        self._recording = False
        by_module: dict[str, list[str]] = {}
        for key, (block, _) in self.blocks.items():
            by_module.setdefault(block.module, []).append(key)
        self._handles = [self.blocks[keys[0]][1].register_forward_hook(self._hook(keys))
                         for keys in by_module.values()]

    def _hook(self, keys: list[str]):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._recording:
                return
            for key in keys:
                block = self.blocks[key][0]
                with torch.no_grad():
                    rows = input_rows(block, module, args[0]).double()
                    self.a_sums[key] += rows.T @ rows
                    self.a_rows[key] += rows.shape[0]
                if isinstance(output, torch.Tensor) and output.requires_grad:
                    self._targets.append((key, _gradient_target(output)))
        return hook

    def step(self, compute: Callable[[], torch.Tensor]) -> None:
        self._targets = []
        self._recording = True
        try:
            with torch.enable_grad():
                values = compute()
        finally:
            self._recording = False
        check_values(values)
        if self._targets:
            edges = [get_gradient_edge(t) for _, t in self._targets]
            grads = torch.autograd.grad(values.sum(), edges, allow_unused=True)
            for (key, target), grad in zip(self._targets, grads):
                if grad is not None:
                    rows = output_rows(self.blocks[key][0], grad.detach().reshape(target.shape)).double()
                    self.s_sums[key] += rows.T @ rows
        self._targets = []
        self.examples += values.shape[0]

    def eigenbases(self) -> dict[str, KroneckerFactors]:
        """``{part key: KroneckerFactors}`` from the averaged covariances (float64 ``eigh``)."""
        if not self.examples:
            raise ConfigError("K-FAC: no training examples were seen")
        out = {}
        for key in self.blocks:
            a = (self.a_sums[key] / max(self.a_rows[key], 1)).cpu().numpy()
            s = (self.s_sums[key] / self.examples).cpu().numpy()
            eig_a, q_a = np.linalg.eigh((a + a.T) / 2)
            eig_s, q_s = np.linalg.eigh((s + s.T) / 2)
            out[key] = KroneckerFactors(q_a, eig_a, q_s, eig_s)
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def check_values(values: Any) -> None:
    if not isinstance(values, torch.Tensor) or values.ndim != 1:
        raise TaskError("the task must return one scalar per example, shape [B]")
    if not torch.isfinite(values).all():
        raise TaskError("the task returned a non-finite loss (nan or inf)")


def full_gradient_projector(model: nn.Module, groups: Sequence[ParameterGroup],
                            device: torch.device) -> GradientProjector:
    """A projector with the identity projection: ``{group: [B, Σ numel]}`` full per-example gradients
    in the reference layout (:func:`~gradindex.features.gradients.reference_layout`)."""
    return GradientProjector(model, groups, ProjectionConfig(kind=ProjectionKind.IDENTITY), device)


def split_parts(full: Mapping[str, torch.Tensor],
                parts: list[tuple[str, list[tuple[str, Block]]]]) -> dict[str, torch.Tensor]:
    """``{part key: [B, numel]}`` slices of full per-group gradients."""
    out = {}
    for group, keyed in parts:
        offset = 0
        for key, block in keyed:
            out[key] = full[group][:, offset: offset + block.numel]
            offset += block.numel
    return out


class EigenvalueAccumulator:
    """The second pass: EK-FAC's ``Σ (Q_Sᵀ G Q_A)²`` for Kronecker blocks, ``Σ g²`` for the others."""

    def __init__(self, groups: Sequence[ParameterGroup], kron: Mapping[str, KroneckerFactors],
                 device: torch.device):
        self.parts = group_parts(groups)
        self.blocks = {key: block for _, keyed in self.parts for key, block in keyed}
        # rotations in float32 (the float32 gradients' own precision), sums in float64
        self.bases = {k: (torch.from_numpy(f.q_s).to(device, torch.float32),
                          torch.from_numpy(f.q_a).to(device, torch.float32)) for k, f in kron.items()}
        self.sums = {key: torch.zeros((b.left, b.right) if key in self.bases else (b.numel,), dtype=torch.float64,
                                      device=device) for key, b in self.blocks.items()}
        self.examples = 0

    def update(self, full: Mapping[str, torch.Tensor]) -> None:
        for key, grads in split_parts(full, self.parts).items():
            grads = grads.detach().float()
            if key in self.bases:
                q_s, q_a = self.bases[key]
                block = self.blocks[key]
                rotated = q_s.T @ grads.reshape(-1, block.left, block.right) @ q_a
                self.sums[key] += (rotated ** 2).sum(0, dtype=torch.float64)
            else:
                self.sums[key] += (grads ** 2).sum(0, dtype=torch.float64)
        self.examples += next(iter(full.values())).shape[0]

    def result(self, kron: Mapping[str, KroneckerFactors]) -> Factors:
        factors = Factors()
        for key, total in self.sums.items():
            mean = (total / max(self.examples, 1)).cpu().numpy()
            if key in kron:
                f = kron[key]
                factors.kron[key] = KroneckerFactors(f.q_a, f.eig_a, f.q_s, f.eig_s, lam=mean)
            else:
                factors.diag[key] = mean
        return factors


class FactorInverse:
    """``H⁻¹`` of one setting (``kfac`` or ``ekfac``, relative damping) on full per-part gradients."""

    def __init__(self, factors: Factors, groups: Sequence[ParameterGroup], kind: str, damping: Damping,
                 device: torch.device, dtype: torch.dtype = torch.float32):
        if kind not in FACTOR_PRECONDITIONERS:
            raise ConfigError(f"factor preconditioner: expected kfac or ekfac, got {kind!r}")
        if isinstance(damping, str):
            raise ConfigError(f"{kind}: --damping {damping} chooses a Gram damping from the stored features; give "
                              f"{kind} a number (relative to each module's mean eigenvalue; default 0.1)")
        self.parts = group_parts(groups)
        self.device = device
        self.dtype = dtype  # of the application (the factors are fitted and inverted in float64)
        self.kron: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.diag: dict[str, torch.Tensor] = {}
        self.lambdas: dict[str, float] = {}
        for group, keyed in self.parts:
            rho = group_damping(damping, group)
            for key, block in keyed:
                if key in factors.kron:
                    f = factors.kron[key]
                    values = f.eigenvalues(kind)
                    if values.shape != (block.left, block.right):
                        raise ConfigError(f"factors of {key} have shape {values.shape}, the block "
                                          f"{(block.left, block.right)}; fit the factors again")
                    lam = rho * float(values.mean())
                    self.kron[key] = tuple(torch.from_numpy(m).to(device, dtype)
                                           for m in (f.q_s, f.q_a, 1.0 / (values + _floor(lam))))
                elif key in factors.diag:
                    d = factors.diag[key]
                    lam = rho * float(d.mean())
                    self.diag[key] = torch.from_numpy(1.0 / (d + _floor(lam))).to(device, dtype)
                else:
                    raise ConfigError(f"the store's factors cover no block {key!r}; fit the factors again")
                self.lambdas[key] = lam

    def __call__(self, key: str, block: Block, grads: torch.Tensor) -> torch.Tensor:
        """``H⁻¹ g`` for full gradients ``[B, numel]`` of one part (``dtype`` inside, float32 out)."""
        grads = grads.detach().to(self.dtype)
        if key in self.kron:
            q_s, q_a, inv = self.kron[key]
            rotated = q_s.T @ grads.reshape(-1, block.left, block.right) @ q_a
            return (q_s @ (rotated * inv) @ q_a.T).reshape(grads.shape[0], -1).float()
        return (grads * self.diag[key]).float()


def _floor(lam: float) -> float:
    """Zero damping on a singular factor would divide by zero: keep a tiny positive floor."""
    return max(lam, 1e-30)
