"""A store's manifest summary: what ``gradindex info`` prints and ``GET /v1/info`` answers.

In: a :class:`~gradindex.store.FeatureStore` (opened without verifying shards).
Out: a JSON-ready dict — task, checkpoint, sizes, projection, per-group sizes and
weights per concept, learned-weight settings, index partitions. Imports neither
torch nor FAISS (``info`` starts fast).
"""

from __future__ import annotations

from typing import Any

from gradindex.groups import ParameterGroup
from gradindex.store import FeatureStore
from gradindex.weights import GroupWeights


def store_summary(store: FeatureStore) -> dict[str, Any]:
    """The manifest's essentials (keys below; every value plain JSON)."""
    manifest = store.manifest
    projection = manifest["config"]["projection"]
    concepts = sorted(set(manifest.get("weights", {})) | set(manifest.get("indexes", {})) | {"all"})
    weights = {c: GroupWeights.from_manifest(manifest, c, store.groups) for c in concepts}
    groups = []
    for group in manifest["groups"]:
        name = group["name"]
        row = {"group": name, "params": ParameterGroup.from_dict(group).numel, "dim": group["dim"],
               "weights": {c: weights[c].weights[name] for c in concepts}}
        shares = {c: w.info["shares"][name] for c, w in weights.items() if "shares" in w.info}
        if shares:
            row["shares"] = shares
        groups.append(row)
    learned = {}
    for concept, w in weights.items():
        if "config" in w.info:
            info = w.info
            learned[concept] = {"method": info["method"], "preconditioner": info["config"]["preconditioner"],
                                "damping": info["config"]["damping"], "num_queries": info["num_queries"],
                                "reference_size": info["reference_size"], "snr_uniform": info["snr_uniform"],
                                "snr_learned": info["snr_learned"]}
    indexes = {}
    for concept, entry in sorted(manifest.get("indexes", {}).items()):
        cfg = entry["config"]
        indexes[concept] = {"kind": entry.get("kind", cfg["kind"]), "preconditioner": cfg["preconditioner"],
                            "damping": cfg["damping"], "ntotal": entry["ntotal"], "parts": len(entry.get("parts", []))}
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
        "concepts": concepts,
        "groups": groups,
        "learned_weights": learned,
        "indexes": indexes,
    }
