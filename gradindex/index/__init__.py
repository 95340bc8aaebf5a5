"""The index stage (DESIGN §1.5): √w-scaled vectors in FAISS, one partition per concept.

In: a :class:`~gradindex.store.feature_store.FeatureStore` and its concept weights. Out: ``STORE/indexes/<concept>/``
and :class:`GradIndex` answering ``search(vectors [n, D], k) -> TopK``.

Modules, in the order the data flows:

* :mod:`~gradindex.index.faiss_lib` — FAISS imported with an install hint; GPU detection.
* :mod:`~gradindex.index.topk` — :class:`TopK`, the exact merge of parts, and the exact reference search.
* :mod:`~gradindex.index.probe` — which cells of a norm-banded IVF to scan (a lossless per-band bound).
* :mod:`~gradindex.index.kinds` — FAISS index kinds for one part (flat, norm-banded ivf / ivfpq, hnsw),
  the balancing transform, GPU placement.
* :mod:`~gradindex.index.certify` — per-cell score bounds; certified and adaptive scans with per-query evidence.
* :mod:`~gradindex.index.shards` — a partition as parts per range of store shards; open and search them.
* :mod:`~gradindex.index.calibrate` — search knobs tuned to a target recall on calibration query families.
* :mod:`~gradindex.index.build` — :func:`build_index`: train, fill and register a partition in the manifest.
* :mod:`~gradindex.index.shared` — one index of φ serving every concept (weights on the query side).
* :mod:`~gradindex.index.ray_search` — the same parts held warm by Ray actors (imported lazily; ``gradindex[ray]``).
"""

from gradindex.index.build import (
    INDEX_DIR, GradIndex, IndexPart, ShardedIndex, TopK, build_index, gpu_available, import_faiss, list_parts,
    merge_topk, open_part, resolve_device,
)

__all__ = [
    "GradIndex", "IndexPart", "ShardedIndex", "TopK", "build_index", "gpu_available", "import_faiss",
    "list_parts", "merge_topk", "open_part", "resolve_device", "INDEX_DIR",
]
