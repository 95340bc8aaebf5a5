"""The feature store: Parquet shards + ``manifest.json`` (the only pyarrow importer).

Layout of a store directory::

    manifest.json            written last; a store without it is incomplete
    shards/part-00000.parquet  sample_id int64, one fixed-size-list column per group
                               ("grad:<group>", float32 or float16) and metadata
                               columns ("meta:<name>")
    shards/part-00000.json   the shard's sidecar: rows, sha256, byte size, run key
    gram.npz                 per-group Gram matrices G_g = ΦᵀΦ/N, key "g<i>" = i-th group
    indexes/<concept>/       FAISS index parts of a concept (written by gradindex.index; layout in gradindex.index.shards)

Every file is written under a temporary name and renamed when complete. The
manifest records each file's sha256, and readers verify a shard's checksum
before trusting its rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradindex.errors import ArtifactNotFoundError, ConfigError, StoreMismatchError

if TYPE_CHECKING:  # pyarrow is imported where shards are read or written: `info` reads only the manifest
    import pyarrow as pa

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
GRAM_FILE = "gram.npz"
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
    """Delete the temporary shard files a killed writer left behind (call with no writer running)."""
    leftovers = sorted((Path(store) / SHARD_DIR).glob(".*.tmp-*"))
    for file in leftovers:
        file.unlink(missing_ok=True)
    return leftovers


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
    """Make ``path`` ready for a new store. An existing complete store needs ``overwrite``.

    Overwriting first removes the manifest, so an interrupted rewrite never
    leaves something that looks complete. ``resume`` keeps verified shards.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"store path {path} exists and is not a directory")
    if (path / MANIFEST).exists():
        if not overwrite:
            raise ConfigError(f"{path} already holds a feature store; pass --overwrite to replace it")
        (path / MANIFEST).unlink()
    if path.exists() and not resume:
        for name in (SHARD_DIR, "indexes", GRAM_FILE):
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    (path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    return path


def write_arrays(path: str | Path, arrays: Mapping[str, np.ndarray]) -> str:
    """Save ``arrays`` as an ``.npz`` atomically; return its sha256."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def commit_manifest(path: str | Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` last: from here on the store is complete."""
    atomic_write_json(Path(path) / MANIFEST, {"format_version": FORMAT_VERSION, **manifest})


# -- reading a store ----------------------------------------------------------------------------
class FeatureStore:
    """A complete store opened for reading. ``FeatureStore.open(path)``."""

    def __init__(self, path: Path, manifest: dict[str, Any], verify: bool = True):
        self.path = path
        self.manifest = manifest
        self.verify = verify
        self._verified: set[str] = set()

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "FeatureStore":
        path = Path(path)
        if not path.is_dir():
            raise ArtifactNotFoundError(f"no feature store at {path} (run `gradindex featurize` first)")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactNotFoundError(
                f"{path} is an incomplete feature store (no {MANIFEST}): featurize was interrupted; run it again"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as err:
            raise StoreMismatchError(f"{manifest_path} is not valid JSON ({err})") from None
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreMismatchError(
                f"{path}: store format version {version!r}, this gradindex reads version {FORMAT_VERSION}; "
                "featurize again"
            )
        for shard in manifest["shards"]:
            file = path / shard["path"]
            if not file.is_file():
                raise ArtifactNotFoundError(f"{path}: shard {shard['path']} listed in the manifest is missing")
            if file.stat().st_size != shard["bytes"]:
                raise StoreMismatchError(
                    f"{path}: shard {shard['path']} has {file.stat().st_size} bytes, the manifest says "
                    f"{shard['bytes']}; the store is corrupt, featurize again"
                )
        return cls(path, manifest, verify)

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

    def update_manifest(self, update: Mapping[str, Any]) -> None:
        """Merge top-level keys into the manifest and rewrite it atomically."""
        self.manifest = {**self.manifest, **update}
        atomic_write_json(self.path / MANIFEST, self.manifest)

    # -- data -------------------------------------------------------------------------------------
    def _checked(self, shard: Mapping[str, Any]) -> Path:
        file = self.path / shard["path"]
        if self.verify and shard["path"] not in self._verified:
            if sha256_file(file) != shard["sha256"]:
                raise StoreMismatchError(
                    f"{self.path}: checksum mismatch in {shard['path']}; the shard was modified or corrupted, "
                    "featurize again"
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
        for shard in listed:
            ids, feats, meta = read_shard(self._checked(shard), groups, meta_names)
            if len(ids) != shard["rows"]:
                raise StoreMismatchError(f"{self.path}: {shard['path']} has {len(ids)} rows, expected {shard['rows']}")
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

    def read_gram(self) -> dict[str, np.ndarray]:
        info = self.manifest.get("gram")
        if not info:
            return {}
        file = self.path / GRAM_FILE
        if not file.is_file():
            raise ArtifactNotFoundError(f"{self.path}: {GRAM_FILE} listed in the manifest is missing")
        if sha256_file(file) != info["sha256"]:
            raise StoreMismatchError(f"{self.path}: checksum mismatch in {GRAM_FILE}; featurize again")
        with np.load(file) as data:
            return {group: data[f"g{i}"] for i, group in enumerate(self.groups) if f"g{i}" in data.files}


def read_shard(
    file: str | Path, groups: Sequence[str], meta_names: Sequence[str] = ()
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(sample_ids [n], {group: [n, k_g]}, {meta: [n]})`` of one shard file (no verification)."""
    import pyarrow.parquet as pq

    columns = ["sample_id", *(FEATURE_PREFIX + g for g in groups), *(META_PREFIX + m for m in meta_names)]
    table = pq.read_table(file, columns=columns)
    ids = table.column("sample_id").to_numpy()
    feats = {g: _fixed_list_to_numpy(table.column(FEATURE_PREFIX + g)) for g in groups}
    meta = {m: table.column(META_PREFIX + m).to_numpy(zero_copy_only=False) for m in meta_names}
    return ids, feats, meta


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
