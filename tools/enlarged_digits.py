"""A procedurally enlarged digits training set (for index-scale benchmarks).

``EnlargedDigits(size=1_000_000, seed=0)`` is the built-in digits task (same MLP and
checkpoint: trained on the 1437 original training digits) whose *training set*
is ``size`` augmented copies of those digits: each copy is a random original
under a random affine jitter (rotation ±15°, scale 0.85–1.15, shear ±0.15, shift
±1 px, bilinear), a random contrast factor 0.7–1.3 and Gaussian pixel noise
(σ 0.05), clipped to [0, 1]; it keeps its original's label. The queries are the
held-out digits under the same augmentation (another seed).

Featurize it once and reuse the store::

    python -m gradindex featurize tools/enlarged_digits.py:EnlargedDigits \\
        --task-option size=1000000 --out /tmp/index-scale-data/store --dtype float16 --shard-size 100000
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gradindex.tasks.digits import DigitsTask


def augment(x: np.ndarray, count: int, seed: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """``(images [count, 64] float32 in [0, 1], source rows [count])``: jittered copies of rows of ``x [m, 64]``."""
    rng = np.random.default_rng(seed)
    source = rng.integers(0, len(x), size=count)
    out = np.empty((count, 64), np.float32)
    base = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1, 8, 8)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        angle = rng.uniform(-np.pi / 12, np.pi / 12, n)
        scale = rng.uniform(0.85, 1.15, n)
        shear = rng.uniform(-0.15, 0.15, n)
        shift = rng.uniform(-0.25, 0.25, (n, 2))  # grid units: 1 px = 2/8
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        theta = np.zeros((n, 2, 3), np.float32)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos, -sin + shear, shift[:, 0]
        theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin, cos, shift[:, 1]
        images = base[source[start:start + n]]
        grid = F.affine_grid(torch.from_numpy(theta), list(images.shape), align_corners=False)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        warped = warped.reshape(n, 64).numpy()
        warped *= rng.uniform(0.7, 1.3, (n, 1)).astype(np.float32)
        warped += rng.normal(0, 0.05, warped.shape).astype(np.float32)
        out[start:start + n] = np.clip(warped, 0.0, 1.0)
    return out, source


class EnlargedDigits(DigitsTask):
    """The digits MLP with ``size`` augmented training examples (see the module docstring)."""

    def __init__(self, size: int = 1_000_000, seed: int = 0, arch: str = "mlp", query_size: int = 2000):
        super().__init__(arch=arch, seed=0)
        self.size = int(size)
        self.data_seed = int(seed)
        self.query_size = int(query_size)
        self.options = {"size": self.size, "seed": self.data_seed, "arch": arch, "query_size": self.query_size}
        self._train = None

    def train_dataset(self) -> Sequence:
        if self._train is None:
            x, source = augment(self.split["x_train"], self.size, self.data_seed)
            y = self.split["y_train"][source]
            self._train = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        return self._train

    def query_dataset(self) -> Sequence:
        x, source = augment(self.split["x_test"], self.query_size, self.data_seed + 1_000_003)
        y = self.split["y_test"][source]
        return torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
