"""The feature store: Parquet shards + ``manifest.json`` (pyarrow only here, in :mod:`~gradindex.store.shards`
and in :mod:`~gradindex.store.scores`).

Layout of a store directory::

    manifest.json            written last; a store without it is incomplete
    shards/part-00000.parquet  sample_id int64, one fixed-size-list column per group
                               ("grad:<group>", float32 or float16) and metadata
                               columns ("meta:<name>")
    shards/part-00000.json   the shard's sidecar: rows, sha256, byte size, run key
    gram-<sha>.npz           per-group Gram matrices G_g = ΦᵀΦ/N, key "g<i>" = i-th group (named by its
                             content, so a new one never replaces the one the manifest lists)
    factors-<sha>.npz        K-FAC / EK-FAC factors (gradindex.features.kfac), listed as manifest "factors"
    indexes/<concept>/       FAISS index builds of a concept (gradindex.index; layout in gradindex.index.shards)
    .manifest.lock           the lock every manifest read-modify-write takes (:func:`modify_manifest`)
    .writer.lock             held by the featurize run writing the store (:func:`writer_lock`)

Every file is written under a temporary name and renamed when complete. The
manifest records each file's sha256, and readers verify a shard's checksum
before trusting its rows. Opening a store validates its manifest
(:mod:`gradindex.store.schema`) and refuses any path in it that leads outside
the store (``..``, absolute paths, symlinks).

A store may also live on object storage (``s3://bucket/prefix``): every read and write here
goes through a :class:`~gradindex.store.storage.Storage` (:mod:`gradindex.store.storage`), which sends
each finished file in one PUT, keeps verified local copies of what readers need as files,
and stands lease objects in for the two locks.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import ArtifactNotFoundError, ConfigError, StoreMismatchError
from gradindex.store.owned import OWNED, clear_owned, refuse_foreign_folder
from gradindex.store.schema import FORMAT_VERSION, manifest_paths, validate_manifest
from gradindex.store.shards import (  # noqa: F401  (the shard helpers are imported from here by other modules)
    FEATURE_PREFIX, META_PREFIX, ROW_GROUP_ROWS, SHARD_DIR, ShardInfo, completed_shard, json_bytes, read_shard,
    read_written_shard, remove_temporaries, remove_unlisted_shards, shard_name, shard_rows, sidecar_name, write_shard,
)
from gradindex.store.storage import (  # noqa: F401  (the file helpers are imported from here by other modules)
    LocalStorage, Storage, atomic_write_bytes, file_lock, inside_root, open_storage, sha256_file, temporary_path,
)

MANIFEST = "manifest.json"
GRAM_FILE = "gram.npz"  # the Gram file of version-1 stores; newer ones name it by content (gram-<sha>.npz)
LOCK_FILE = ".manifest.lock"
WRITER_LOCK = ".writer.lock"


# -- small file helpers ----------------------------------------------------------------------
def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_bytes(path, json_bytes(data))


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# -- locks and the one manifest read-modify-write ----------------------------------------------
@contextmanager
def store_lock(path: str | Path | Storage) -> Iterator[None]:
    """The store's manifest lock (exclusive, blocking): held by every manifest read-modify-write."""
    with open_storage(path).lock(LOCK_FILE):
        yield


@contextmanager
def writer_lock(path: str | Path | Storage) -> Iterator[Storage]:
    """Create the store folder and hold its writer lock while a featurize run writes shards into it;
    yields the store's :class:`~gradindex.store.storage.Storage`.

    A second run into the same folder is refused at once (two runs would mix their shards; on
    object storage this refusal is best effort, see :class:`gradindex.store.leases`).
    """
    storage = open_storage(path)
    storage.make_root()
    try:
        with storage.lock(WRITER_LOCK, blocking=False):
            yield storage
    except BlockingIOError:
        raise ConfigError(
            f"{storage}: another featurize is writing this store; wait for it to finish or use another --out"
        ) from None


