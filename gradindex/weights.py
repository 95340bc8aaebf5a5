"""Per-group, per-concept importance weights and the √w block scaling (DESIGN §1.3, §1.5).

In: ``{group: [n, k_g]}`` feature blocks and a :class:`GroupWeights`.
Out: ``[n, Σ k_g]`` vectors ``[√w_1 φ_1; …; √w_G φ_G]`` whose plain dot product is
the weighted score ``Σ_g w_g s_g``.

Weights live in the store's manifest under ``weights.<concept>``; a concept with
no learned weights uses uniform weights (``w_g = 1``: the unweighted baselines).
Learning them is :mod:`gradindex.learn`; learned weights record the
preconditioner and damping they were fit for, and an index with another
setting refuses them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradindex.config import Preconditioner
from gradindex.errors import ConfigError
from gradindex.store import FeatureStore


@dataclass(frozen=True)
class GroupWeights:
    """Non-negative weights ``w_g`` for one concept; ``info`` says how they were obtained."""

    concept: str
    weights: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {g: w for g, w in self.weights.items() if not (np.isfinite(w) and w >= 0)}
        if bad:
            raise ConfigError(f"GroupWeights({self.concept!r}): weights must be finite and >= 0, got {bad}")

    @classmethod
    def uniform(cls, concept: str, groups: Sequence[str]) -> "GroupWeights":
        return cls(concept, {g: 1.0 for g in groups}, {"method": "uniform"})

    def to_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "info": dict(self.info)}

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], concept: str, groups: Sequence[str]) -> "GroupWeights":
        """The concept's stored weights, or uniform weights when none were learned."""
        entry = manifest.get("weights", {}).get(concept)
        if entry is None:
            return cls.uniform(concept, groups)
        weights = cls(concept, {g: float(w) for g, w in entry["weights"].items()}, entry.get("info", {}))
        missing = set(groups) - set(weights.weights)
        if missing:
            raise ConfigError(f"weights for concept {concept!r} miss groups {sorted(missing)}; learn them again")
        return weights

    def scales(self, groups: Sequence[str]) -> dict[str, float]:
        return {g: float(np.sqrt(self.weights[g])) for g in groups}

    def check_setting(self, preconditioner: Preconditioner, damping: float) -> None:
        """Learned weights fit one attribution setting; refuse them for another."""
        learned = self.info.get("config")
        if not learned:
            return
        wanted = {"preconditioner": preconditioner.value}
        if preconditioner is Preconditioner.GRAM:
            wanted["damping"] = float(damping)
        differ = {k: learned.get(k) for k in wanted if learned.get(k) != wanted[k]}
        if differ:
            raise ConfigError(
                f"the weights of concept {self.concept!r} were learned for "
                + ", ".join(f"{k} {v}" for k, v in differ.items())
                + ", not " + ", ".join(f"{k} {wanted[k]}" for k in differ)
                + "; use that setting or learn the weights again with it"
            )


def save_weights(store: FeatureStore, weights: GroupWeights) -> None:
    """Record ``weights`` under ``manifest["weights"][concept]`` (an existing index keeps its own copy)."""
    missing = set(store.groups) - set(weights.weights)
    if missing:
        raise ConfigError(f"weights for concept {weights.concept!r} miss groups {sorted(missing)}")
    store.update_manifest({"weights": {**store.manifest.get("weights", {}), weights.concept: weights.to_dict()}})


def scaled_vectors(features: Mapping[str, Any], weights: GroupWeights, groups: Sequence[str]) -> Any:
    """Concatenate ``√w_g · block_g`` in ``groups`` order; numpy in → float32 numpy out, torch → torch."""
    scales = weights.scales(groups)
    blocks = [features[g] for g in groups]
    torch = sys.modules.get("torch")  # a tensor means torch is loaded; `info` never loads it
    if torch is not None and isinstance(blocks[0], torch.Tensor):
        return torch.cat([b.float() * scales[g] for g, b in zip(groups, blocks)], dim=1)
    return np.concatenate([np.asarray(b, dtype=np.float32) * np.float32(scales[g]) for g, b in zip(groups, blocks)], axis=1)
