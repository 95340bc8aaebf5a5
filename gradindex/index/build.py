"""Build and open a concept's index partition (kinds in :mod:`gradindex.index.kinds`, parts in
:mod:`gradindex.index.shards`).

In: a :class:`~gradindex.store.FeatureStore`, an :class:`~gradindex.config.IndexConfig`
and the concept's :class:`~gradindex.weights.GroupWeights`.
Out: ``STORE/indexes/<concept>/`` (one part per range of store shards, the trained
empty index, the balancing transform) and a ``manifest.indexes.<concept>`` entry
recording the kind, weights, preconditioner, transform, parts and checksums.

Streaming: training reads a seeded sample of ``train_size`` rows shard by shard;
adding reads one store shard at a time and adds it in batches of
``ADD_BATCH`` rows. Peak memory ≈ one store shard's features (stored dtype) +
2 × ADD_BATCH × D × 4 bytes + the index being filled (flat/ivf: 4·D bytes a
vector; ivfpq: ``pq_bytes`` + 8 a vector; hnsw: 4·(D+1) + graph) + the training
sample (train_size × D × 4). The whole float32 matrix is never in memory for
ivfpq; its float16 re-rank copy is written to disk as it goes.

:class:`GradIndex` (= :class:`~gradindex.index.shards.ShardedIndex`) answers
``search(vectors [n, D], k) -> TopK`` by maximum inner product over all parts.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gradindex.config import Balance, IndexConfig, IndexKind, SearchConfig, check_index_dim
from gradindex.errors import ConfigError
from gradindex.index.kinds import (
    PartBuilder, QueryTransform, banded_directions, gpu_available, half_to_float, import_faiss, resolve_build,
    resolve_device, resolve_kind,
    train_index, write_index,
)
from gradindex.index.shards import (
    INDEX_DIR, IndexPart, ShardedIndex, checked_file, concept_dir, list_parts, load_transform,
    open_part, part_name,
)
from gradindex.store import MANIFEST, FeatureStore, atomic_write_json, sha256_file, temporary_path, write_arrays
from gradindex.topk import TopK, merge_topk
from gradindex.weights import GroupWeights, scaled_vectors

__all__ = [
    "GradIndex", "IndexPart", "ShardedIndex", "TopK", "build_index", "gpu_available", "import_faiss",
    "list_parts", "merge_topk", "open_part", "resolve_device", "INDEX_DIR",
]

logger = logging.getLogger(__name__)

GradIndex = ShardedIndex
ADD_BATCH = 65_536
TRAINED_FILE = "trained.faiss"
TRANSFORM_FILE = "transform.npz"


def build_index(
    store: FeatureStore,
    config: IndexConfig = IndexConfig(),
    weights: GroupWeights | None = None,
    show_progress: bool = True,
    shards: Sequence[int] | None = None,
    update: bool = False,
    search: SearchConfig | None = None,
    train_only: bool = False,
) -> ShardedIndex:
    """Build the ``config.concept`` partition and record it in the manifest.

    Default: a fresh partition over every store shard (``config.shards_per_part`` shards a part).
    ``shards``: build only the part covering these store shards (training first if the
    partition has no trained state yet) — one machine per part. ``update``: add parts for the
    store shards no part covers yet (e.g. after ``featurize --append``), leaving the rest as they are.
    ``train_only``: a fresh partition with its trained state and no parts yet (then ``shards=`` per machine).
    """
    check_index_dim(store.dim, f"build-index {store.path}")
    groups = store.groups
    if weights is None:
        weights = GroupWeights.from_manifest(store.manifest, config.concept, groups)
    weights.check_setting(config.preconditioner, config.damping)
    num_shards = len(store.manifest["shards"])
    existing = store.manifest.get("indexes", {}).get(config.concept)
    reuse = (update or shards is not None) and existing is not None and "parts" in existing
    if reuse and _trained_fields(existing["config"]) != _trained_fields(config.to_dict()):
        if update:
            config = IndexConfig.from_dict(existing["config"])
        else:
            raise ConfigError(
                f"index {config.concept!r} was trained with another config; build it again without --shards first"
            )
    if reuse and existing["weights"] != weights.to_dict():
        raise ConfigError(f"index {config.concept!r} was built with other weights; rebuild it without --update/--shards")
    if shards is not None:
        shards = sorted({int(s) for s in shards})
        bad = [s for s in shards if not 0 <= s < num_shards]
        if bad or not shards:
            raise ConfigError(f"--shards {bad or shards}: the store has shards 0..{num_shards - 1}")
    folder = concept_dir(store, config.concept)
    if reuse and shards is not None:
        taken = {s: p["name"] for p in existing["parts"] for s in p["shards"] if s in shards}
        if taken:
            raise ConfigError(
                f"--shards: store shards {sorted(taken)} are already in parts {sorted(set(taken.values()))}; "
                "start a fresh partition with --train-only, then build each part"
            )
    if not reuse:
        _clear(folder)
        state = _train(store, config, weights, show_progress)
    else:
        state = _load_state(store, existing)
    if train_only:
        ranges = []
    elif shards is not None:
        ranges = [shards]
    else:
        covered = {s for p in (existing["parts"] if reuse else []) for s in p["shards"]}
        todo = [s for s in range(num_shards) if s not in covered]
        per = config.shards_per_part or max(1, len(todo))
        ranges = [todo[i:i + per] for i in range(0, len(todo), per)]
    for part_shards in ranges:
        _build_part(store, config, weights, state, part_shards, show_progress)
    _commit_entry(store, config, weights, state, search)
    return ShardedIndex.open(store, config.concept, device=config.device, search=search)


def _trained_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The config fields a part must share with its partition (layout and device may differ)."""
    return {k: v for k, v in config.items() if k not in ("shards_per_part", "device")}


