"""Sharded index partitions: one FAISS part per range of store shards, searched together.

Layout of a concept's partition (all paths relative to the store; ``B`` is one build's
folder, ``indexes/<concept>/b-<random>``: a rebuild writes a new one, the manifest switches
to it in one rename, and only then is the old one removed)::

    indexes/<concept>/B/part-SSSSS-EEEEE.faiss  one part: the vectors of store shards S..E (inclusive)
    indexes/<concept>/B/part-SSSSS-EEEEE.json   its sidecar (an :class:`IndexPart` record)
    indexes/<concept>/B/part-SSSSS-EEEEE.f16    optional float16 vectors [ntotal, D] for exact re-ranking
    indexes/<concept>/B/trained.faiss           the trained, empty index every part starts from (IVF kinds)
    indexes/<concept>/B/transform.npz           the balancing transform (when one is applied)
    indexes/<concept>/B/cells.npz               per-direction statistics ordering a query's cells (IVF kinds)
    indexes/<concept>/B/.lock                   held (shared) by every process building into B

``manifest["indexes"][concept]`` lists the parts (``parts``: :class:`IndexPart`
dicts in store-shard order) with the folder, config, weights (and their digest),
transform and kind they were built with. Parts are built independently (``build_index(..., shards=...)``,
one machine each) and a new store shard gets its own part without touching the
others (``build_index(..., update=True)``).

API (stable; the Ray fan-out builds on it):

* :func:`list_parts` ``(store, concept) -> list[IndexPart]``
* :func:`open_part` ``(store, concept, part, device=None, search=None) -> PartIndex``;
  ``PartIndex.search(vectors [n, D], k) -> TopK`` over that part alone
* :func:`gradindex.index.topk.merge_topk` ``(parts: list[TopK], k) -> TopK``: exact, ties by sample id
* :class:`ShardedIndex` ``.open(store, concept, device=None, search=None)``: all parts,
  ``.search(vectors, k)`` = ``merge_topk([p.search(vectors, k) for p in parts], k)``

``vectors`` are always query vectors ``u(q)`` in the stored space ``v(x) = [√w_g φ_g(x)]``
(what :class:`~gradindex.query.attributor.Attributor` computes); a part applies its own
balancing transform to them.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.config import IndexConfig, SearchConfig, check_name, require_positive
from gradindex.errors import ArtifactNotFoundError, ConfigError, StoreMismatchError
from gradindex.index.kinds import PartIndex, QueryTransform, check_index_kind, read_index, resolve_device
from gradindex.index.probe import CellStats
from gradindex.store.feature_store import FeatureStore
from gradindex.index.topk import TopK, merge_topk
from gradindex.weights.group_weights import GroupWeights

INDEX_DIR = "indexes"


@dataclass(frozen=True)
class IndexPart:
    """One part of a concept's partition: the store shards it covers and its files."""

    name: str  # "part-SSSSS-EEEEE"
    file: str  # relative to the store
    sha256: str
    ntotal: int
    shards: tuple[int, ...]  # store shard numbers (positions in manifest["shards"])
    bytes: int
    vectors_file: str = ""  # float16 re-rank vectors [ntotal, D], relative to the store ("" = none)
    vectors_sha256: str = ""
    ids_file: str = ""  # sample ids [ntotal] int64 (.npy): FAISS ids are row numbers within the part
    ids_sha256: str = ""
    trained_sha256: str = ""  # the trained index the part was filled from
    info: dict[str, Any] | None = None  # kind-specific (e.g. per-band max norms and counts)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shards"] = list(self.shards)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IndexPart":
        return cls(**{**data, "shards": tuple(int(s) for s in data["shards"])})


def concept_dir(store: FeatureStore, concept: str) -> str:
    """``indexes/<concept>`` (relative to the store): a safe name (never ``..``), and no symlink may
    lead it out of the store."""
    check_name(concept, "concept")
    return store.storage.real_folder(f"{INDEX_DIR}/{concept}", "index folder")


def entry_folder(store: FeatureStore, concept: str, entry: dict[str, Any]) -> str:
    """The build folder an index entry's files live in, relative to the store (``indexes/<concept>``
    itself for version-1 stores)."""
    top = concept_dir(store, concept)
    if "folder" not in entry:
        return top
    real = store.file(entry["folder"], "index folder")
    if store.file(top, "index folder") not in (real, real.parent):
        raise StoreMismatchError(f"{store.path}: index {concept!r} names folder {entry['folder']!r} outside "
                                 f"{store.path}/{top}")
    return entry["folder"]


