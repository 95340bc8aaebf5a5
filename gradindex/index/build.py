"""Build and open a concept's index partition (kinds in :mod:`gradindex.index.kinds`, parts in
:mod:`gradindex.index.shards`).

In: a :class:`~gradindex.store.feature_store.FeatureStore`, an :class:`~gradindex.config.IndexConfig`
and the concept's :class:`~gradindex.weights.group_weights.GroupWeights`.
Out: ``STORE/indexes/<concept>/b-<random>/`` (one part per range of store shards, the trained
empty index, the balancing transform) and a ``manifest.indexes.<concept>`` entry
recording the folder, kind, weights (and their digest), preconditioner, damping, transform,
parts and checksums.

Atomic rebuilds: a fresh partition is built in a new folder while the old one keeps
answering queries; the manifest switches to it in one rename (through
:func:`~gradindex.store.feature_store.modify_manifest`, which rereads the manifest under the store lock),
and only then are folders no entry names removed — never one another process is still
building into (each builder holds a shared ``flock`` on its folder's ``.lock``). A build
killed or failing at any point leaves the old partition listed and whole.

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

import dataclasses
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gradindex.config import Balance, IndexConfig, IndexKind, SearchConfig, check_index_dim, setting_key
from gradindex.weights.damping import resolve_damping
from gradindex.errors import ConfigError, GradIndexError, StoreMismatchError
from gradindex.index.kinds import (
    PartBuilder, QueryTransform, banded_directions, check_index_kind, gpu_available, half_to_float, import_faiss,
    read_index, resolve_build,
    resolve_device, resolve_kind,
    train_index, write_index,
)
from gradindex.index.shards import (
    INDEX_DIR, IndexPart, ShardedIndex, checked_file, concept_dir, entry_folder, list_parts, load_transform,
    open_part, part_name,
)
from gradindex.features.precondition import group_damping
from gradindex.store.feature_store import (
    FeatureStore, json_bytes, modify_manifest, npz_bytes, read_manifest, sha256_file, store_lock,
)
from gradindex.index.topk import TopK, merge_topk
from gradindex.weights.group_weights import GroupWeights, learned_weights, scaled_vectors

__all__ = [
    "GradIndex", "IndexPart", "ShardedIndex", "TopK", "build_index", "gpu_available", "import_faiss",
    "list_parts", "merge_topk", "open_part", "resolve_device", "INDEX_DIR",
]

logger = logging.getLogger(__name__)

GradIndex = ShardedIndex
ADD_BATCH = 65_536
TRAINED_FILE = "trained.faiss"
TRANSFORM_FILE = "transform.npz"
CELLS_FILE = "cells.npz"
BUILD_PREFIX = "b-"  # a build folder: indexes/<concept>/b-<random>
FOLDER_LOCK = ".lock"


def build_index(
    store: FeatureStore,
    config: IndexConfig = IndexConfig(),
    weights: GroupWeights | None = None,
    show_progress: bool = True,
    shards: Sequence[int] | None = None,
    update: bool = False,
    search: SearchConfig | None = None,
    train_only: bool = False,
    target_recall: float | None = None,
) -> ShardedIndex:
    """Build the ``config.concept`` partition and record it in the manifest.

    Default: a fresh partition over every store shard (``config.shards_per_part`` shards a part).
    ``shards``: build only the part covering these store shards (training first if the
    partition has no trained state yet) — one machine per part. ``update``: add parts for the
    store shards no part covers yet (e.g. after ``featurize --append``), leaving the rest as they are.
    ``train_only``: a fresh partition with its trained state and no parts yet (then ``shards=`` per machine).
    ``target_recall``: afterwards, calibrate the approximate kinds' knobs (those ``search`` leaves at 0)
    to the cheapest setting reaching that recall@10 (:mod:`gradindex.index.calibrate`) and record them
    as the partition's defaults; skipped for ``train_only`` and ``shards`` (no whole partition yet).
    """
    check_index_dim(store.dim, f"build-index {store.path}")
    concept_dir(store, config.concept)  # a safe folder before anything is read or written
    requested = config.damping  # "auto": weights learned under gram@auto; the index records the resolved values
    config = dataclasses.replace(config, damping=resolve_damping(store, config.damping, config.preconditioner))
    weights = _index_weights(store, config, requested) if weights is None else weights
    weights.check_setting(config.preconditioner, config.damping)
    existing = store.manifest.get("indexes", {}).get(config.concept)
    reuse = (update or shards is not None) and existing is not None and "parts" in existing
    if reuse:
        config = _reused_config(config, weights, existing, update)
    if shards is not None:
        shards = _checked_shards(store, shards, existing["parts"] if reuse else [])
    ranges = _part_ranges(store, config, existing if reuse else None, shards, train_only)
    calibrating = bool(target_recall) and not train_only and shards is None
    plan = None
    try:
        with _claim_folder(store, config.concept, existing if reuse else None) as folder:
            state = _load_state(store, existing) if reuse else _train(store, config, weights, folder, show_progress)
            if calibrating and not reuse and state["kind"] is not IndexKind.FLAT:
                from gradindex.index.calibrate import CalibrationPlan

                plan = CalibrationPlan.prepare(store, config, weights, state["transform"], state["sample"],
                                               seed=config.seed, device="cpu")
            for part_shards in ranges:
                _build_part(store, config, weights, state, part_shards, folder, show_progress,
                            observe=plan.observe if plan is not None else None)
            _commit_entry(store, config, weights, state, search, folder, requested)
    except BaseException:
        with suppress(GradIndexError, OSError):  # best effort: the build's own error is the one to report
            _tidy(store, config.concept)
        raise
    _tidy(store, config.concept)
    index = ShardedIndex.open(store, config.concept, device=config.device)
    if calibrating and index.kind != IndexKind.FLAT.value:
        index = _calibrate(store, index, config, target_recall, search, plan)
    return index


def _index_weights(store: FeatureStore, config: IndexConfig, requested: Any) -> GroupWeights:
    """The store's weights of ``config.concept`` for the index's setting (``requested``: the damping as
    asked, e.g. ``"auto"``); uniform ones, with a note, when it has weights only for other settings."""
    groups = store.groups
    weights = GroupWeights.from_manifest(store.manifest, config.concept, groups, config.preconditioner, requested)
    other = learned_weights(store.manifest, config.concept, groups)
    if other and weights.info.get("method") == "uniform":
        logger.info("concept %r has weights learned for %s, none for %s: this index uses uniform weights",
                    config.concept, ", ".join(other), setting_key(config.preconditioner, requested))
    return weights


def _reused_config(config: IndexConfig, weights: GroupWeights, existing: dict[str, Any], update: bool) -> IndexConfig:
    """The config to add parts to the ``existing`` partition with: its own when ``update`` and the
    trained fields differ; a one-line error when they differ for ``--shards`` or the weights differ."""
    if _trained_fields(existing["config"]) != _trained_fields(config.to_dict()):
        if update:
            config = IndexConfig.from_dict(existing["config"])
        else:
            raise ConfigError(
                f"index {config.concept!r} was trained with another config; build it again without --shards first"
            )
    if existing["weights"] != weights.to_dict():
        raise ConfigError(f"index {config.concept!r} was built with other weights; rebuild it without --update/--shards")
    return config


def _checked_shards(store: FeatureStore, shards: Sequence[int], parts: list[dict[str, Any]]) -> list[int]:
    """``--shards`` sorted, each a store shard and in none of the partition's ``parts`` yet."""
    num_shards = len(store.manifest["shards"])
    shards = sorted({int(s) for s in shards})
    bad = [s for s in shards if not 0 <= s < num_shards]
    if bad or not shards:
        raise ConfigError(f"--shards {bad or shards}: the store has shards 0..{num_shards - 1}")
    taken = {s: p["name"] for p in parts for s in p["shards"] if s in shards}
    if taken:
        raise ConfigError(
            f"--shards: store shards {sorted(taken)} are already in parts {sorted(set(taken.values()))}; "
            "start a fresh partition with --train-only, then build each part"
        )
    return shards


