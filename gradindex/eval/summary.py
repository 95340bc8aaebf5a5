"""A store's manifest summary: what ``gradindex info`` prints and ``GET /v1/info`` answers.

In: a :class:`~gradindex.store.feature_store.FeatureStore` (opened without verifying shards).
Out: a JSON-ready dict — task, checkpoint, sizes, projection, per-group sizes and
weights per concept (and learned setting), learned-weight settings with their digests,
index partitions with the weights they were built with and the store's current ones.
Imports neither torch nor FAISS (``info`` starts fast).
"""

from __future__ import annotations

from typing import Any

from gradindex.config import UNIFORM_CONCEPT, setting_key
from gradindex.features.groups import ParameterGroup
from gradindex.store.feature_store import FeatureStore
from gradindex.weights.group_weights import GroupWeights, learned_weights


def weight_panels(manifest: dict[str, Any], groups: list[str], concepts=()) -> list[tuple[str, GroupWeights]]:
    """``(label, weights)`` per concept (default: every one with weights or an index, and 'all') and
    learned setting: uniform weights for a concept without any; the label is the concept, with the
    setting appended when the concept has weights for more than one (``all identity``)."""
    panels = []
    every = sorted(set(manifest.get("weights", {})) | set(manifest.get("indexes", {})) | {"all"})
    for concept in concepts or every:
        learned = learned_weights(manifest, concept, groups)
        if not learned:
            panels.append((concept, GroupWeights.uniform(concept, groups)))
        for key, weights in learned.items():
            panels.append((concept if len(learned) == 1 else f"{concept} {key}", weights))
    return panels


def store_summary(store: FeatureStore) -> dict[str, Any]:
    """The manifest's essentials (keys below; every value plain JSON)."""
    manifest = store.manifest
    projection = manifest["config"]["projection"]
    panels = weight_panels(manifest, store.groups)
    groups = []
    for group in manifest["groups"]:
        name = group["name"]
        row = {"group": name, "params": ParameterGroup.from_dict(group).numel, "dim": group["dim"],
               "weights": {label: w.weights[name] for label, w in panels}}
        shares = {label: w.info["shares"][name] for label, w in panels if name in w.info.get("shares", {})}
        if shares:
            row["shares"] = shares
        groups.append(row)
    learned: dict[str, dict[str, Any]] = {}
    for concept in sorted(manifest.get("weights", {})):
        for key, w in learned_weights(manifest, concept, store.groups).items():
            keep = ("num_queries", "reference_size", "snr_uniform", "snr_learned", "damping_requested")
            setting = {k: v for k, v in (w.info.get("config") or {}).items() if k in ("preconditioner", "damping")}
            learned.setdefault(concept, {})[key] = {"method": w.info.get("method", "given"), "digest": w.digest(),
                                                    **setting, **{k: w.info[k] for k in keep if k in w.info},
                                                    **({"objective": learned_objective(w.info)}
                                                       if "config" in w.info else {})}
    for label, damping in group_dampings(manifest, store.groups).items():
        for row in groups:
            row.setdefault("damping", {})[label] = damping.get(row["group"])  # None: a crafted manifest lacks it
    indexes = {}
    for concept, entry in sorted(manifest.get("indexes", {}).items()):
        cfg = entry["config"]
        built = GroupWeights(concept, entry["weights"]["weights"], entry["weights"].get("info", {}))
        requested = entry.get("damping_requested", cfg["damping"])  # "auto" for a label-free damping
        current = GroupWeights.from_manifest(manifest, concept, store.groups, cfg["preconditioner"], requested)
        indexes[concept] = {
            "kind": entry["kind"], "preconditioner": cfg["preconditioner"], "damping": cfg["damping"],
            "setting": setting_key(cfg["preconditioner"], requested), "ntotal": entry["ntotal"],
            "parts": len(entry["parts"]), "weights": built.describe(), "current_weights": current.describe(),
            "stale": concept != UNIFORM_CONCEPT and current.weights != built.weights,
        }
    return {
        "store": str(store.path),
        "task": manifest["task"]["task"],
        "task_options": manifest["task"].get("options") or {},
        "checkpoint": manifest.get("checkpoint"),
        "model_fingerprint": manifest["model_fingerprint"],
        "num_samples": store.num_samples,
        "shards": len(manifest["shards"]),
        "dtype": manifest["dtype"],
        "projection": {"kind": projection["kind"], "proj_dim": projection["proj_dim"], "seed": projection["seed"]},
        "dim": store.dim,
        "concepts": [label for label, _ in panels],
        "groups": groups,
        "learned_weights": learned,
        "indexes": indexes,
    }


def learned_objective(info: dict[str, Any]) -> dict[str, Any]:
    """The objective learned weights were fitted with and its value for uniform and learned weights:
    ``{"name": "mean SNR" | "ssl" | "agreement", "uniform": float, "learned": float}``."""
    key = {"ssl": "ssl", "agreement": "agreement"}.get(info.get("method"), "snr")
    name = {"ssl": "ssl", "agreement": "agreement", "snr": "mean SNR"}[key]
    return {"name": name, "uniform": info.get(f"{key}_uniform", float("nan")),
            "learned": info.get(f"{key}_learned", float("nan"))}


def group_dampings(manifest: dict[str, Any], groups: list[str]) -> dict[str, dict[str, float]]:
    """``{label: {group: relative damping}}`` where the Gram damping is per group (``--damping auto``):
    each index's (label: its concept) and each learned setting's (label ``<concept> <setting>``)."""
    out = {}
    for concept, entry in sorted(manifest.get("indexes", {}).items()):
        cfg = entry.get("config", {})
        if isinstance(cfg.get("damping"), dict) and cfg.get("preconditioner") == "gram":
            out[concept] = cfg["damping"]
    for concept in sorted(manifest.get("weights", {})):
        for key, w in learned_weights(manifest, concept, groups).items():
            cfg = w.info.get("config") or {}
            if isinstance(cfg.get("damping"), dict) and cfg.get("preconditioner") == "gram":
                out[f"{concept} {key}"] = cfg["damping"]
    return out