def part_name(shards: Sequence[int]) -> str:
    return f"part-{min(shards):05d}-{max(shards):05d}"


def index_entry(store: FeatureStore, concept: str) -> dict[str, Any]:
    """``manifest["indexes"][concept]``, or a clear error naming the built concepts."""
    entry = store.manifest.get("indexes", {}).get(concept)
    if entry is None:
        built = sorted(store.manifest.get("indexes", {})) or ["none"]
        raise ArtifactNotFoundError(
            f"{store.path}: no index for concept {concept!r} (built: {', '.join(built)}); "
            f"run `gradindex build-index {store.path} --concept {concept}`"
        )
    if "parts" not in entry:
        raise StoreMismatchError(f"{store.path}: index {concept!r} has an old single-file layout; run build-index again")
    return entry


def list_parts(store: FeatureStore, concept: str = "all") -> list[IndexPart]:
    """The parts of ``concept``'s partition, in store-shard order."""
    return [IndexPart.from_dict(p) for p in index_entry(store, concept)["parts"]]


def checked_file(store: FeatureStore, relative: str, digest: str) -> Path:
    """A local file with the content of ``relative`` (refused outside the store; on object storage a
    copy in the cache), verified against its sha256 when the store verifies."""
    return store.fetch(relative, digest, "index file",
                       missing=f"{store.path}: index file {relative} is missing; run build-index again",
                       mismatch=f"{store.path}/{relative}: checksum mismatch; the index was modified, run build-index "
                                "again")


def load_transform(store: FeatureStore, entry: dict[str, Any]) -> QueryTransform | None:
    info = entry.get("transform") or {}
    if info.get("kind", "none") == "none":
        return None
    path = checked_file(store, info["file"], info["sha256"])
    try:
        transform = QueryTransform.load(path, info)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise StoreMismatchError(f"{path}: not a readable balancing transform ({err}); run build-index again") from None
    if sum(transform.dims) != entry["dim"] or any(m.shape != (d, d) for d, m in zip(transform.dims, transform.forward)):
        raise StoreMismatchError(f"{path}: the balancing transform does not fit dimension {entry['dim']}")
    return transform