def _part_ranges(store: FeatureStore, config: IndexConfig, existing: dict[str, Any] | None,
                 shards: list[int] | None, train_only: bool) -> list[list[int]]:
    """The store shards of each part to build: none (``train_only``), the one part ``shards``, or the
    shards no part of ``existing`` covers, ``config.shards_per_part`` a part."""
    if train_only:
        return []
    if shards is not None:
        return [shards]
    covered = {s for p in (existing["parts"] if existing is not None else []) for s in p["shards"]}
    todo = [s for s in range(len(store.manifest["shards"])) if s not in covered]
    per = config.shards_per_part or max(1, len(todo))
    return [todo[i:i + per] for i in range(0, len(todo), per)]


def _calibrate(store: FeatureStore, index: ShardedIndex, config: IndexConfig, target_recall: float,
               search: SearchConfig | None, plan: Any) -> ShardedIndex:
    """Calibrate the new partition's knobs to ``target_recall`` (reusing ``plan``'s queries and exact
    answers when the build gathered them), record them, and reopen the index with them."""
    from gradindex.index.calibrate import calibrate

    calibration = calibrate(store, index, target_recall, fixed=search, seed=config.seed,
                            queries=plan.queries if plan is not None else None,
                            exact=plan.exact.result() if plan is not None else None)
    record_search(store, config.concept, index.entry, calibration.search, calibration.to_dict())
    return ShardedIndex.open(store, config.concept, device=config.device)