def read_manifest(path: str | Path | Storage) -> dict[str, Any]:
    """The store's manifest, parsed and validated (a one-line error otherwise)."""
    storage = open_storage(path)
    if not storage.is_file(MANIFEST):
        raise ArtifactNotFoundError(
            f"{storage} is an incomplete feature store (no {MANIFEST}): featurize was interrupted; run it again"
        )
    try:
        data = json.loads(storage.read_bytes(MANIFEST))
    except (ValueError, RecursionError) as err:
        raise StoreMismatchError(f"{storage}/{MANIFEST} is not valid JSON ({err})") from None
    return validate_manifest(data, str(storage))


def modify_manifest(path: str | Path | Storage,
                    change: Callable[[dict[str, Any] | None], Mapping[str, Any]]) -> dict[str, Any]:
    """The one read-modify-write of ``manifest.json``: under the store lock, reread the manifest
    (``None`` when there is none yet), validate ``change(manifest)``, write it atomically and
    return it. Every writer goes through here, so concurrent writers never lose each other's
    updates, and nothing is written that could not be read back."""
    storage = open_storage(path)
    with storage.lock(LOCK_FILE):
        storage.remove_temporaries([""], MANIFEST)  # of a killed writer: nobody else writes one now
        current = read_manifest(storage) if storage.is_file(MANIFEST) else None
        new = {k: v for k, v in change(current).items() if k != "format_version"}
        new = validate_manifest({"format_version": FORMAT_VERSION, **new}, str(storage))
        storage.write_bytes(MANIFEST, json_bytes(new))
        return new


def inside_store(root: str | Path, relative: Any, what: str) -> Path:
    """The real path of ``relative`` (a path read from the manifest) if it stays inside the store
    ``root``; a one-line ``StoreMismatchError`` for absolute paths, ``..`` and symlinks leading out."""
    return inside_root(root, relative, what)


# -- writing a store ----------------------------------------------------------------------------
def prepare_store(path: str | Path | Storage, overwrite: bool = False, resume: bool = False) -> Path | Storage:
    """Make ``path`` ready for a new store (call with its :func:`writer_lock` held). An existing
    complete store needs ``overwrite``.

    Overwriting first removes the manifest, so an interrupted rewrite never
    leaves something that looks complete. ``resume`` keeps verified shards; the
    temporary files of a killed run are removed either way. Returns the folder (a local
    store) or the :class:`~gradindex.store.storage.Storage` (object storage).
    """
    storage = open_storage(path)
    storage.make_root()
    if not overwrite and not storage.exists(MANIFEST):
        refuse_foreign_folder(storage)
    if storage.exists(MANIFEST):
        if not overwrite:
            raise ConfigError(f"{storage} already holds a feature store; pass --overwrite to replace it")
        with storage.lock(LOCK_FILE):
            storage.delete(MANIFEST)
    if not resume:
        clear_owned(storage)  # only what a store wrote: a user's file in DIR/indexes/ stays
    storage.remove_temporaries(["", SHARD_DIR])
    storage.make_root(SHARD_DIR)
    return storage.root if storage.local else storage


