"""Shared checks of the built-in tasks' tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pytest

from gradindex.errors import ArtifactNotFoundError, ConfigError


def assert_query_file_errors(task, tmp_path: Path, bad: Iterable[tuple[Mapping[str, np.ndarray], str]]) -> None:
    """``task.load_queries`` refuses each ``(arrays, message)`` of ``bad`` (saved as an ``.npz``) with a
    :class:`ConfigError` matching ``message``, a missing file with :class:`ArtifactNotFoundError`, and an
    empty or garbage file with a one-line :class:`ConfigError` (never a traceback)."""
    for arrays, message in bad:
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(ConfigError, match=message):
            task.load_queries(tmp_path / "bad.npz")
    with pytest.raises(ArtifactNotFoundError):
        task.load_queries(tmp_path / "none.npz")
    for content in (b"", b"not a zip archive"):
        (tmp_path / "broken.npz").write_bytes(content)
        with pytest.raises(ConfigError, match="empty|not a readable .npz"):
            task.load_queries(tmp_path / "broken.npz")
