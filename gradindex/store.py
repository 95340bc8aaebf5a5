"""The feature store: Parquet shards + ``manifest.json`` (the only pyarrow importer).

Layout of a store directory::

    manifest.json            written last; a store without it is incomplete
    shards/part-00000.parquet  sample_id int64, one fixed-size-list column per group
                               ("grad:<group>", float32 or float16) and metadata
                               columns ("meta:<name>")
    shards/part-00000.json   the shard's sidecar: rows, sha256, byte size, run key
    gram-<sha>.npz           per-group Gram matrices G_g = ΦᵀΦ/N, key "g<i>" = i-th group (named by its
                             content, so a new one never replaces the one the manifest lists)
    indexes/<concept>/       FAISS index builds of a concept (gradindex.index; layout in gradindex.index.shards)
    .manifest.lock           the lock every manifest read-modify-write takes (:func:`modify_manifest`)
    .writer.lock             held by the featurize run writing the store (:func:`writer_lock`)

Every file is written under a temporary name and renamed when complete. The
manifest records each file's sha256, and readers verify a shard's checksum
before trusting its rows. Opening a store validates its manifest
(:mod:`gradindex.manifest_schema`) and refuses any path in it that leads outside
the store (``..``, absolute paths, symlinks).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import urllib.parse
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from gradindex.errors import ArtifactNotFoundError, ConfigError, StoreMismatchError
from gradindex.manifest_schema import FORMAT_VERSION, manifest_paths, validate_manifest

if TYPE_CHECKING:  # pyarrow is imported where shards are read or written: `info` reads only the manifest
    import pyarrow as pa

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
GRAM_FILE = "gram.npz"  # the Gram file of version-1 stores; newer ones name it by content (gram-<sha>.npz)
LOCK_FILE = ".manifest.lock"
WRITER_LOCK = ".writer.lock"
FEATURE_PREFIX = "grad:"
META_PREFIX = "meta:"
ROW_GROUP_ROWS = 4096


# -- small file helpers ----------------------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temporary_path(path: str | Path) -> Path:
    """A sibling temporary name for ``path`` (rename it onto ``path`` when complete)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


# -- shards -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    """What the manifest (and a shard's sidecar) records about one shard."""

    path: str  # relative to the store
    rows: int
    sha256: str
    bytes: int
    run_key: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/part-{index:05d}.parquet"


def write_shard(
    store: str | Path,
    index: int,
    sample_ids: np.ndarray,
    features: Mapping[str, np.ndarray],
    metadata: Mapping[str, np.ndarray] | None = None,
    run_key: str = "",
) -> ShardInfo:
    """Write one shard (temp name → rename), then its sidecar; return its :class:`ShardInfo`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = Path(store)
    (store / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    rows = len(sample_ids)
    columns: dict[str, pa.Array] = {"sample_id": pa.array(np.asarray(sample_ids, dtype=np.int64))}
    for group, block in features.items():
        block = np.ascontiguousarray(block)
        if block.ndim != 2 or block.shape[0] != rows:
            raise ValueError(f"shard {index}: group {group!r} has shape {block.shape}, expected [{rows}, dim]")
        columns[FEATURE_PREFIX + group] = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), block.shape[1])
    for name, values in (metadata or {}).items():
        columns[META_PREFIX + name] = pa.array(np.asarray(values))
    table = pa.table(columns)
    relative = shard_name(index)
    final = store / relative
    tmp = temporary_path(final)
    try:
        pq.write_table(table, tmp, compression="none", row_group_size=ROW_GROUP_ROWS)
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    info = ShardInfo(relative, rows, digest, size, run_key)
    atomic_write_json(final.with_suffix(".json"), info.to_dict())
    return info


def completed_shard(store: str | Path, index: int, run_key: str) -> ShardInfo | None:
    """The shard's info if it was completely written by a run with ``run_key`` and verifies."""
    final = Path(store) / shard_name(index)
    sidecar = final.with_suffix(".json")
    if not (final.is_file() and sidecar.is_file()):
        return None
    try:
        info = ShardInfo(**json.loads(sidecar.read_text()))
    except (ValueError, TypeError):
        return None
    if info.run_key != run_key or final.stat().st_size != info.bytes or sha256_file(final) != info.sha256:
        return None
    return info


