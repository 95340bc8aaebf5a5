"""Reading query input files with one-line errors (the tasks' ``load_queries`` use these).

In: a path to a ``.npz`` / ``.npy`` file. Out: its arrays (``{name: ndarray}`` or one
``ndarray``), read eagerly and without pickles. A missing, empty, truncated or
corrupt file, or one holding Python objects, is an
:class:`~gradindex.errors.ArtifactNotFoundError` / :class:`~gradindex.errors.ConfigError`
naming the file, never a traceback.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gradindex.errors import ArtifactNotFoundError, ConfigError

#: What numpy raises on a file that is not a valid .npz/.npy (empty, truncated, not a zip, pickled data).
READ_ERRORS = (ValueError, OSError, EOFError, KeyError, IndexError, zipfile.BadZipFile, zlib.error,
               NotImplementedError, MemoryError)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ArtifactNotFoundError(f"no query inputs file at {path}")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path}: the file is empty")
    return path


def read_npz(path: str | Path, what: str = "arrays") -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``; ``what`` names the expected content in errors."""
    path = _existing(path)
    try:
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as handle:
                single = handle.read(6) == b"\x93NUMPY"
            raise ConfigError(f"{path}: expected a .npz archive of {what}, found a single array" if single else
                              f"{path}: not a readable .npz of {what} (not a zip archive)")
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.filename.endswith(".npy"):
                    with archive.open(member) as handle:
                        _check_header(handle, member.file_size, f"{path}[{member.filename}]")
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ConfigError(f"{path}: expected a .npz archive of {what}, found a single array")
            return {name: np.asarray(data[name]) for name in data.files}
    except ConfigError:
        raise
    except READ_ERRORS as err:
        raise ConfigError(f"{path}: not a readable .npz of {what} ({_reason(err)})") from None


def read_npy(path: str | Path, what: str = "an array") -> np.ndarray:
    """The one array of the ``.npy`` at ``path``."""
    path = _existing(path)
    try:
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as handle:
                _check_header(handle, path.stat().st_size, str(path))
        data = np.load(path, allow_pickle=False)
    except ConfigError:
        raise
    except READ_ERRORS as err:
        raise ConfigError(f"{path}: not a readable .npy of {what} ({_reason(err)})") from None
    if not isinstance(data, np.ndarray):
        data.close()
        raise ConfigError(f"{path}: expected a .npy array of {what}, found a .npz archive")
    return data


def _check_header(handle: BinaryIO, size: int, name: str) -> None:
    """A one-line error when the ``.npy`` header at the start of ``handle`` declares more data than the
    ``size`` bytes the file holds (a 400-byte file declaring shape (2^40, 64) would make numpy allocate
    it first: a MemoryError)."""
    version = np.lib.format.read_magic(handle)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(handle, max_header_size=10_000)
    if dtype.hasobject:
        return  # np.load refuses it (allow_pickle=False) with its own error
    declared = math.prod(shape) * dtype.itemsize
    if declared > size - handle.tell():
        raise ConfigError(f"{name}: the .npy header declares shape {shape} of {dtype} ({declared:,} bytes) but "
                          f"the file holds {max(size - handle.tell(), 0):,} bytes of data; it is damaged or crafted")


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def resample_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image [H, W(, C)]`` at ``[height, width(, C)]``: each output pixel the mean of the input block it
    covers (area averaging when shrinking; nearest pixel when the input is smaller)."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
        raise ConfigError(f"image: expected [H, W] or [H, W, 3] pixels, got shape {image.shape}")

    def blocks(size: int, target: int) -> list[np.ndarray]:
        if size >= target:
            return np.array_split(np.arange(size), target)
        return [np.array([i * size // target]) for i in range(target)]

    rows, cols = blocks(image.shape[0], height), blocks(image.shape[1], width)
    return np.array([[image[np.ix_(r, c)].mean(axis=(0, 1)) for c in cols] for r in rows])


def json_array(value: Any, where: str) -> np.ndarray:
    """A JSON value (nested lists of numbers, or of strings) as a numpy array; ragged or mixed → ConfigError."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: not a rectangular array ({err})") from None
    if array.dtype == object or array.dtype.kind not in "biufU":
        raise ConfigError(f"{where}: expected a rectangular array of numbers or strings")
    return array
