"""Hold-out tasks for the quality suite: user-style tasks that no default was chosen on.

    python tools/bench_quality.py --tasks tools/holdout_tasks.py:ResMLPDigits tools/holdout_tasks.py:GeneratedClassification \
        tools/holdout_tasks.py:FriedmanRegression

Written the way a new user writes a task (a ``Task`` subclass in a file, nothing built in), to check
that the defaults chosen on the built-in suite transfer:

* ``ResMLPDigits``: a residual MLP with LayerNorm (3 blocks) on scikit-learn's digits, trained with Adam;
* ``GeneratedClassification``: an MLP on ``make_classification`` (800 examples, 20 features, 4 classes);
* ``FriedmanRegression``: an MLP regression on ``make_friedman1`` (800 examples, 10 features), squared
  error loss, the prediction as the measurement.

Each trains in a few seconds on one core; 75 % of the examples train, the rest are the queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradindex.task import Task
from gradindex.tasks.checkpoints import gradindex_home, load_or_train, save_checkpoint
from gradindex.tasks.training import seeded_model, train_epochs


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class _ResMLP(nn.Module):
    def __init__(self, inputs: int, outputs: int, width: int = 64, blocks: int = 3):
        super().__init__()
        self.stem = nn.Linear(inputs, width)
        self.blocks = nn.Sequential(*[_Block(width) for _ in range(blocks)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))))


def _mlp(inputs: int, outputs: int, width: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, outputs))


class _Tabular(Task):
    """Shared: fixed split, seeded Adam training, checkpoints under $GRADINDEX_HOME/holdout."""

    name = ""
    epochs, lr, batch_size = 60, 3e-3, 32

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.options = {"seed": self.seed}
        self._data: dict[str, np.ndarray] | None = None

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def build(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def data(self) -> dict[str, np.ndarray]:
        if self._data is None:
            x, y = self.load()
            x = ((x - x.mean(0)) / x.std(0).clip(1e-6)).astype(np.float32)
            order = np.random.default_rng(0).permutation(len(x))
            cut = int(0.75 * len(x))
            self._data = {"x_train": x[order[:cut]], "y_train": y[order[:cut]],
                          "x_test": x[order[cut:]], "y_test": y[order[cut:]]}
        return self._data

    def default_checkpoint(self) -> Path:
        return gradindex_home() / "holdout" / f"{self.name}-seed{self.seed}.pt"

    def train(self, path: str | Path | None = None, indices: Sequence[int] | None = None,
              seed: int | None = None) -> Path:
        seed = self.seed if seed is None else seed
        rows = np.arange(len(self.data["x_train"])) if indices is None else np.asarray(indices)
        xs, ys = torch.from_numpy(self.data["x_train"][rows]), torch.from_numpy(self.data["y_train"][rows])
        model = seeded_model(self.build, seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        train_epochs(model, lambda rows: self.loss(model(xs[rows]), ys[rows]).mean(), len(xs), self.epochs,
                     self.batch_size, seed, optimizer)
        return save_checkpoint(model, self.name, path or self.default_checkpoint())

    def load_model(self, checkpoint: str | Path | None) -> nn.Module:
        return load_or_train(self, checkpoint, self.build, self.name, self.name, "train it with task.train()")

    def train_dataset(self) -> Sequence:
        return torch.utils.data.TensorDataset(torch.from_numpy(self.data["x_train"]),
                                              torch.from_numpy(self.data["y_train"]))

    def query_dataset(self) -> Sequence:
        return torch.utils.data.TensorDataset(torch.from_numpy(self.data["x_test"]),
                                              torch.from_numpy(self.data["y_test"]))

    def compute_train_loss(self, batch, model: nn.Module) -> torch.Tensor:
        x, y = batch
        return self.loss(model(x), y)


class _Classifier(_Tabular):
    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="none")

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        true = logits.gather(1, y[:, None])[:, 0]
        others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -torch.inf)
        return true - torch.logsumexp(others, dim=1)


class ResMLPDigits(_Classifier):
    name = "resmlp-digits"
    epochs = 30

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.data.astype(np.float32), digits.target.astype(np.int64)

    def build(self) -> nn.Module:
        return _ResMLP(64, 10)


class GeneratedClassification(_Classifier):
    name = "generated-classification"

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import make_classification

        x, y = make_classification(n_samples=800, n_features=20, n_informative=8, n_classes=4, flip_y=0.05,
                                   random_state=0)
        return x.astype(np.float32), y.astype(np.int64)

    def build(self) -> nn.Module:
        return _mlp(20, 4)


class FriedmanRegression(_Tabular):
    name = "friedman-regression"

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import make_friedman1

        x, y = make_friedman1(n_samples=800, n_features=10, noise=1.0, random_state=0)
        return x.astype(np.float32), ((y - y.mean()) / y.std()).astype(np.float32)

    def build(self) -> nn.Module:
        return _mlp(10, 1)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out[:, 0] - y) ** 2

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        x, _ = batch
        return model(x)[:, 0]
