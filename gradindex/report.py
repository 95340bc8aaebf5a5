"""PNG reports: each query beside its top-k training examples, captioned.

* :func:`write_topk_grid`: rows of ``(query image, query caption, [(image, caption), ...])``,
  one figure row per query.
* :func:`write_concept_grid`: rows of ``(query image, query caption, {concept: [(image,
  caption, match), ...]})``, one figure row per query and concept: the query, then its
  top-k under that concept's partition; ``match`` (the hit shares the query's value of
  the concept) colours the caption green, a miss red.

Images are ``[H, W]`` (grayscale) or ``[H, W, 3]`` arrays. Out: a PNG file (matplotlib, Agg),
written under a temporary name and renamed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.store import temporary_path

Row = tuple[np.ndarray, str, Sequence[tuple[np.ndarray, str]]]
ConceptRow = tuple[np.ndarray, str, Mapping[str, Sequence[tuple[np.ndarray, str, bool]]]]
QUERY_COLOR = "tab:blue"
PANEL_WIDTH, PANEL_HEIGHT = 1.5, 1.7


def write_topk_grid(path: str | Path, rows: Sequence[Row], title: str = "") -> Path:
    """One row per query: the query, then its top-k training examples (rank order)."""
    columns = 1 + max(len(hits) for _, _, hits in rows)
    fig, axes = _figure(len(rows), columns)
    for r, (image, caption, hits) in enumerate(rows):
        _panel(axes[r, 0], image, f"query\n{caption}", QUERY_COLOR)
        for i, (img, cap) in enumerate(hits):
            _panel(axes[r, 1 + i], img, f"#{i + 1} {cap}", "black")
    return _save(fig, path, title)


def write_concept_grid(path: str | Path, rows: Sequence[ConceptRow], title: str = "") -> Path:
    """Per query, one row per concept: the query, then its top-k for that concept."""
    lines = [(image, caption, concept, hits) for image, caption, per_concept in rows
             for concept, hits in per_concept.items()]
    columns = 1 + max(len(hits) for *_, hits in lines)
    fig, axes = _figure(len(lines), columns)
    for r, (image, caption, concept, hits) in enumerate(lines):
        _panel(axes[r, 0], image, f"{caption}\n→ {concept}", QUERY_COLOR)
        for i, (img, cap, match) in enumerate(hits):
            _panel(axes[r, 1 + i], img, f"#{i + 1} {cap}", "tab:green" if match else "tab:red")
    return _save(fig, path, title)


def _figure(rows: int, columns: int) -> tuple[Any, np.ndarray]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, columns, figsize=(PANEL_WIDTH * columns, PANEL_HEIGHT * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def _panel(ax: Any, image: np.ndarray, caption: str, color: str) -> None:
    ax.imshow(image, cmap="gray_r" if np.ndim(image) == 2 else None, interpolation="nearest")
    ax.set_title(_wrap(caption), fontsize=7, color=color)


def _wrap(caption: str, width: int = 18) -> str:
    """Break long captions at spaces so they fit above a panel."""
    lines, line = [], ""
    for line_part in caption.split("\n"):
        for word in line_part.split(" "):
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
        line = ""
    return "\n".join(lines)


def _save(fig: Any, path: str | Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