def _trained_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The config fields a part must share with its partition (layout and device may differ)."""
    return {k: v for k, v in config.items() if k not in ("shards_per_part", "device")}


# -- build folders -------------------------------------------------------------------------------
@contextmanager
def _claim_folder(store: FeatureStore, concept: str, entry: dict[str, Any] | None) -> Iterator[str]:
    """The folder this build writes into (relative to the store), held (shared lock) until the block
    ends: a new ``indexes/<concept>/b-<random>`` (``entry`` None; removed again if the build fails),
    or the folder of ``entry``, which must still be the concept's current partition."""
    top = concept_dir(store, concept)
    storage = store.storage
    held = ExitStack()
    with store_lock(storage):
        if entry is None:
            folder = f"{top}/{BUILD_PREFIX}{uuid.uuid4().hex[:12]}"
            storage.make_root(folder)
        else:
            current = read_manifest(storage).get("indexes", {}).get(concept)
            if current is None or current["trained"] != entry["trained"]:
                raise StoreMismatchError(
                    f"{store.path}: index {concept!r} was rebuilt by another process since this store was opened; "
                    "run the command again"
                )
            folder = entry_folder(store, concept, current)
        held.enter_context(storage.lock(f"{folder}/{FOLDER_LOCK}", shared=True))
    try:
        yield folder
    except BaseException:
        if entry is None:
            with suppress(GradIndexError, OSError):
                storage.delete_tree(folder)
        raise
    finally:
        held.close()


def _tidy(store: FeatureStore, concept: str) -> None:
    """Remove from ``indexes/<concept>/`` what the concept's entry does not name: replaced builds,
    builds of killed or failed runs, their stray files. A folder a builder still holds is left alone."""
    top = concept_dir(store, concept)
    storage = store.storage
    if not storage.is_folder(top):
        return
    with store_lock(storage):
        entry = read_manifest(storage).get("indexes", {}).get(concept)
        keep_folder = entry_folder(store, concept, entry) if entry else None
        keep = _entry_files(entry) if entry else set()
        folders = [f"{top}/{name}" for name in storage.folders(top) if name.startswith(BUILD_PREFIX)]
        for folder in [top, *folders]:
            try:
                with storage.lock(f"{folder}/{FOLDER_LOCK}", blocking=False):
                    if folder not in (top, keep_folder):
                        storage.delete_tree(folder)
                        continue
                    for name in storage.files(folder):
                        if name != FOLDER_LOCK and f"{folder}/{name}" not in keep:
                            storage.delete(f"{folder}/{name}")
            except BlockingIOError:
                continue  # someone builds into it


