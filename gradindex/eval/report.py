"""PNG reports: each query beside its top-k training examples, captioned.

* :func:`write_topk_grid`: rows of ``(query image, query caption, [(image, caption), ...])``,
  one figure row per query.
* :func:`write_concept_grid`: rows of ``(query image, query caption, {concept: [(image,
  caption, match), ...]})``, one figure row per query and concept: the query, then its
  top-k under that concept's partition; ``match`` (the hit shares the query's value of
  the concept) colours the caption green, a miss red.
* :func:`write_weights_chart`: group weights as bars, one panel per concept.

Images are ``[H, W]`` (grayscale) or ``[H, W, 3]`` arrays. Out: a PNG file (matplotlib, Agg),
written under a temporary name and renamed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import ConfigError
from gradindex.store.feature_store import temporary_path

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


def write_weights_chart(path: str | Path, weights: Sequence, groups: Sequence[str]) -> Path:
    """Bar chart of group weights, one panel per concept (``weights``: GroupWeights).

    Bars are the weights relative to their mean (1 = the uniform weight, log
    scale); a learned concept's title says its preconditioner and how its
    objective moved from uniform.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(weights), 1, figsize=(max(4.0, 0.45 * len(groups) + 1.5), 2.6 * len(weights)),
                             squeeze=False)
    for ax, concept_weights in zip(axes[:, 0], weights):
        values = np.array([concept_weights.weights[g] for g in groups], dtype=float)
        relative = values / values.mean() if values.mean() > 0 else values
        ax.bar(range(len(groups)), np.maximum(relative, 1e-6), color="tab:blue")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("weight / mean", fontsize=8)
        ax.set_title(f"concept {concept_weights.concept!r}: {concept_weights.provenance()}", fontsize=8)
    return _save(fig, path, "")



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


#: image formats a figure is written in, by the file's suffix (no suffix: PNG)
FIGURE_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", "": "png"}


def figure_format(path: Path) -> str:
    """The image format ``path``'s suffix names (``w.svg`` is an SVG, never PNG bytes), or a one-line error."""
    suffix = path.suffix.lower()
    if suffix not in FIGURE_FORMATS:
        raise ConfigError(f"--out {path}: expected a file name ending in .png, .svg or .pdf, got {suffix!r}")
    return FIGURE_FORMATS[suffix]


def _save(fig: Any, path: str | Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    top = 1.0
    if title:
        fig.suptitle(title, fontsize=9)
        top = 1 - 0.3 / fig.get_figheight()  # keep 0.3 in free for the title
    fig.tight_layout(rect=(0, 0, 1, top))
    path = Path(path)
    image_format = figure_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        fig.savefig(tmp, dpi=110, format=image_format)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
