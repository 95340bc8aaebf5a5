"""What the built-in classification tasks share: the margin measurement and labelled query items.

* :func:`margin`: ``logit_y − logsumexp_{j≠y} logit_j`` per example ``[B]`` (TRAK's choice
  of measurement); a label ``-1`` is measured at the model's own prediction.
* :func:`check_labels`: one clear error for a query file's labels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gradindex.errors import ConfigError


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example margin ``[B]`` of ``labels [B]`` under ``logits [B, C]`` (``-1``: the arg-max class)."""
    labels = torch.where(labels < 0, logits.argmax(1), labels)
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), -torch.inf)
    return true - torch.logsumexp(others, dim=1)


def sampled_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy ``[...]`` of ``logits [..., C]`` against classes drawn from their own softmax
    (the true Fisher's pseudo-labels; ``torch`` global RNG)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    with torch.no_grad():
        drawn = torch.multinomial(torch.softmax(flat, dim=-1), 1)[:, 0]
    return F.cross_entropy(flat, drawn, reduction="none").reshape(logits.shape[:-1])


def check_labels(y: np.ndarray | None, count: int, classes: int, where: str) -> np.ndarray:
    """Labels ``[count]`` int64 in ``-1..classes-1`` (``None``: all ``-1``), or a ConfigError naming ``where``."""
    if y is None:
        return np.full(count, -1, dtype=np.int64)
    y = np.asarray(y).reshape(-1)
    if len(y) != count or not np.issubdtype(y.dtype, np.integer) or ((y < -1) | (y >= classes)).any():
        raise ConfigError(f"{where}: 'y' must hold {count} labels in 0..{classes - 1} "
                          "(or -1 for the model's prediction)")
    return y.astype(np.int64)