def write_arrays(path: str | Path, arrays: Mapping[str, np.ndarray]) -> str:
    """Save ``arrays`` as an ``.npz`` atomically; return its sha256."""
    data = npz_bytes(arrays)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def write_gram(path: str | Path | Storage, grams: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Save the Gram arrays as ``gram-<sha>.npz`` in the store ``path``: ``{"file", "sha256"}``.

    Named by content, so writing a new one never touches the file the manifest lists;
    :func:`remove_unused_grams` deletes the old one after the manifest switched.
    """
    data = npz_bytes(grams)
    digest = hashlib.sha256(data).hexdigest()
    name = f"gram-{digest[:16]}.npz"
    open_storage(path).write_bytes(name, data)
    return {"file": name, "sha256": digest}


def write_factors(path: str | Path | Storage, arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Save K-FAC / EK-FAC factor arrays as ``factors-<sha>.npz`` (named by content): ``{"file", "sha256"}``."""
    data = npz_bytes(arrays)
    digest = hashlib.sha256(data).hexdigest()
    name = f"factors-{digest[:16]}.npz"
    open_storage(path).write_bytes(name, data)
    return {"file": name, "sha256": digest}


def gram_files(path: str | Path | Storage) -> list[str]:
    """The Gram files a store wrote in its root (names relative to it; a user's ``gram-x.npz`` is not one)."""
    storage = open_storage(path)
    return sorted(name for name in [*storage.names("", "gram-*.npz"), *storage.names("", GRAM_FILE)]
                  if OWNED.fullmatch(name))


def remove_unused_grams(path: str | Path | Storage, manifest: Mapping[str, Any] | None) -> None:
    """Delete the Gram files ``manifest`` does not list (call with the writer lock held)."""
    storage = open_storage(path)
    listed = (manifest or {}).get("gram") or {}
    keep = listed.get("file", GRAM_FILE) if listed else None
    for name in gram_files(storage):
        if name != keep:
            storage.delete(name)


def commit_manifest(path: str | Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` last (through :func:`modify_manifest`): from here on the store is complete."""
    return modify_manifest(path, lambda _: dict(manifest))


# -- reading a store ----------------------------------------------------------------------------
class FeatureStore:
    """A complete store opened for reading. ``FeatureStore.open(path)`` (a folder, ``file://`` or ``s3://`` URI).

    ``path``: the folder (a ``Path``) of a local store, the URI (a ``str``) of one on object
    storage; ``storage``: its :class:`~gradindex.store.storage.Storage`.
    ``trust_task``/``task``: the user's consent to run the task code the manifest names
    (any task, or exactly the spec ``task``); see :func:`gradindex.features.query.load_store_task`.
    """

    def __init__(self, path: Path | str, manifest: dict[str, Any], verify: bool = True, trust_task: bool = False,
                 task: str | None = None, storage: Storage | None = None):
        self.storage = storage if storage is not None else _store_storage(path)
        self.path = self.storage.root if self.storage.local else self.storage.location
        self.manifest = manifest
        self.verify = verify
        self.trust_task = trust_task
        self.task = task
        self._verified: set[str] = set()
        self._local: dict[str, Path] = {}

    @classmethod
    def open(cls, path: str | Path | Storage, verify: bool = True, trust_task: bool = False,
             task: str | None = None) -> "FeatureStore":
        storage = _store_storage(path)
        if not storage.exists():
            raise ArtifactNotFoundError(f"no feature store at {storage} (run `gradindex featurize` first)")
        store = cls(storage.location, read_manifest(storage), verify, trust_task, task, storage)
        store._check_files()
        return store

    def _check_files(self) -> None:
        """Every path the manifest names stays inside the store; every shard is there, whole."""
        for field, relative in manifest_paths(self.manifest):
            self.file(relative, f"manifest field {field}")
        sizes = self.storage.sizes([shard["path"] for shard in self.manifest["shards"]], "shard")
        for shard in self.manifest["shards"]:
            size = sizes[shard["path"]]
            if size is None:
                raise ArtifactNotFoundError(f"{self.path}: shard {shard['path']} listed in the manifest is missing")
            if size != shard["bytes"]:
                raise StoreMismatchError(
                    f"{self.path}: shard {shard['path']} has {size} bytes, the manifest says "
                    f"{shard['bytes']}; the store is corrupt, featurize again"
                )

    def file(self, relative: str, what: str = "file") -> Path | str:
        """The real path of a file the manifest names (refused if it leads outside the store); on
        object storage, its checked key."""
        return self.storage.file(relative, what)

    def fetch(self, relative: str, sha256: str, what: str, missing: str, mismatch: str) -> Path:
        """A local file with the content of ``relative`` (the file itself, or a verified cached copy
        of an object), its sha256 checked when the store verifies."""
        return self.storage.fetch(relative, sha256, self.verify, missing, mismatch, what)

    def local_dir(self, name: str) -> Path:
        """A local folder for what is derived from this store (the store's own folder, or the cache)."""
        return self.storage.scratch(name)

    def refresh(self) -> "FeatureStore":
        """Reread the manifest (another process may have rewritten it since this store was opened)."""
        self.manifest = read_manifest(self.storage)
        self._check_files()
        self._verified.clear()
        self._local.clear()
        return self

    # -- manifest views -----------------------------------------------------------------------
    @property
    def groups(self) -> list[str]:
        return [group["name"] for group in self.manifest["groups"]]

    @property
    def group_dims(self) -> dict[str, int]:
        return {group["name"]: group["dim"] for group in self.manifest["groups"]}

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def dim(self) -> int:
        return sum(self.group_dims.values())

    @property
    def metadata_columns(self) -> list[str]:
        return list(self.manifest.get("metadata_columns", []))

    def update_manifest(self, update: Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]]) -> None:
        """Rewrite the manifest through :func:`modify_manifest`: ``update`` is either top-level keys
        to merge or ``change(current manifest) -> new manifest`` (applied to the manifest as reread
        under the store lock, so a concurrent writer's update is kept)."""
        change = update if callable(update) else (lambda current: {**current, **update})
        self.manifest = modify_manifest(self.storage, lambda current: change(_present(current, self.path)))

    # -- data -------------------------------------------------------------------------------------
    def _checked(self, shard: Mapping[str, Any]) -> Path:
        relative = shard["path"]
        if relative not in self._local or (self.verify and relative not in self._verified):
            self._local[relative] = file = self.fetch(
                relative, shard["sha256"], "shard",
                missing=f"{self.path}: shard {relative} listed in the manifest is missing",
                mismatch=f"{self.path}: checksum mismatch in {relative}; the shard was modified or corrupted, "
                         "featurize again")
            if self.verify:
                rows = shard_rows(file)
                if rows != shard["rows"]:
                    raise StoreMismatchError(
                        f"{self.path}: {relative} holds {rows} rows, the manifest says {shard['rows']}; "
                        "the store is corrupt, featurize again"
                    )
                self._verified.add(relative)
        return self._local[relative]

    def iter_shards(
        self, groups: Sequence[str] | None = None, metadata: bool = False, shards: Sequence[int] | None = None
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """Yield ``(sample_ids [n], {group: [n, k_g]}, {meta: [n]})`` shard by shard (``shards``: only those)."""
        groups = self.groups if groups is None else list(groups)
        unknown = set(groups) - set(self.groups)
        if unknown:
            raise ConfigError(f"{self.path}: unknown groups {sorted(unknown)}; the store has {self.groups}")
        meta_names = self.metadata_columns if metadata else []
        listed = self.manifest["shards"]
        if shards is not None:
            bad = [s for s in shards if not 0 <= int(s) < len(listed)]
            if bad:
                raise ConfigError(f"{self.path}: no shards {bad}; the store has shards 0..{len(listed) - 1}")
            listed = [listed[int(s)] for s in shards]
        dims = self.group_dims
        for shard in listed:
            ids, feats, meta = read_shard(self._checked(shard), groups, meta_names)
            if len(ids) != shard["rows"]:
                raise StoreMismatchError(f"{self.path}: {shard['path']} has {len(ids)} rows, expected {shard['rows']}")
            wrong = {g: b.shape[1] for g, b in feats.items() if b.shape[1] != dims[g]}
            if wrong or not np.issubdtype(ids.dtype, np.integer):
                raise StoreMismatchError(
                    f"{self.path}: {shard['path']} does not match the manifest (feature widths {wrong}, "
                    f"ids of {ids.dtype}); the store is corrupt, featurize again"
                )
            yield ids, feats, meta

    def read(self, groups: Sequence[str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """All sample ids and features in memory (small stores, tests)."""
        ids, feats = [], {}
        for shard_ids, shard_feats, _ in self.iter_shards(groups):
            ids.append(shard_ids)
            for group, block in shard_feats.items():
                feats.setdefault(group, []).append(block)
        groups = self.groups if groups is None else list(groups)
        return (
            np.concatenate(ids) if ids else np.zeros(0, np.int64),
            {g: np.concatenate(feats[g]) if g in feats else np.zeros((0, self.group_dims[g]), np.float32) for g in groups},
        )

    def read_metadata(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ids, meta = [], {}
        for shard_ids, _, shard_meta in self.iter_shards(groups=[], metadata=True):
            ids.append(shard_ids)
            for name, values in shard_meta.items():
                meta.setdefault(name, []).append(values)
        return np.concatenate(ids), {name: np.concatenate(parts) for name, parts in meta.items()}

    def read_factors(self) -> dict[str, np.ndarray] | None:
        """The factor arrays the manifest lists (checksum verified), or None when it lists none."""
        info = self.manifest.get("factors")
        if not info:
            return None
        name = info["file"]
        file = self.storage.fetch(name, info["sha256"], True,
                                  f"{self.path}: {name} listed in the manifest is missing; run gradindex fit-factors",
                                  f"{self.path}: checksum mismatch in {name}; run gradindex fit-factors again",
                                  "manifest field factors.file")
        try:
            with np.load(file) as data:
                return {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise StoreMismatchError(f"{self.path}: {name} is not a readable .npz file ({err}); run gradindex "
                                     "fit-factors again") from None

    def read_gram(self, retry: bool = True) -> dict[str, np.ndarray]:
        """``{group: G_g [k_g, k_g]}`` of the groups that have one (verified against the manifest)."""
        info = self.manifest.get("gram")
        if not info:
            return {}
        name = info.get("file", GRAM_FILE)
        try:
            file = self.storage.fetch(name, info["sha256"], True,
                                      f"{self.path}: {name} listed in the manifest is missing",
                                      f"{self.path}: checksum mismatch in {name}; featurize again",
                                      "manifest field gram.file")
        except ArtifactNotFoundError:
            if retry:  # an append may have replaced it since this store was opened
                return self.refresh().read_gram(retry=False)
            raise
        dims = self.group_dims
        try:
            with np.load(file) as data:
                grams = {group: data[f"g{i}"] for i, group in enumerate(self.groups) if f"g{i}" in data.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
            raise StoreMismatchError(f"{self.path}: {name} is not a readable .npz file ({err}); featurize again") \
                from None
        wrong = {g: m.shape for g, m in grams.items() if m.shape != (dims[g], dims[g])}
        if wrong:
            raise StoreMismatchError(f"{self.path}: {name} holds Gram matrices of the wrong shapes {wrong}")
        return grams


def open_store(store: str | Path | Storage | FeatureStore, trust_task: bool = False,
               task: str | None = None) -> FeatureStore:
    """``store`` itself when it is an open :class:`FeatureStore`, else ``FeatureStore.open(store,
    trust_task=trust_task, task=task)``: the one "a path or an open store" rule of every entry point
    (an open store keeps the consent it was opened with)."""
    if isinstance(store, FeatureStore):
        return store
    return FeatureStore.open(store, trust_task=trust_task, task=task)


def _store_storage(path: str | Path | Storage) -> Storage:
    """The storage of a store; a local one confines manifest paths with :func:`inside_store`."""
    storage = open_storage(path)
    if storage.local:
        root = storage.root
        return LocalStorage(root, confine=lambda relative, what: inside_store(root, relative, what))
    return storage


def _present(manifest: dict[str, Any] | None, path: Path) -> dict[str, Any]:
    if manifest is None:
        raise ArtifactNotFoundError(f"{path}: the manifest disappeared (the store is being overwritten?)")
    return manifest
