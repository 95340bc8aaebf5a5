"""Full score matrices (``gradindex query --all --out``): ``[num_queries, num_samples]`` float32
written block by block as ``.npy`` (sample ids beside it) or ``.parquet`` (one row per training example)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gradindex.errors import ArtifactNotFoundError, ConfigError, StoreMismatchError
from gradindex.store.storage import temporary_path

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