# -- training ------------------------------------------------------------------------------------
def _clear(folder: Path) -> None:
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file():
                path.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def _vectors(feats, weights: GroupWeights, groups: Sequence[str], transform: QueryTransform | None) -> np.ndarray:
    feats = {g: half_to_float(b).numpy() if b.dtype == np.float16 else b for g, b in feats.items()}
    v = scaled_vectors(feats, weights, groups)
    return transform.stored(v) if transform is not None else v


def iter_vector_batches(store: FeatureStore, weights: GroupWeights, transform: QueryTransform | None,
                        shards: Sequence[int] | None = None, batch: int = ADD_BATCH,
                        ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(sample_ids [b], vectors [b, D] float32)`` of the given store shards, ``batch`` rows at a time."""
    groups = store.groups
    for ids, feats, _ in store.iter_shards(groups, shards=shards):
        for start in range(0, len(ids), batch):
            block = {g: feats[g][start:start + batch] for g in groups}
            yield ids[start:start + batch], _vectors(block, weights, groups, transform)


def _train(store: FeatureStore, config: IndexConfig, weights: GroupWeights, show_progress: bool) -> dict[str, Any]:
    n, dim = store.num_samples, store.dim
    kind = resolve_kind(config, n, dim)
    knobs = resolve_build(config, kind, n, dim)
    folder = concept_dir(store, config.concept)
    balance = config.balance is Balance.ON or (config.balance is Balance.AUTO and kind is not IndexKind.FLAT)
    transform, transform_info = None, {"kind": "none"}
    if balance:
        grams = store.read_gram()
        missing = [g for g in store.groups if g not in grams]
        if missing:
            raise ConfigError(f"--balance on: the store has no Gram matrix for groups {missing}; use --balance off")
        transform = QueryTransform.from_grams([grams[g] for g in store.groups], config.damping)
        path = folder / TRANSFORM_FILE
        digest = write_arrays(path, transform.arrays())
        transform_info = {"kind": "balance", "file": str(path.relative_to(store.path)), "sha256": digest,
                          "damping": config.damping}
    sample = np.zeros((0, dim), np.float32)
    if kind is not IndexKind.FLAT:
        rows = np.sort(np.random.default_rng(config.seed).choice(n, size=knobs["train_size"], replace=False))
        picked, offset = [], 0
        with tqdm(total=n, desc="training sample", unit="ex", disable=not show_progress) as bar:
            for ids, feats, _ in store.iter_shards(store.groups):
                lo, hi = np.searchsorted(rows, [offset, offset + len(ids)])
                block = {g: feats[g][rows[lo:hi] - offset] for g in store.groups}
                picked.append(_vectors(block, weights, store.groups, transform))
                offset += len(ids)
                bar.update(len(ids))
        sample = np.concatenate(picked) if picked else sample
    trained, extras = train_index(kind, sample, knobs, config)
    path = folder / TRAINED_FILE
    tmp = temporary_path(path)
    try:
        write_index(trained, tmp)
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"kind": kind, "knobs": knobs, "transform": transform, "transform_info": transform_info,
            "trained": trained, "extras": extras, "layout": extras.get("layout", {}),
            "trained_info": {"file": str(path.relative_to(store.path)), "sha256": digest}}


def _load_state(store: FeatureStore, entry: dict[str, Any]) -> dict[str, Any]:
    info = entry["trained"]
    trained = import_faiss().read_index(str(checked_file(store, info["file"], info["sha256"])))
    layout = entry.get("layout", {})
    extras: dict[str, Any] = {"layout": layout}
    if layout:
        extras["directions"] = banded_directions(trained, layout)
    return {"kind": IndexKind(entry["kind"]), "knobs": entry["knobs"], "transform": load_transform(store, entry),
            "transform_info": entry["transform"], "trained": trained, "extras": extras, "layout": layout,
            "trained_info": info}


# -- parts ----------------------------------------------------------------------------------------
def _build_part(store: FeatureStore, config: IndexConfig, weights: GroupWeights, state: dict[str, Any],
                shards: Sequence[int], show_progress: bool) -> IndexPart:
    kind = state["kind"]
    folder = concept_dir(store, config.concept)
    name = part_name(shards)
    rows = sum(store.manifest["shards"][s]["rows"] for s in shards)
    keep = config.keep_vectors if config.keep_vectors is not None else kind is IndexKind.IVFPQ
    builder = PartBuilder(kind, state["trained"], state["extras"])
    final = {suffix: folder / f"{name}{suffix}" for suffix in (".faiss", ".ids.npy", ".f16")}
    tmp = {suffix: temporary_path(path) for suffix, path in final.items()}
    ids_parts = []
    try:
        with open(tmp[".f16"], "wb") if keep else _null() as handle, \
                tqdm(total=rows, desc=f"index {config.concept} {name}", unit="ex", disable=not show_progress) as bar:
            for ids, vectors in iter_vector_batches(store, weights, state["transform"], shards):
                builder.add(vectors)
                ids_parts.append(ids.astype(np.int64))
                if handle is not None:
                    handle.write(vectors.astype(np.float16).tobytes())
                bar.update(len(ids))
        sample_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
        write_index(builder.index, tmp[".faiss"])
        with open(tmp[".ids.npy"], "wb") as handle:
            np.save(handle, sample_ids)
        digests = {s: sha256_file(p) for s, p in tmp.items() if p.exists()}
        for suffix, path in tmp.items():
            if path.exists():
                os.replace(path, final[suffix])
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    rel = lambda suffix: str(final[suffix].relative_to(store.path))  # noqa: E731
    part = IndexPart(
        name=name, file=rel(".faiss"), sha256=digests[".faiss"], ntotal=int(builder.rows), shards=tuple(shards),
        bytes=final[".faiss"].stat().st_size, vectors_file=rel(".f16") if keep else "",
        vectors_sha256=digests.get(".f16", "") if keep else "", ids_file=rel(".ids.npy"),
        ids_sha256=digests[".ids.npy"], trained_sha256=state["trained_info"]["sha256"], info=builder.info(),
    )
    if not keep:
        final[".f16"].unlink(missing_ok=True)
    atomic_write_json(folder / f"{name}.json", part.to_dict())
    return part


@contextmanager
def _null():
    yield None


@contextmanager
def _manifest_lock(store: FeatureStore):
    """An advisory lock serialising manifest updates by concurrent part builders."""
    path = store.path / INDEX_DIR / ".manifest.lock"
    path.parent.mkdir(exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _commit_entry(store: FeatureStore, config: IndexConfig, weights: GroupWeights, state: dict[str, Any],
                  search: SearchConfig | None) -> None:
    """Record every part sidecar of this training in the manifest (re-read under the lock)."""
    folder = concept_dir(store, config.concept)
    with _manifest_lock(store):
        manifest = json.loads((store.path / MANIFEST).read_text())
        parts = []
        for sidecar in sorted(folder.glob("part-*.json")):
            part = IndexPart.from_dict(json.loads(sidecar.read_text()))
            if part.trained_sha256 == state["trained_info"]["sha256"]:
                parts.append(part)
        parts.sort(key=lambda p: p.shards)
        seen: dict[int, str] = {}
        for part in parts:
            for s in part.shards:
                if s in seen:
                    raise ConfigError(f"index {config.concept!r}: store shard {s} is in parts {seen[s]} and {part.name}")
                seen[s] = part.name
        entry = {
            "config": config.to_dict(),
            "kind": state["kind"].value,
            "knobs": state["knobs"],
            "dim": store.dim,
            "weights": weights.to_dict(),
            "transform": state["transform_info"],
            "trained": state["trained_info"],
            "layout": state["layout"],
            "search": (search or SearchConfig()).to_dict(),
            "parts": [p.to_dict() for p in parts],
            "ntotal": int(sum(p.ntotal for p in parts)),
        }
        manifest["indexes"] = {**manifest.get("indexes", {}), config.concept: entry}
        atomic_write_json(store.path / MANIFEST, manifest)
        store.manifest = manifest
