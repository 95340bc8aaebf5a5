"""Per-group, per-concept importance weights and the √w block scaling (DESIGN §1.3, §1.5).

In: ``{group: [n, k_g]}`` feature blocks and a :class:`GroupWeights`.
Out: ``[n, Σ k_g]`` vectors ``[√w_1 φ_1; …; √w_G φ_G]`` whose plain dot product is
the weighted score ``Σ_g w_g s_g``.

Weights live in the store's manifest under ``weights.<concept>.<setting>``, one entry per
attribution setting they were learned for (``gram@0.1``, ``identity``: see
:func:`gradindex.config.setting_key`); a concept with no learned weights for a setting uses
uniform weights (``w_g = 1``: the unweighted baselines) there. The reserved concept
``uniform`` always has uniform weights. Learning them is :mod:`gradindex.weights.learn`;
:func:`reset_weights` forgets a concept's learned weights.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradindex.config import DEFAULT_DAMPING, UNIFORM_CONCEPT, Preconditioner, setting_key
from gradindex.errors import ConfigError
from gradindex.store.feature_store import FeatureStore


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
    def from_manifest(cls, manifest: Mapping[str, Any], concept: str, groups: Sequence[str],
                      preconditioner: Preconditioner | str = Preconditioner.GRAM,
                      damping: float | str = DEFAULT_DAMPING) -> "GroupWeights":
        """The concept's weights learned for this setting (``damping`` as requested: a number or
        ``"auto"``), or uniform weights when none were."""
        return learned_weights(manifest, concept, groups).get(setting_key(preconditioner, damping)) \
            or cls.uniform(concept, groups)

    def digest(self) -> str:
        """A short fingerprint of the weight values (16 hex digits)."""
        text = json.dumps({g: float(w) for g, w in sorted(self.weights.items())})
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """``<digest> (<method>)``: how ``info`` and warnings name a set of weights."""
        return f"{self.digest()} ({self.info.get('method', 'given')})"

    def provenance(self, digest: bool = False) -> str:
        """How they were made, for plots and pages: ``method[, digest D][, preconditioner][, mean SNR a → b]``."""
        info = self.info
        parts = [str(info.get("method", "uniform")), *([f"digest {self.digest()}"] if digest else [])]
        if "preconditioner" in info.get("config", {}):
            parts.append(str(info["config"]["preconditioner"]))
        if "snr_learned" in info and "snr_uniform" in info:
            parts.append(f"mean SNR {info['snr_uniform']:.2f} → {info['snr_learned']:.2f}")
        return ", ".join(parts)

    def fit_overlap(self, digests: Sequence[str]) -> int:
        """How many of the queries with these per-query ``digests`` (:func:`~gradindex.task.query_digests`)
        the weights were fitted on (``info["queries"]["digests"]``; 0 when not recorded, e.g. uniform)."""
        fitted = set(self.info.get("queries", {}).get("digests", ()))
        return sum(digest in fitted for digest in digests)

    def scales(self, groups: Sequence[str]) -> dict[str, float]:
        return {g: float(np.sqrt(self.weights[g])) for g in groups}

    def check_setting(self, preconditioner: Preconditioner, damping: "float | Mapping[str, float]") -> None:
        """Learned weights fit one attribution setting (``damping``: resolved, one number or per group);
        refuse them for another."""
        learned = self.info.get("config")
        if not learned:
            return
        wanted: dict[str, Any] = {"preconditioner": preconditioner.value}
        if preconditioner is Preconditioner.GRAM:
            wanted["damping"] = dict(damping) if isinstance(damping, Mapping) else float(damping)
        differ = {k: learned.get(k) for k in wanted if learned.get(k) != wanted[k]}
        if differ:
            raise ConfigError(
                f"the weights of concept {self.concept!r} were learned for "
                + ", ".join(f"{k} {v}" for k, v in differ.items())
                + ", not " + ", ".join(f"{k} {wanted[k]}" for k in differ)
                + "; use that setting or learn the weights again with it"
            )


def learned_weights(manifest: Mapping[str, Any], concept: str, groups: Sequence[str]) -> dict[str, GroupWeights]:
    """``{setting key: weights}`` learned for ``concept`` (none for the reserved concept ``uniform``)."""
    if concept == UNIFORM_CONCEPT:
        return {}
    out = {}
    for key, entry in manifest.get("weights", {}).get(concept, {}).items():
        weights = GroupWeights(concept, {g: float(w) for g, w in entry["weights"].items()}, entry.get("info", {}))
        missing = set(groups) - set(weights.weights)
        if missing:
            raise ConfigError(f"weights for concept {concept!r} miss groups {sorted(missing)}; learn them again")
        out[key] = weights
    return out


def save_weights(store: FeatureStore, weights: GroupWeights) -> None:
    """Record ``weights`` under ``manifest["weights"][concept][setting]``, the setting (preconditioner,
    damping) taken from ``weights.info["config"]`` (an existing index keeps its own copy)."""
    if weights.concept == UNIFORM_CONCEPT:
        raise ConfigError(f"concept {UNIFORM_CONCEPT!r} is reserved for uniform weights; learn weights for 'all' "
                          "(or one of the task's concepts) instead")
    missing = set(store.groups) - set(weights.weights)
    if missing:
        raise ConfigError(f"weights for concept {weights.concept!r} miss groups {sorted(missing)}")
    setting = weights.info.get("config") or {}
    # weights learned under ``--damping auto`` are kept under ``gram@auto`` (the resolved per-group dampings
    # are in their config; an index built with ``--damping auto`` resolves to the same from the manifest cache)
    damping = weights.info.get("damping_requested", setting.get("damping", DEFAULT_DAMPING))
    key = setting_key(setting.get("preconditioner", Preconditioner.GRAM), damping)

    def change(manifest: dict[str, Any]) -> dict[str, Any]:
        every = manifest.get("weights", {})
        return {**manifest, "weights": {**every, weights.concept: {**every.get(weights.concept, {}),
                                                                   key: weights.to_dict()}}}

    store.update_manifest(change)


def reset_weights(store: FeatureStore, concept: str) -> list[str]:
    """Forget every setting's learned weights of ``concept`` (it is uniform again); the settings removed."""
    removed: list[str] = []

    def change(manifest: dict[str, Any]) -> dict[str, Any]:
        every = dict(manifest.get("weights", {}))
        removed[:] = sorted(every.pop(concept, {}))
        return {**manifest, "weights": every}

    store.update_manifest(change)
    return removed


def scaled_vectors(features: Mapping[str, Any], weights: GroupWeights, groups: Sequence[str]) -> Any:
    """Concatenate ``√w_g · block_g`` in ``groups`` order; numpy in → float32 numpy out, torch → torch."""
    scales = weights.scales(groups)
    blocks = [features[g] for g in groups]
    torch = sys.modules.get("torch")  # a tensor means torch is loaded; `info` never loads it
    if torch is not None and isinstance(blocks[0], torch.Tensor):
        return torch.cat([b.float() * scales[g] for g, b in zip(groups, blocks)], dim=1)
    return np.concatenate([np.asarray(b, dtype=np.float32) * np.float32(scales[g]) for g, b in zip(groups, blocks)], axis=1)


def stored_vector_blocks(store: FeatureStore, weights: GroupWeights) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(sample_ids [b], v(x) = [√w_g φ_g(x)] [b, D])`` of the store, shard by shard (exact-search input)."""
    for ids, feats, _ in store.iter_shards(store.groups):
        yield np.array(ids), scaled_vectors(feats, weights, store.groups)
