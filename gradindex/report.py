"""PNG reports (matplotlib, Agg).

* :func:`write_topk_grid`: each query beside its top-k training examples, captioned.
  In: rows of ``(query image, query caption, [(image, caption), ...])``; images are
  ``[H, W]`` (grayscale) or ``[H, W, 3]`` arrays.
* :func:`write_weights_chart`: group weights as bars, one panel per concept.
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
    return _save(fig, path)


def write_weights_chart(path: str | Path, weights: Sequence, groups: Sequence[str]) -> Path:
    """Bar chart of group weights, one panel per concept (``weights``: GroupWeights).

    Bars are the weights relative to their mean (1 = the uniform weight, log
    scale); a learned concept's title says its preconditioner and how its
    objective moved from uniform.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
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
        info = concept_weights.info
        title = f"concept {concept_weights.concept!r}: {info.get('method', 'uniform')}"
        if "config" in info:
            title += f", {info['config']['preconditioner']}"
        if "snr_learned" in info:
            title += f", mean SNR {info['snr_uniform']:.2f} → {info['snr_learned']:.2f}"
        ax.set_title(title, fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

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