def _entry_files(entry: dict[str, Any]) -> set[str]:
    """The files of an index entry (and its parts' sidecars), relative to the store."""
    files = {entry["trained"]["file"]}
    if entry["transform"]["kind"] != "none":
        files.add(entry["transform"]["file"])
    if entry.get("cells"):
        files.add(entry["cells"]["file"])
    for part in entry["parts"]:
        files.update(f for f in (part["file"], part["ids_file"], part.get("vectors_file")) if f)
        files.add(str(PurePosixPath(part["file"]).with_name(f"{part['name']}.json")))
    return {str(PurePosixPath(f)) for f in files}


# -- training ------------------------------------------------------------------------------------


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


def _train(store: FeatureStore, config: IndexConfig, weights: GroupWeights, folder: str,
           show_progress: bool) -> dict[str, Any]:
    n, dim = store.num_samples, store.dim
    kind = resolve_kind(config, n, dim)
    knobs = resolve_build(config, kind, n, dim)
    balance = config.balance is Balance.ON or (config.balance is Balance.AUTO and kind is not IndexKind.FLAT)
    transform, transform_info = None, {"kind": "none"}
    if balance:
        grams = store.read_gram()
        missing = [g for g in store.groups if g not in grams]
        if missing:
            raise ConfigError(f"--balance on: the store has no Gram matrix for groups {missing}; use --balance off")
        transform = QueryTransform.from_grams([grams[g] for g in store.groups],
                                              [group_damping(config.damping, g) for g in store.groups])
        relative = f"{folder}/{TRANSFORM_FILE}"
        data = npz_bytes(transform.arrays())
        store.storage.write_bytes(relative, data)
        transform_info = {"kind": "balance", "file": relative, "sha256": hashlib.sha256(data).hexdigest(),
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
    cells_info = {}
    if "cells" in extras:
        cells = f"{folder}/{CELLS_FILE}"
        data = npz_bytes(extras["cells"].arrays())
        store.storage.write_bytes(cells, data)
        cells_info = {"file": cells, "sha256": hashlib.sha256(data).hexdigest()}
    relative = f"{folder}/{TRAINED_FILE}"
    tmp = store.storage.temporary(relative)
    try:
        write_index(trained, tmp)
        digest = sha256_file(tmp)
        store.storage.publish(tmp, relative)
    finally:
        tmp.unlink(missing_ok=True)
    return {"kind": kind, "knobs": knobs, "transform": transform, "transform_info": transform_info,
            "trained": trained, "extras": extras, "layout": extras.get("layout", {}), "cells_info": cells_info,
            "sample": sample,
            "trained_info": {"file": relative, "sha256": digest}}


def _load_state(store: FeatureStore, entry: dict[str, Any]) -> dict[str, Any]:
    info = entry["trained"]
    trained = read_index(checked_file(store, info["file"], info["sha256"]))
    check_index_kind(trained, entry["kind"], entry["dim"], 0, info["file"])
    layout = entry.get("layout", {})
    extras: dict[str, Any] = {"layout": layout}
    if layout:
        extras["directions"] = banded_directions(trained, layout)
    return {"kind": IndexKind(entry["kind"]), "knobs": entry["knobs"], "transform": load_transform(store, entry),
            "transform_info": entry["transform"], "trained": trained, "extras": extras, "layout": layout,
            "cells_info": entry.get("cells", {}), "trained_info": info}


# -- parts ----------------------------------------------------------------------------------------
def _build_part(store: FeatureStore, config: IndexConfig, weights: GroupWeights, state: dict[str, Any],
                shards: Sequence[int], folder: str, show_progress: bool,
                observe: Callable[[np.ndarray, np.ndarray], None] | None = None) -> IndexPart:
    """Fill one part from ``shards``; ``observe(ids, vectors)`` also sees every added batch."""
    kind = state["kind"]
    name = part_name(shards)
    rows = sum(store.manifest["shards"][s]["rows"] for s in shards)
    keep = config.keep_vectors if config.keep_vectors is not None else kind is IndexKind.IVFPQ
    builder = PartBuilder(kind, state["trained"], state["extras"])
    storage = store.storage
    final = {suffix: f"{folder}/{name}{suffix}" for suffix in (".faiss", ".ids.npy", ".f16")}
    tmp = {suffix: storage.temporary(path) for suffix, path in final.items()}
    ids_parts = []
    try:
        with open(tmp[".f16"], "wb") if keep else _null() as handle, \
                tqdm(total=rows, desc=f"index {config.concept} {name}", unit="ex", disable=not show_progress) as bar:
            for ids, vectors in iter_vector_batches(store, weights, state["transform"], shards):
                builder.add(vectors)
                if observe is not None:
                    observe(ids, vectors)
                ids_parts.append(ids.astype(np.int64))
                if handle is not None:
                    handle.write(vectors.astype(np.float16).tobytes())
                bar.update(len(ids))
        sample_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
        write_index(builder.index, tmp[".faiss"])
        with open(tmp[".ids.npy"], "wb") as handle:
            np.save(handle, sample_ids)
        digests = {s: sha256_file(p) for s, p in tmp.items() if p.exists()}
        size = tmp[".faiss"].stat().st_size
        for suffix, path in tmp.items():
            if path.exists():
                storage.publish(path, final[suffix])
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    part = IndexPart(
        name=name, file=final[".faiss"], sha256=digests[".faiss"], ntotal=int(builder.rows), shards=tuple(shards),
        bytes=size, vectors_file=final[".f16"] if keep else "",
        vectors_sha256=digests.get(".f16", "") if keep else "", ids_file=final[".ids.npy"],
        ids_sha256=digests[".ids.npy"], trained_sha256=state["trained_info"]["sha256"], info=builder.info(),
    )
    if not keep:
        storage.delete(final[".f16"])
    storage.write_bytes(f"{folder}/{name}.json", json_bytes(part.to_dict()))
    return part


@contextmanager
def _null():
    yield None


def _commit_entry(store: FeatureStore, config: IndexConfig, weights: GroupWeights, state: dict[str, Any],
                  search: SearchConfig | None, folder: str, requested: Any = None) -> None:
    """Record every part sidecar of this training in ``folder`` as the concept's entry (one
    :func:`~gradindex.store.feature_store.modify_manifest`: the manifest is reread under the store lock)."""
    used = {s: store.manifest["shards"][s]["sha256"] for s in range(len(store.manifest["shards"]))}

    def change(manifest: dict[str, Any] | None) -> dict[str, Any]:
        if manifest is None or any(s >= len(manifest["shards"]) or manifest["shards"][s]["sha256"] != digest
                                   for s, digest in used.items()):
            raise StoreMismatchError(f"{store.path}: the store's shards changed during the build (featurize "
                                     "--overwrite?); run build-index again")
        parts = []
        for sidecar in store.storage.names(folder, "part-*.json"):
            part = IndexPart.from_dict(json.loads(store.storage.read_bytes(f"{folder}/{sidecar}")))
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
            "folder": folder,
            "kind": state["kind"].value,
            "knobs": state["knobs"],
            "dim": store.dim,
            "weights": weights.to_dict(),
            "weights_digest": weights.digest(),
            "transform": state["transform_info"],
            "trained": state["trained_info"],
            "layout": state["layout"],
            "cells": state["cells_info"],
            "search": (search or SearchConfig()).to_dict(),
            "parts": [p.to_dict() for p in parts],
            "ntotal": int(sum(p.ntotal for p in parts)),
            **({"damping_requested": requested} if isinstance(requested, str) else {}),
        }
        return {**manifest, "indexes": {**manifest.get("indexes", {}), config.concept: entry}}

    store.manifest = modify_manifest(store.storage, change)


def record_search(store: FeatureStore, concept: str, entry: dict[str, Any], search: SearchConfig,
                  calibration: dict[str, Any]) -> None:
    """Make ``search`` the default knobs of ``entry`` (the concept's partition that was calibrated)
    and record how they were chosen; refused if the concept was rebuilt meanwhile."""

    def change(manifest: dict[str, Any] | None) -> dict[str, Any]:
        current = (manifest or {}).get("indexes", {}).get(concept)
        if current is None or current["trained"] != entry["trained"]:
            raise StoreMismatchError(f"{store.path}: index {concept!r} was rebuilt by another process while it was "
                                     "calibrated; run build-index again")
        updated = {**current, "search": search.to_dict(), "calibration": calibration}
        return {**manifest, "indexes": {**manifest["indexes"], concept: updated}}

    store.manifest = modify_manifest(store.storage, change)