def open_part(
    store: FeatureStore,
    concept: str,
    part: IndexPart | int | str,
    device: str | None = None,
    search: SearchConfig | None = None,
) -> PartIndex:
    """One part opened for search (``part``: an :class:`IndexPart`, its position or its name)."""
    entry = index_entry(store, concept)
    parts = [IndexPart.from_dict(p) for p in entry["parts"]]
    if isinstance(part, (int, np.integer)) and not isinstance(part, bool):
        if not 0 <= part < len(parts):
            raise ConfigError(f"index {concept!r}: part {part} out of range (it has {len(parts)} parts)")
        part = parts[int(part)]
    elif isinstance(part, str):
        named = [p for p in parts if p.name == part]
        if not named:
            raise ConfigError(f"index {concept!r}: no part named {part!r} ({', '.join(p.name for p in parts)})")
        part = named[0]
    config = IndexConfig.from_dict(entry["config"])
    index = read_index(checked_file(store, part.file, part.sha256))
    check_index_kind(index, entry["kind"], entry["dim"], part.ntotal, part.file)
    vectors = None
    if part.vectors_file:
        path = checked_file(store, part.vectors_file, part.vectors_sha256)
        if path.stat().st_size != part.ntotal * entry["dim"] * 2:
            raise StoreMismatchError(f"{path}: expected {part.ntotal} float16 vectors of dimension {entry['dim']}")
        vectors = np.memmap(path, dtype=np.float16, mode="r", shape=(part.ntotal, entry["dim"]))
    ids_path = checked_file(store, part.ids_file, part.ids_sha256)
    try:  # memory-mapped like the float16 copy: a query reads only its k results' ids
        sample_ids = np.load(ids_path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        raise StoreMismatchError(f"{ids_path}: not a readable .npy of sample ids ({err}); run build-index again") \
            from None
    if sample_ids.shape != (part.ntotal,) or not np.issubdtype(sample_ids.dtype, np.integer):
        raise StoreMismatchError(f"{ids_path}: expected {part.ntotal} integer sample ids, got {sample_ids.shape} "
                                 f"of {sample_ids.dtype}; run build-index again")
    if part.ntotal and int(sample_ids.min()) < 0:  # -1 marks an empty result slot: a hit would vanish
        raise StoreMismatchError(f"{ids_path}: holds negative sample ids; run build-index again")
    layout = entry.get("layout") or {}
    directions = None
    if layout:
        from gradindex.index.kinds import banded_directions

        try:
            directions = banded_directions(index, layout)
        except RuntimeError as err:
            raise StoreMismatchError(f"{part.file}: does not fit the band layout of the manifest ({err})") from None
    cells = None
    if entry.get("cells"):
        cells_path = checked_file(store, entry["cells"]["file"], entry["cells"]["sha256"])
        try:
            cells = CellStats.load(cells_path)
        except (OSError, ValueError, KeyError, EOFError) as err:
            raise StoreMismatchError(f"{cells_path}: not readable cell statistics ({err}); run build-index again") \
                from None
    return PartIndex(
        index, entry["kind"], entry["dim"], part.info or {}, load_transform(store, entry), vectors,
        effective_search(entry, search),
        resolve_device(device or config.device), name=part.name, sample_ids=sample_ids, layout=layout,
        directions=directions, cells=cells,
    )


def effective_search(entry: dict[str, Any], search: SearchConfig | None = None) -> SearchConfig:
    """The partition's default knobs (``entry["search"]``: given at build time or calibrated)
    with the non-zero knobs of ``search`` (and its switches ``prune``, ``adaptive``, ``certified``) in their place."""
    base = SearchConfig.from_dict(entry.get("search", {}))
    if search is None:
        return base
    switches = ("prune", "adaptive", "certified")
    given = {name: value for name, value in search.to_dict().items() if value and name not in switches}
    return SearchConfig.from_dict({**base.to_dict(), **given, **{name: getattr(search, name) for name in switches}})


class ShardedIndex:
    """A concept's whole partition: every part searched, top-k merged exactly (``GradIndex``)."""

    def __init__(self, entry: dict[str, Any], parts: list[PartIndex], store: FeatureStore | None = None):
        self.entry = entry
        self.config = IndexConfig.from_dict(entry["config"])
        self.parts = parts
        self.store = store

    @classmethod
    def open(cls, store: FeatureStore, concept: str = "all", device: str | None = None,
             search: SearchConfig | None = None, retry: bool = True) -> "ShardedIndex":
        """Every part of ``concept``'s partition. A file gone missing (a rebuild replaced the partition
        since ``store`` was opened) makes it reread the manifest once and open the new partition."""
        entry = index_entry(store, concept)
        try:
            parts = [open_part(store, concept, i, device, search) for i in range(len(entry["parts"]))]
        except ArtifactNotFoundError:
            if not retry:
                raise
            return cls.open(store.refresh(), concept, device, search, retry=False)
        return cls(entry, parts, store)

    @property
    def kind(self) -> str:
        return self.entry["kind"]

    @property
    def device(self) -> str:
        return self.parts[0].device if self.parts else "cpu"

    @property
    def weights(self) -> GroupWeights:
        built = self.entry["weights"]
        return GroupWeights(self.config.concept, built["weights"], built.get("info", {}))

    @property
    def ntotal(self) -> int:
        return sum(p.ntotal for p in self.parts)

    def with_search(self, search: SearchConfig) -> "ShardedIndex":
        """The same loaded parts with other query-time knobs."""
        return ShardedIndex(self.entry, [p.with_search(search) for p in self.parts], self.store)

    def search(self, vectors: np.ndarray, k: int) -> TopK:
        """Top-``k`` stored vectors by inner product for each row of ``vectors [n, D]`` (all parts merged)."""
        require_positive(k, "k", numpy_ok=True)
        vectors = check_queries(vectors, self.entry["dim"])
        k = min(int(k), self.ntotal)
        if k == 0 or not self.parts:
            return TopK(np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64))
        return merge_topk([p.search(vectors, k) for p in self.parts], k)


def check_queries(vectors: np.ndarray, dim: int) -> np.ndarray:
    vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ConfigError(f"query vectors: expected shape [n, {dim}], got {vectors.shape}")
    return vectors
