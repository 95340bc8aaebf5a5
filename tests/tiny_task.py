"""A tiny seeded task for the tests: 40 points in R^4, three classes, a 4-6-3 MLP.

Loadable as ``tests/tiny_task.py:TinyTask`` (file spec) and ``tiny_task:TinyTask``
(module spec, with tests/ on sys.path).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradindex.errors import ArtifactNotFoundError, ConfigError
from gradindex.task import Task

N_TRAIN, N_QUERY = 40, 8


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_TRAIN + N_QUERY, 4)).astype(np.float32)
    y = (x @ np.array([[1.0, -1, 0], [0, 1, -1], [1, 0, 1], [-1, 1, 0]], dtype=np.float32)).argmax(1)
    return x, y.astype(np.int64)


def build_model() -> nn.Module:
    return nn.Sequential(OrderedDict([("hidden", nn.Linear(4, 6)), ("act", nn.Tanh()), ("out", nn.Linear(6, 3))]))


class TinyTask(Task):
    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.options = {"seed": self.seed}
        self.x, self.y = _data(self.seed)

    def train(self, path, indices=None, seed=0):
        rows = np.arange(N_TRAIN) if indices is None else np.asarray(indices)
        torch.manual_seed(seed)
        model = build_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        x, y = torch.from_numpy(self.x[rows]), torch.from_numpy(self.y[rows])
        for _ in range(60):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        return Path(path)

    def load_model(self, checkpoint):
        if checkpoint is None:
            checkpoint = Path(os.environ["GRADINDEX_HOME"]) / f"tiny-{self.seed}.pt"
            if not checkpoint.exists():
                self.train(checkpoint)
        if not Path(checkpoint).is_file():
            raise ArtifactNotFoundError(f"no checkpoint at {checkpoint}")
        model = build_model()
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        return model.eval()

    def train_dataset(self):
        return torch.utils.data.TensorDataset(torch.from_numpy(self.x[:N_TRAIN]), torch.from_numpy(self.y[:N_TRAIN]))

    def query_dataset(self):
        return torch.utils.data.TensorDataset(torch.from_numpy(self.x[N_TRAIN:]), torch.from_numpy(self.y[N_TRAIN:]))

    def metadata(self, dataset):
        return {"label": dataset.tensors[1].numpy()}

    def sample_ids(self, dataset):
        return np.arange(len(dataset), dtype=np.int64) * 10 + 1000  # not positions, on purpose

    def load_queries(self, path):
        with np.load(path) as data:
            x, y = data["x"], data["y"]
        if x.ndim != 2 or x.shape[1] != 4:
            raise ConfigError(f"{path}: expected x of shape [n, 4], got {tuple(x.shape)}")
        return torch.utils.data.TensorDataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)))

    def compute_train_loss(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")

    def describe(self, item):
        return f"label {int(item[1])}"


class CrashingTask(TinyTask):
    """Fails on the n-th training-loss call: an interrupted featurize."""

    def __init__(self, crash_at: int):
        super().__init__()
        self.calls, self.crash_at = 0, crash_at

    def compute_train_loss(self, batch, model):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated interruption")
        return super().compute_train_loss(batch, model)