def remove_temporaries(store: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left in the store's root and shard folder
    (call with the writer lock held)."""
    leftovers = sorted([*Path(store).glob(".*.tmp-*"), *(Path(store) / SHARD_DIR).glob(".*.tmp-*")])
    for file in leftovers:
        file.unlink(missing_ok=True)
    return leftovers


def remove_unlisted_shards(store: str | Path, manifest: Mapping[str, Any]) -> None:
    """Delete shard files (and sidecars) the manifest does not list: an interrupted append's."""
    listed = {PurePosixPath(s["path"]).name for s in manifest["shards"]}
    for file in (Path(store) / SHARD_DIR).glob("part-*"):
        if file.with_suffix(".parquet").name not in listed:
            file.unlink(missing_ok=True)


# -- locks and the one manifest read-modify-write ----------------------------------------------
@contextmanager
def file_lock(file: Path, flags: int) -> Iterator[IO]:
    """``flock(file, flags)`` held for the block (created if missing); ``LOCK_NB`` raises ``BlockingIOError``."""
    handle = open(file, "a")
    try:
        fcntl.flock(handle, flags)
        yield handle
    finally:
        handle.close()  # releases the lock


@contextmanager
def store_lock(path: str | Path) -> Iterator[None]:
    """The store's manifest lock (exclusive, blocking): held by every manifest read-modify-write."""
    with file_lock(Path(path) / LOCK_FILE, fcntl.LOCK_EX):
        yield


@contextmanager
def writer_lock(path: str | Path) -> Iterator[Path]:
    """Create the store folder and hold its writer lock while a featurize run writes shards into it.

    A second run into the same folder is refused at once (two runs would mix their shards).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"store path {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    try:
        with file_lock(path / WRITER_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB):
            yield path
    except BlockingIOError:
        raise ConfigError(
            f"{path}: another featurize is writing this store; wait for it to finish or use another --out"
        ) from None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The store's manifest, parsed and validated (a one-line error otherwise)."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactNotFoundError(
            f"{path} is an incomplete feature store (no {MANIFEST}): featurize was interrupted; run it again"
        )
    try:
        data = json.loads(manifest_path.read_text())
    except (ValueError, RecursionError) as err:
        raise StoreMismatchError(f"{manifest_path} is not valid JSON ({err})") from None
    return validate_manifest(data, str(path))


def modify_manifest(path: str | Path, change: Callable[[dict[str, Any] | None], Mapping[str, Any]]) -> dict[str, Any]:
    """The one read-modify-write of ``manifest.json``: under the store lock, reread the manifest
    (``None`` when there is none yet), validate ``change(manifest)``, write it atomically and
    return it. Every writer goes through here, so concurrent writers never lose each other's
    updates, and nothing is written that could not be read back."""
    path = Path(path)
    with store_lock(path):
        for stale in path.glob(f".{MANIFEST}.tmp-*"):  # of a killed writer: nobody else writes one now
            stale.unlink(missing_ok=True)
        current = read_manifest(path) if (path / MANIFEST).is_file() else None
        new = {k: v for k, v in change(current).items() if k != "format_version"}
        new = validate_manifest({"format_version": FORMAT_VERSION, **new}, str(path))
        atomic_write_json(path / MANIFEST, new)
        return new


def inside_store(root: str | Path, relative: Any, what: str) -> Path:
    """The real path of ``relative`` (a path read from the manifest) if it stays inside the store
    ``root``; a one-line ``StoreMismatchError`` for absolute paths, ``..`` and symlinks leading out."""
    text = relative if isinstance(relative, str) else ""
    pure = PurePosixPath(text)
    if not text or "\x00" in text or "\\" in text or pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise StoreMismatchError(
            f"{root}: {what} {relative!r} is not a relative path inside the store; the manifest is corrupt or crafted"
        )
    base = Path(root).resolve()
    real = (base / pure).resolve()
    if not real.is_relative_to(base) or real == base:
        raise StoreMismatchError(f"{root}: {what} {relative!r} leads outside the store (to {real}); refused")
    return real


def local_store_path(location: str | Path) -> Path:
    """A store location as a local path: a plain path or a ``file://`` URI.

    Other filesystems (``s3://``, ``gs://``, ``hdfs://``) are refused with a message: the
    store is read and written through local paths, so every node must mount it.
    """
    text = str(location)
    scheme = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]+):", text)  # one letter would be a Windows drive
    if scheme is None:
        return Path(location)
    parsed = urllib.parse.urlparse(text)
    if scheme.group(1).lower() == "file" and parsed.netloc in ("", "localhost"):
        return Path(urllib.parse.unquote(parsed.path))
    raise ConfigError(
        f"store {text}: only local paths and file:// URIs are supported, not {scheme.group(1)}://; "
        "write to a filesystem every Ray node mounts (NFS, a FUSE mount of the bucket)"
    )


# -- writing a store ----------------------------------------------------------------------------
def prepare_store(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Make ``path`` ready for a new store (call with its :func:`writer_lock` held). An existing
    complete store needs ``overwrite``.

    Overwriting first removes the manifest, so an interrupted rewrite never
    leaves something that looks complete. ``resume`` keeps verified shards; the
    temporary files of a killed run are removed either way.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"store path {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    if (path / MANIFEST).exists():
        if not overwrite:
            raise ConfigError(f"{path} already holds a feature store; pass --overwrite to replace it")
        with store_lock(path):
            (path / MANIFEST).unlink()
    if not resume:
        for target in [path / SHARD_DIR, path / "indexes", *gram_files(path)]:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    remove_temporaries(path)
    (path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    return path


def write_arrays(path: str | Path, arrays: Mapping[str, np.ndarray]) -> str:
    """Save ``arrays`` as an ``.npz`` atomically; return its sha256."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def write_gram(path: str | Path, grams: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Save the Gram arrays as ``gram-<sha>.npz`` in the store ``path``: ``{"file", "sha256"}``.

    Named by content, so writing a new one never touches the file the manifest lists;
    :func:`remove_unused_grams` deletes the old one after the manifest switched.
    """
    buffer = io.BytesIO()
    np.savez(buffer, **grams)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    name = f"gram-{digest[:16]}.npz"
    atomic_write_bytes(Path(path) / name, data)
    return {"file": name, "sha256": digest}


def gram_files(path: str | Path) -> list[Path]:
    return sorted([*Path(path).glob("gram-*.npz"), *Path(path).glob(GRAM_FILE)])


def remove_unused_grams(path: str | Path, manifest: Mapping[str, Any] | None) -> None:
    """Delete the Gram files ``manifest`` does not list (call with the writer lock held)."""
    listed = (manifest or {}).get("gram") or {}
    keep = listed.get("file", GRAM_FILE) if listed else None
    for file in gram_files(path):
        if file.name != keep:
            file.unlink(missing_ok=True)


def commit_manifest(path: str | Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` last (through :func:`modify_manifest`): from here on the store is complete."""
    return modify_manifest(path, lambda _: dict(manifest))


# -- reading a store ----------------------------------------------------------------------------
class FeatureStore:
    """A complete store opened for reading. ``FeatureStore.open(path)``.

    ``trust_task``/``task``: the user's consent to run the task code the manifest names
    (any task, or exactly the spec ``task``); see :func:`gradindex.query_features.load_store_task`.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], verify: bool = True, trust_task: bool = False,
                 task: str | None = None):
        self.path = path
        self.manifest = manifest
        self.verify = verify
        self.trust_task = trust_task
        self.task = task
        self._verified: set[str] = set()

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, trust_task: bool = False,
             task: str | None = None) -> "FeatureStore":
        path = Path(path)
        if not path.is_dir():
            raise ArtifactNotFoundError(f"no feature store at {path} (run `gradindex featurize` first)")
        store = cls(path, read_manifest(path), verify, trust_task, task)
        store._check_files()
        return store

    def _check_files(self) -> None:
        """Every path the manifest names stays inside the store; every shard is there, whole."""
        for field, relative in manifest_paths(self.manifest):
            inside_store(self.path, relative, f"manifest field {field}")
        for shard in self.manifest["shards"]:
            file = self.file(shard["path"], "shard")
            if not file.is_file():
                raise ArtifactNotFoundError(f"{self.path}: shard {shard['path']} listed in the manifest is missing")
            if file.stat().st_size != shard["bytes"]:
                raise StoreMismatchError(
                    f"{self.path}: shard {shard['path']} has {file.stat().st_size} bytes, the manifest says "
                    f"{shard['bytes']}; the store is corrupt, featurize again"
                )

    def file(self, relative: str, what: str = "file") -> Path:
        """The real path of a file the manifest names (refused if it leads outside the store)."""
        return inside_store(self.path, relative, what)

    def refresh(self) -> "FeatureStore":
        """Reread the manifest (another process may have rewritten it since this store was opened)."""
        self.manifest = read_manifest(self.path)
        self._check_files()
        self._verified.clear()
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
        self.manifest = modify_manifest(self.path, lambda current: change(_present(current, self.path)))

    # -- data -------------------------------------------------------------------------------------
    def _checked(self, shard: Mapping[str, Any]) -> Path:
        file = self.file(shard["path"], "shard")
        if self.verify and shard["path"] not in self._verified:
            if sha256_file(file) != shard["sha256"]:
                raise StoreMismatchError(
                    f"{self.path}: checksum mismatch in {shard['path']}; the shard was modified or corrupted, "
                    "featurize again"
                )
            rows = shard_rows(file)
            if rows != shard["rows"]:
                raise StoreMismatchError(
                    f"{self.path}: {shard['path']} holds {rows} rows, the manifest says {shard['rows']}; "
                    "the store is corrupt, featurize again"
                )
            self._verified.add(shard["path"])
        return file

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

    def read_gram(self, retry: bool = True) -> dict[str, np.ndarray]:
        """``{group: G_g [k_g, k_g]}`` of the groups that have one (verified against the manifest)."""
        info = self.manifest.get("gram")
        if not info:
            return {}
        name = info.get("file", GRAM_FILE)
        file = self.file(name, "manifest field gram.file")
        if not file.is_file():
            if retry:  # an append may have replaced it since this store was opened
                return self.refresh().read_gram(retry=False)
            raise ArtifactNotFoundError(f"{self.path}: {name} listed in the manifest is missing")
        if sha256_file(file) != info["sha256"]:
            raise StoreMismatchError(f"{self.path}: checksum mismatch in {name}; featurize again")
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


def _present(manifest: dict[str, Any] | None, path: Path) -> dict[str, Any]:
    if manifest is None:
        raise ArtifactNotFoundError(f"{path}: the manifest disappeared (the store is being overwritten?)")
    return manifest


def shard_rows(file: str | Path) -> int:
    """The row count a Parquet shard's footer records (a one-line error if it is no Parquet file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(file).num_rows
    except (pa.ArrowException, OSError) as err:
        raise StoreMismatchError(f"{file}: not a readable Parquet shard ({_first_line(err)}); featurize again") \
            from None


def read_shard(
    file: str | Path, groups: Sequence[str], meta_names: Sequence[str] = ()
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(sample_ids [n], {group: [n, k_g]}, {meta: [n]})`` of one shard file (no verification).

    The one place shards are read: a file that is no shard of this layout is a one-line
    ``StoreMismatchError``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["sample_id", *(FEATURE_PREFIX + g for g in groups), *(META_PREFIX + m for m in meta_names)]
    try:
        table = pq.read_table(file, columns=columns)
        ids = table.column("sample_id").to_numpy()
        feats = {g: _fixed_list_to_numpy(table.column(FEATURE_PREFIX + g)) for g in groups}
        meta = {m: table.column(META_PREFIX + m).to_numpy(zero_copy_only=False) for m in meta_names}
    except (pa.ArrowException, OSError, KeyError, AttributeError, ValueError, TypeError) as err:
        raise StoreMismatchError(f"{file}: not a readable Parquet shard of this store ({_first_line(err)}); "
                                 "featurize again") from None
    return ids, feats, meta


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _fixed_list_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    width = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


# -- score matrices (query --all) ----------------------------------------------------------------
SCORE_FORMATS = (".npy", ".parquet")


def score_ids_path(path: str | Path) -> Path:
    """Where the sample ids of a ``.npy`` score matrix go: ``scores.npy`` → ``scores.sample_ids.npy``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.sample_ids.npy")


def check_score_path(path: str | Path) -> Path:
    """``path`` if a score matrix can be written there (checked before any work), else a one-line error."""
    path = Path(path)
    if path.suffix not in SCORE_FORMATS:
        raise ConfigError(f"--out {path}: expected a file name ending in .npy or .parquet")
    if path.is_dir():
        raise ConfigError(f"--out {path}: is a directory; give a file name ending in .npy or .parquet")
    if not path.parent.is_dir():
        raise ArtifactNotFoundError(f"--out {path}: no folder {path.parent}")
    return path


def write_score_matrix(path: str | Path, num_queries: int, num_samples: int,
                       blocks: Iterator[tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write a full score matrix from ``(sample_ids [b], scores [num_queries, b])`` blocks, in store order.

    ``.npy``: ``[num_queries, num_samples]`` float32, the sample ids ``[num_samples]`` int64 in
    ``<stem>.sample_ids.npy`` beside it. ``.parquet``: one row per training example, columns
    ``sample_id`` (int64) and ``scores`` (fixed-size list of ``num_queries`` float32: the
    transpose, the store's own layout). Both are written under temporary names and renamed
    when complete (the ids first), so an interrupted write never leaves a complete-looking file.
    """
    path = check_score_path(path)
    if num_queries < 1:
        raise ConfigError("score matrix: no queries")
    tmp = temporary_path(path)
    ids_tmp = temporary_path(score_ids_path(path))
    try:
        if path.suffix == ".npy":
            matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(num_queries, num_samples))
            if hasattr(os, "posix_fallocate"):  # a full disk is an OSError now, not a SIGBUS mid-write
                with open(tmp, "r+b") as handle:
                    os.posix_fallocate(handle.fileno(), 0, os.path.getsize(tmp))
            ids = np.zeros(num_samples, np.int64)
            start = 0
            for block_ids, scores in blocks:
                stop = start + len(block_ids)
                if stop > num_samples or scores.shape != (num_queries, len(block_ids)):
                    raise StoreMismatchError(f"score block of shape {scores.shape} at column {start} does not fit "
                                             f"[{num_queries}, {num_samples}]")
                matrix[:, start:stop] = scores
                ids[start:stop] = block_ids
                start = stop
            if start != num_samples:
                raise StoreMismatchError(f"score matrix: {start} columns written, expected {num_samples}")
            matrix.flush()
            del matrix
            with open(ids_tmp, "wb") as handle:
                np.save(handle, ids)
            path.unlink(missing_ok=True)  # never an old matrix beside the new ids
            os.replace(ids_tmp, score_ids_path(path))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([("sample_id", pa.int64()), ("scores", pa.list_(pa.float32(), num_queries))])
            rows = 0
            with pq.ParquetWriter(tmp, schema, compression="none") as writer:
                for block_ids, scores in blocks:
                    columns = np.ascontiguousarray(np.asarray(scores, np.float32).T)
                    writer.write_table(pa.table({
                        "sample_id": pa.array(np.asarray(block_ids, np.int64)),
                        "scores": pa.FixedSizeListArray.from_arrays(pa.array(columns.reshape(-1)), num_queries),
                    }, schema=schema))
                    rows += len(block_ids)
            if rows != num_samples:
                raise StoreMismatchError(f"score table: {rows} rows written, expected {num_samples}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        ids_tmp.unlink(missing_ok=True)
    return path
