"""Parquet shards of a feature store: write one, recognise a finished one, read one back.

A shard ``shards/part-<i>.parquet`` holds ``sample_id`` (int64), one fixed-size-list column per
group (``"grad:<group>"``, ``[n, k_g]`` float32 or float16) and metadata columns (``"meta:<name>"``,
``[n]``); its sidecar ``shards/part-<i>.json`` records rows, sha256, byte size and run key
(:class:`ShardInfo`). :func:`write_shard` writes both (the shard under a temporary name, then
renamed); :func:`read_shard` is the one place shard files are read. The store around them
(manifest, locks, :class:`~gradindex.store.feature_store.FeatureStore`) is
:mod:`gradindex.store.feature_store`; the layout is described there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from gradindex.errors import StoreMismatchError
from gradindex.store.storage import Storage, open_storage, sha256_file

if TYPE_CHECKING:  # pyarrow is imported where shards are read or written: `info` reads only the manifest
    import pyarrow as pa

SHARD_DIR = "shards"
FEATURE_PREFIX = "grad:"
META_PREFIX = "meta:"
ROW_GROUP_ROWS = 4096


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


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


def sidecar_name(relative: str) -> str:
    return str(PurePosixPath(relative).with_suffix(".json"))


def write_shard(
    store: str | Path | Storage,
    index: int,
    sample_ids: np.ndarray,
    features: Mapping[str, np.ndarray],
    metadata: Mapping[str, np.ndarray] | None = None,
    run_key: str = "",
) -> ShardInfo:
    """Write one shard (temp name → rename; on object storage one PUT of the finished file), then
    its sidecar; return its :class:`ShardInfo`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage = open_storage(store)
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
    tmp = storage.temporary(relative)
    try:
        pq.write_table(table, tmp, compression="none", row_group_size=ROW_GROUP_ROWS)
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        storage.publish(tmp, relative)
    finally:
        tmp.unlink(missing_ok=True)
    info = ShardInfo(relative, rows, digest, size, run_key)
    storage.write_bytes(sidecar_name(relative), json_bytes(info.to_dict()))
    return info


def completed_shard(store: str | Path | Storage, index: int, run_key: str) -> ShardInfo | None:
    """The shard's info if it was completely written by a run with ``run_key`` and verifies
    (on object storage: its size; a PUT is whole, and readers check the sha256)."""
    storage = open_storage(store)
    relative = shard_name(index)
    sidecar = sidecar_name(relative)
    if not (storage.is_file(relative) and storage.is_file(sidecar)):
        return None
    try:
        info = ShardInfo(**json.loads(storage.read_bytes(sidecar)))
    except (ValueError, TypeError):
        return None
    if info.run_key != run_key or not storage.written(relative, info.bytes, info.sha256):
        return None
    return info


def read_written_shard(store: str | Path | Storage, info: ShardInfo,
                       groups: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read back a shard this writer (or a resumed run of it) wrote: ``read_shard`` of its local file
    (on object storage a verified copy in the cache)."""
    storage = open_storage(store)
    file = storage.fetch(info.path, info.sha256, False, f"{storage}: shard {info.path} is missing",
                         f"{storage}: checksum mismatch in {info.path}; featurize again", "shard")
    return read_shard(file, groups)


def remove_temporaries(store: str | Path | Storage) -> list[Path]:
    """Delete the temporary files a killed writer left in the store's root and shard folder
    (call with the writer lock held; object storage holds none)."""
    return open_storage(store).remove_temporaries(["", SHARD_DIR])


def remove_unlisted_shards(store: str | Path | Storage, manifest: Mapping[str, Any]) -> None:
    """Delete shard files (and sidecars) the manifest does not list: an interrupted append's."""
    storage = open_storage(store)
    listed = {PurePosixPath(s["path"]).name for s in manifest["shards"]}
    for name in storage.names(SHARD_DIR, "part-*"):
        if str(PurePosixPath(name).with_suffix(".parquet")) not in listed:
            storage.delete(f"{SHARD_DIR}/{name}")


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
