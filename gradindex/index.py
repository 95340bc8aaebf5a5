"""FAISS index partitions: build, save, load, search (the only faiss importer).

In: a :class:`~gradindex.store.FeatureStore`, an :class:`~gradindex.config.IndexConfig`
and the concept's :class:`~gradindex.weights.GroupWeights`.
Out: ``STORE/indexes/<concept>.faiss`` (vectors ``v(x) = [√w_g φ_g(x)]`` with their
sample ids) and a ``manifest.indexes.<concept>`` entry recording the weights,
preconditioner and checksum the partition was built with.

:class:`GradIndex` answers ``search(vectors [n, D], k) -> TopK`` by maximum
inner product. With ``device="cuda"`` (or ``auto`` on a machine with a GPU build
of FAISS) the index is moved to the GPU; without one it stays on the CPU and says so.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gradindex.config import IndexConfig, IndexKind
from gradindex.errors import ArtifactNotFoundError, ConfigError, MissingDependencyError, StoreMismatchError
from gradindex.store import FeatureStore, sha256_file, temporary_path
from gradindex.weights import GroupWeights, scaled_vectors

logger = logging.getLogger(__name__)

INDEX_DIR = "indexes"


def import_faiss():
    """``faiss``, or a clear error saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError(
            "FAISS is not installed: pip install 'gradindex[cpu]' (faiss-cpu), or on a CUDA machine "
            "pip install 'gradindex[gpu]' (faiss-gpu-cu12)"
        ) from None
    return faiss


@dataclass(frozen=True)
class TopK:
    """Top-k results: ``scores [n, k]`` (descending) and ``sample_ids [n, k]`` (-1 = no result)."""

    scores: np.ndarray
    sample_ids: np.ndarray

    def __len__(self) -> int:
        return self.scores.shape[0]

    @property
    def k(self) -> int:
        return self.scores.shape[1]


def gpu_available() -> bool:
    faiss = import_faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda`` for FAISS; ``cuda`` without GPU FAISS falls back to ``cpu`` with a warning."""
    if device == "cpu":
        return "cpu"
    if gpu_available():
        return "cuda"
    if device == "cuda":
        logger.warning("--device cuda: this FAISS build has no usable GPU; searching on the CPU instead")
    return "cpu"


def index_path(store: FeatureStore, concept: str) -> Path:
    return store.path / INDEX_DIR / f"{concept}.faiss"


def build_index(
    store: FeatureStore,
    config: IndexConfig = IndexConfig(),
    weights: GroupWeights | None = None,
    show_progress: bool = True,
) -> "GradIndex":
    """Build the ``config.concept`` partition from the store and record it in the manifest."""
    faiss = import_faiss()
    groups = store.groups
    if weights is None:
        weights = GroupWeights.from_manifest(store.manifest, config.concept, groups)
    weights.check_setting(config.preconditioner, config.damping)
    if config.kind is not IndexKind.FLAT:
        raise ConfigError(f"index kind {config.kind.value!r} is not supported; use flat")
    inner = faiss.IndexFlatIP(store.dim)
    index = faiss.IndexIDMap2(inner)
    with tqdm(total=store.num_samples, desc=f"index {config.concept}", unit="ex", disable=not show_progress) as bar:
        for ids, feats, _ in store.iter_shards(groups):
            vectors = np.ascontiguousarray(scaled_vectors(feats, weights, groups), dtype=np.float32)
            index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
            bar.update(len(ids))
    path = index_path(store, config.concept)
    path.parent.mkdir(exist_ok=True)
    tmp = temporary_path(path)
    try:
        faiss.write_index(index, str(tmp))
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    entry = {
        "config": config.to_dict(),
        "file": str(path.relative_to(store.path)),
        "sha256": digest,
        "ntotal": int(index.ntotal),
        "dim": store.dim,
        "weights": weights.to_dict(),
    }
    store.update_manifest({"indexes": {**store.manifest.get("indexes", {}), config.concept: entry}})
    return GradIndex(index, entry, resolve_device(config.device))


class GradIndex:
    """One loaded index partition. ``GradIndex.open(store, concept).search(vectors, k)``."""

    def __init__(self, index: Any, entry: dict[str, Any], device: str = "cpu"):
        self.entry = entry
        self.config = IndexConfig.from_dict(entry["config"])
        self.device = device
        self.index = _to_gpu(index) if device == "cuda" else index

    @classmethod
    def open(cls, store: FeatureStore, concept: str = "all", device: str | None = None) -> "GradIndex":
        faiss = import_faiss()
        entry = store.manifest.get("indexes", {}).get(concept)
        if entry is None:
            built = sorted(store.manifest.get("indexes", {})) or ["none"]
            raise ArtifactNotFoundError(
                f"{store.path}: no index for concept {concept!r} (built: {', '.join(built)}); "
                f"run `gradindex build-index {store.path} --concept {concept}`"
            )
        path = store.path / entry["file"]
        if not path.is_file():
            raise ArtifactNotFoundError(f"{store.path}: index file {entry['file']} is missing; run build-index again")
        if store.verify and sha256_file(path) != entry["sha256"]:
            raise StoreMismatchError(f"{path}: checksum mismatch; the index was modified, run build-index again")
        index = faiss.read_index(str(path))
        return cls(index, entry, resolve_device(device or entry["config"]["device"]))

    @property
    def weights(self) -> GroupWeights:
        return GroupWeights(self.config.concept, self.entry["weights"]["weights"], self.entry["weights"]["info"])

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, vectors: np.ndarray, k: int) -> TopK:
        """Top-``k`` stored vectors by inner product for each row of ``vectors [n, D]``."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k: expected a positive integer, got {k!r}")
        vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if vectors.ndim != 2 or vectors.shape[1] != self.entry["dim"]:
            raise ConfigError(f"query vectors: expected shape [n, {self.entry['dim']}], got {vectors.shape}")
        k = min(int(k), self.ntotal)
        scores, ids = self.index.search(vectors, k)
        return TopK(scores, ids)


def _to_gpu(index: Any) -> Any:
    faiss = import_faiss()
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, index)
