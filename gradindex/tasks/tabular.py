"""Built-in tabular tasks: small MLPs on scikit-learn's bundled data sets (nothing is downloaded).

========================  ====================================  =========================================
task                      data (``sklearn.datasets``)           training loss / measurement
========================  ====================================  =========================================
``tabular-cancer``        ``load_breast_cancer``: 569 × 30,     cross-entropy / margin of the label
                          2 classes
``tabular-wine``          ``load_wine``: 178 × 13, 3 classes    cross-entropy / margin of the label
``tabular-diabetes``      ``load_diabetes``: 442 × 10,          squared error / the prediction
                          regression (disease progression)
========================  ====================================  =========================================

Split: a seeded permutation (:data:`SPLIT_SEED`) puts 75 % of the rows in the
training set and the rest in the held-out query set. Features are standardised
with the training rows' mean and standard deviation (so is the regression target);
query files give raw features, standardised the same way.

Model (:class:`MLP`): ``fc1 … fc<layers>`` (``nn.Linear`` + ReLU, width ``hidden``)
and a linear ``head``: one group per layer (4 groups by default). Training: seeded
Adam, mini-batches of 32, on one CPU thread, with a schedule per data set
(:data:`DATASETS`); about a second.

Regression measurement. The training loss of an example is its squared error
``(f(x) − y)²`` in standardised units. The default measurement of a query is the
**prediction** ``f(q)`` itself (``measurement="prediction"``): "which training rows
pushed this prediction up". It needs no label, and its gradient does not vanish or
flip sign when the model fits the query (the gradient of ``−(f(q) − y)²`` is
``−2(f(q) − y)∇f(q)``: zero at a perfect fit, its sign set by which side of the target
the prediction falls). ``measurement="neg_squared_error"`` gives the loss-based
``−(f(q) − y)²`` (needs labelled queries).

Query files: ``.npz`` with ``x [n, features]`` (raw values, as ``sklearn`` returns
them) and optional ``y`` (class labels, ``-1`` = the model's prediction; for the
regression, targets in the data set's units).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradindex.config import require_positive
from gradindex.errors import ConfigError
from gradindex.inputs import read_npz
from gradindex.task import Task
from gradindex.tasks.checkpoints import (
    CheckpointKeeper, adam_state, gradindex_home, load_or_train, save_checkpoint,
)
from gradindex.tasks.classification import check_labels, margin, sampled_cross_entropy
from gradindex.tasks.training import one_thread, seeded_model, train_epochs

logger = logging.getLogger(__name__)

MEASUREMENTS = ("prediction", "neg_squared_error")
QUERY_FRACTION = 0.25
SPLIT_SEED = 0
ARCH_KIND = "tabular-mlp"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2


#: name -> (sklearn loader, number of classes (0 = regression), training schedule). Short schedules
#: with weight decay: trained longer, the classifiers drive their training losses to 0 (the cancer
#: MLP after 60 epochs at lr 3e-3: median training-example gradient norm 3e-8, 33 of 427 exactly
#: 0), which leaves gradient attribution nothing to work with, and the diabetes regression (noisy: a
#: linear fit explains about half the variance) overfits to a held-out R² near 0.
DATASETS = {
    "cancer": ("load_breast_cancer", 2, TrainConfig(epochs=10)),
    "wine": ("load_wine", 3, TrainConfig(epochs=20)),
    "diabetes": ("load_diabetes", 0, TrainConfig(epochs=20)),
}


def load_split(dataset: str) -> dict[str, np.ndarray]:
    """The fixed split of a bundled data set: ``x_train``, ``y_train``, ``x_query``, ``y_query`` (raw
    features ``[n, d]`` float64; labels int64 or targets float64)."""
    import sklearn.datasets

    if dataset not in DATASETS:
        raise ConfigError(f"tabular task: dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    loader, classes, _ = DATASETS[dataset]
    bunch = getattr(sklearn.datasets, loader)()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64 if classes else np.float64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    cut = len(x) - int(round(QUERY_FRACTION * len(x)))
    train, query = order[:cut], order[cut:]
    return {"x_train": x[train], "y_train": y[train], "x_query": x[query], "y_query": y[query]}


class MLP(nn.Sequential):
    """``x [B, d] -> [B, outputs]``: ``fc1 … fc<layers>`` with ReLU, then ``head``."""

    def __init__(self, inputs: int, outputs: int, hidden: int, layers: int):
        modules: list[tuple[str, nn.Module]] = []
        width = inputs
        for i in range(1, layers + 1):
            modules += [(f"fc{i}", nn.Linear(width, hidden)), (f"relu{i}", nn.ReLU())]
            width = hidden
        modules.append(("head", nn.Linear(width, outputs)))
        super().__init__(OrderedDict(modules))


class TabularTask(Task):
    """A bundled tabular data set with an MLP; see the module docstring. Options: ``dataset``
    (cancer, wine, diabetes), ``seed`` (training seed), ``hidden``, ``layers``, ``epochs``,
    ``measurement`` (regression only: prediction or neg_squared_error)."""

    def __init__(self, dataset: str = "cancer", seed: int = 0, hidden: int = 64, layers: int = 3,
                 epochs: int | None = None, measurement: str = "prediction"):
        if dataset not in DATASETS:
            raise ConfigError(f"tabular task: dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
        if measurement not in MEASUREMENTS:
            raise ConfigError(f"tabular task: measurement must be one of {', '.join(MEASUREMENTS)}, "
                              f"got {measurement!r}")
        _, self.classes, schedule = DATASETS[dataset]
        epochs = schedule.epochs if epochs is None else epochs
        for name, value in (("hidden", hidden), ("layers", layers), ("epochs", epochs)):
            require_positive(value, f"tabular task {name}")
        self.dataset = dataset
        self.measurement = measurement
        self.seed = int(seed)
        self.hidden, self.layers = int(hidden), int(layers)
        self.train_config = dataclasses.replace(schedule, epochs=int(epochs))
        self.options = {"dataset": dataset, "seed": self.seed, "hidden": self.hidden, "layers": self.layers,
                        "epochs": self.train_config.epochs, "measurement": measurement}
        split = load_split(dataset)
        self.mean, self.std = split["x_train"].mean(0), split["x_train"].std(0)
        self.std[self.std == 0] = 1.0
        if self.regression:
            self.target_mean, self.target_std = float(split["y_train"].mean()), float(split["y_train"].std())
        self._train = self._dataset(split["x_train"], split["y_train"])
        self._queries = self._dataset(split["x_query"], split["y_query"])
        self.num_features = split["x_train"].shape[1]

    @property
    def regression(self) -> bool:
        return self.classes == 0

    def _dataset(self, x: np.ndarray, y: np.ndarray) -> torch.utils.data.TensorDataset:
        features = torch.from_numpy(((x - self.mean) / self.std).astype(np.float32))
        if self.regression:
            targets = torch.from_numpy(((np.asarray(y, np.float64) - self.target_mean) / self.target_std)
                                       .astype(np.float32))
        else:
            targets = torch.from_numpy(np.asarray(y, dtype=np.int64))
        return torch.utils.data.TensorDataset(features, targets)

    # -- data -----------------------------------------------------------------------------------
    def train_dataset(self) -> Sequence:
        return self._train

    def query_dataset(self) -> Sequence:
        return self._queries

    def metadata(self, dataset: Sequence) -> dict[str, np.ndarray]:
        if not isinstance(dataset, torch.utils.data.TensorDataset):
            return {}
        y = dataset.tensors[1].numpy()
        if self.regression:
            return {"target": y.astype(np.float64) * self.target_std + self.target_mean}
        return {"label": y}

    def load_queries(self, path: str | Path) -> Sequence:
        data = read_npz(path, f"{self.dataset} rows")
        if "x" not in data:
            raise ConfigError(f"{path}: expected an array named 'x' (and optional 'y'), found {sorted(data)}")
        x, y = data["x"], data.get("y")
        if x.ndim != 2 or x.shape[1] != self.num_features or not len(x) or not np.issubdtype(x.dtype, np.number) \
                or not np.isfinite(x).all():
            raise ConfigError(f"{path}: expected finite features of shape [n, {self.num_features}], got "
                              f"{x.dtype} {tuple(x.shape)}")
        if self.regression:
            if y is None:
                if self.measurement == "neg_squared_error":
                    raise ConfigError(f"{path}: the neg_squared_error measurement needs targets 'y'")
                y = np.full(len(x), self.target_mean)
            y = np.asarray(y).reshape(-1)
            if len(y) != len(x) or not np.issubdtype(y.dtype, np.number) or not np.isfinite(y).all():
                raise ConfigError(f"{path}: 'y' must hold {len(x)} finite targets")
        else:
            y = check_labels(y, len(x), self.classes, str(path))
        return self._dataset(x.astype(np.float64), y)

    # -- model ----------------------------------------------------------------------------------
    def arch(self) -> dict[str, Any]:
        return {"kind": ARCH_KIND, "dataset": self.dataset, "inputs": self.num_features,
                "outputs": max(self.classes, 1), "hidden": self.hidden, "layers": self.layers}

    def build_model(self) -> MLP:
        return MLP(self.num_features, max(self.classes, 1), self.hidden, self.layers)

    def default_checkpoint(self) -> Path:
        key = json.dumps({"arch": self.arch(), "train": asdict(self.train_config), "seed": self.seed,
                          "split": SPLIT_SEED}, sort_keys=True)
        return gradindex_home() / "checkpoints" / f"tabular-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def learning_rates(self) -> list[float]:
        """Adam's nominal rate at each step of the default training run (``epochs · ⌈N / batch_size⌉`` steps)."""
        config = self.train_config
        steps = config.epochs * -(-len(self._train.tensors[1]) // config.batch_size)
        return [config.lr] * steps

    def train(self, path: str | Path | None = None, indices: Sequence[int] | None = None,
              seed: int | None = None, keep_checkpoints: int = 0) -> Path:
        """Train on the training rows at ``indices`` (default: all) and save a checkpoint at ``path`` (with the
        Adam state); ``keep_checkpoints=K`` keeps K evenly spaced ones in ``<path>.run/`` with their learning
        rates (``featurize --checkpoints-from``)."""
        x, y = self._train.tensors
        rows = np.arange(len(y)) if indices is None else np.asarray(indices, dtype=np.int64)
        if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= len(y):
            raise ConfigError(f"tabular train: indices must be positions in 0..{len(y) - 1}")
        path = Path(path or self.default_checkpoint())
        keeper = CheckpointKeeper(path, self.arch(), keep_checkpoints, self.train_config.epochs) \
            if keep_checkpoints else None
        with one_thread():
            model = self._fit(x[torch.from_numpy(rows)], y[torch.from_numpy(rows)],
                              self.seed if seed is None else int(seed), keeper)
        return save_checkpoint(model, self.arch(), path, extra={"optimizer": model.optimizer_state})

    def _fit(self, x: torch.Tensor, y: torch.Tensor, seed: int, on_epoch=None) -> nn.Module:
        config = self.train_config
        model = seeded_model(self.build_model, seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        model = train_epochs(model, lambda rows: self._losses(model(x[rows]), y[rows]).mean(), len(x),
                             config.epochs, config.batch_size, seed, optimizer, on_epoch=on_epoch)
        model.optimizer_state = adam_state(optimizer, model)
        return model

    def load_model(self, checkpoint: str | Path | None) -> nn.Module:
        return load_or_train(self, checkpoint, self.build_model, self.arch(), f"tabular-{self.dataset}",
                             "TabularTask(...).train(path) writes one", f"tabular {self.dataset} model")

    # -- losses ---------------------------------------------------------------------------------
    def _losses(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.regression:
            return (outputs[:, 0] - y) ** 2
        return F.cross_entropy(outputs, y, reduction="none")

    def compute_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        x, y = batch
        return self._losses(model(x), y)

    def compute_sampled_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Classification: classes drawn from the softmax; regression: ``y ~ N(output, 1/2)``, whose
        squared-error loss is the Gaussian negative log-likelihood up to a constant."""
        outputs = model(batch[0])
        if not self.regression:
            return sampled_cross_entropy(outputs)
        with torch.no_grad():
            drawn = outputs[:, 0] + torch.randn_like(outputs[:, 0]) * 0.5 ** 0.5
        return (outputs[:, 0] - drawn) ** 2

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        x, y = batch
        outputs = model(x)
        if not self.regression:
            return margin(outputs, y)
        if self.measurement == "prediction":
            return outputs[:, 0]
        return -((outputs[:, 0] - y) ** 2)

    def describe(self, item: Any) -> str:
        if self.regression:
            return f"target {float(item[1]) * self.target_std + self.target_mean:.1f}"
        label = int(item[1])
        return f"class {label}" if label >= 0 else "unlabelled"
