"""PNG reports: each query beside its top-k training examples, captioned.

In: rows of ``(query image, query caption, [(image, caption), ...])``; images are
``[H, W]`` (grayscale) or ``[H, W, 3]`` arrays. Out: a PNG file (matplotlib, Agg).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gradindex.store import temporary_path

Row = tuple[np.ndarray, str, Sequence[tuple[np.ndarray, str]]]


def write_topk_grid(path: str | Path, rows: Sequence[Row], title: str = "") -> Path:
    """One row per query: the query, then its top-k training examples (rank order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    columns = 1 + max(len(hits) for _, _, hits in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.5 * columns, 1.7 * len(rows)), squeeze=False)
    for r, (image, caption, hits) in enumerate(rows):
        panels = [(image, f"query\n{caption}")] + [(img, f"#{i + 1} {cap}") for i, (img, cap) in enumerate(hits)]
        for c in range(columns):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(panels):
                img, cap = panels[c]
                ax.imshow(img, cmap="gray_r" if np.ndim(img) == 2 else None, interpolation="nearest")
                ax.set_title(cap, fontsize=7, color="tab:blue" if c == 0 else "black")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
