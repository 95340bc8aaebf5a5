"""Attribution baselines that use no gradient: caption search and image similarity.

Each returns scores ``[n, N]`` of ``n`` queries against the ``N`` training examples (higher =
ranked first), for :mod:`gradindex.eval.ranking`:

* :func:`caption_scores` — keyword match: 1 where the training caption names the query's value
  of a concept, 0 elsewhere, ties broken at random (seeded noise below the match gap). A query
  that names no value (an image-only query) gets the random order alone.
* :func:`pixel_scores` — nearest neighbours in pixel space, ``−‖q − x‖²``.
* :func:`random_feature_scores` — cosine similarity in a fixed random-feature embedding: a
  seeded, untrained two-layer conv net (3×3 convolutions, ReLU, global average pooling), so that
  "similar" means similar local colour and texture statistics anywhere in the image.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gradindex.errors import ConfigError


def caption_scores(train_values: np.ndarray, train_named: np.ndarray, query_values: np.ndarray,
                   seed: int = 0) -> np.ndarray:
    """Keyword-match scores ``[n, N]``: ``train_values [N]`` (the training images' value names),
    ``train_named [N]`` (bool: the caption names the value), ``query_values [n]`` (the value the query's
    prompt names, ``""``: none). Ties are broken by seeded uniform noise in ``[0, 0.5)``."""
    train_values = np.asarray(train_values)
    train_named = np.asarray(train_named, dtype=bool)
    query_values = np.asarray(query_values)
    if train_values.shape != train_named.shape or train_values.ndim != 1 or query_values.ndim != 1:
        raise ConfigError(f"caption scores: train values {train_values.shape}, named {train_named.shape} and "
                          f"query values {query_values.shape} must be 1-d, the first two of one length")
    match = (query_values[:, None] == train_values[None, :]) & train_named[None, :] & (query_values[:, None] != "")
    noise = np.random.default_rng([seed, 31]).random((len(query_values), len(train_values))) * 0.5
    return match + noise


def pixel_scores(queries: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``−‖q − x‖²`` ``[n, N]`` over flattened images (``[n, ...]`` and ``[N, ...]``, any numeric dtype)."""
    q = _flat(queries)
    x = _flat(train)
    if q.shape[1] != x.shape[1]:
        raise ConfigError(f"pixel scores: query images {queries.shape[1:]} and training images {train.shape[1:]} differ")
    return -((q * q).sum(1)[:, None] - 2 * q @ x.T + (x * x).sum(1)[None, :])


def random_features(images: np.ndarray, seed: int = 0, width: int = 64, batch_size: int = 512) -> np.ndarray:
    """Unit-norm embeddings ``[n, 2·width]`` of uint8 images ``[n, H, W, 3]`` by a seeded random conv net."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"random features: expected images [n, H, W, 3], got {images.shape}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.asarray(images[start:start + batch_size])).permute(0, 3, 1, 2).float()
            out.append(net(batch / 127.5 - 1))
    features = torch.cat(out).numpy() if out else np.zeros((0, 2 * width), np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def random_feature_scores(queries: np.ndarray, train: np.ndarray, seed: int = 0) -> np.ndarray:
    """Cosine similarities ``[n, N]`` in :func:`random_features` (the same net for both sides)."""
    return random_features(queries, seed) @ random_features(train, seed).T


def _flat(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, dtype=np.float64)
    return images.reshape(len(images), -1)
