"""Built-in task: scikit-learn's bundled 8×8 digits with a small MLP or CNN.

Data: ``sklearn.datasets.load_digits`` (1797 images, shipped with the package),
scaled to [0, 1], split by a seeded permutation into 1437 training and 360
held-out examples. Models: ``mlp`` (64-128-128-10, ReLU) or ``cnn`` (two 3×3
convolutions, max-pool, two linear layers). Training is deterministic (seeded
Adam, full CPU determinism) and takes seconds; the default checkpoint is trained
on first use and cached under ``$GRADINDEX_HOME`` (default ``~/.cache/gradindex``).

Loss: per-example cross-entropy. Measurement: the margin
``logit_y − logsumexp_{j≠y} logit_j`` of the query's label (TRAK's choice);
a query labelled ``-1`` is measured at the model's own prediction.
Query files: ``.npz`` with ``x`` (``[n, 64]`` or ``[n, 8, 8]``, pixel values 0..16
as in ``load_digits``) and optional ``y``, or a ``.npy`` array of ``x``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradindex.errors import ConfigError
from gradindex.inputs import read_npy, read_npz, resample_image
from gradindex.task import Task
from gradindex.inputs import json_array
from gradindex.tasks.checkpoints import CheckpointKeeper, adam_state, gradindex_home, load_or_train, save_checkpoint
from gradindex.tasks.classification import margin, sampled_cross_entropy
from gradindex.tasks.training import seeded_model, train_epochs

logger = logging.getLogger(__name__)

ARCHS = ("mlp", "cnn")
TRAIN_FRACTION = 0.8
SPLIT_SEED = 0


def load_split() -> dict[str, np.ndarray]:
    """The fixed train/test split: ``x_train [1437, 64]`` in [0, 1], ``y_train``, ``x_test``, ``y_test``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    cut = int(round(TRAIN_FRACTION * len(x)))
    train, test = order[:cut], order[cut:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def build_model(arch: str) -> nn.Module:
    if arch == "mlp":
        layers = [("fc1", nn.Linear(64, 128)), ("relu1", nn.ReLU()), ("fc2", nn.Linear(128, 128)),
                  ("relu2", nn.ReLU()), ("fc3", nn.Linear(128, 10))]
        return nn.Sequential(OrderedDict(layers))
    if arch == "cnn":
        layers = [("image", nn.Unflatten(1, (1, 8, 8))),
                  ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("relu1", nn.ReLU()),
                  ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("relu2", nn.ReLU()),
                  ("pool", nn.MaxPool2d(2)), ("flatten", nn.Flatten()),
                  ("fc1", nn.Linear(32 * 4 * 4, 64)), ("relu3", nn.ReLU()),
                  ("fc2", nn.Linear(64, 10))]
        return nn.Sequential(OrderedDict(layers))
    raise ConfigError(f"digits task: arch must be one of {', '.join(ARCHS)}, got {arch!r}")


EPOCHS = 40  # train_model's default


def train_model(arch: str, x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 40,
                batch_size: int = 64, lr: float = 3e-3, on_epoch=None) -> nn.Module:
    """Train a fresh model deterministically on ``(x, y)`` (seconds on a CPU)."""
    model = seeded_model(lambda: build_model(arch), seed)
    return fit(model, x, y, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, on_epoch=on_epoch)


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 40,
        batch_size: int = 64, lr: float = 3e-3, on_epoch=None) -> nn.Module:
    """Train ``model`` in place with seeded Adam on ``(x, y)``; returns it in eval mode, its Adam state on
    ``model.optimizer_state``. ``on_epoch(epoch, model, optimizer)`` runs after each epoch (1-based)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    model = train_epochs(model, lambda rows: F.cross_entropy(model(xs[rows]), ys[rows]), len(xs), epochs,
                         batch_size, seed, optimizer, on_epoch=on_epoch)
    model.optimizer_state = adam_state(optimizer, model)  # saved with the checkpoint (--normalize adam)
    return model


class DigitsTask(Task):
    """Digits classification with an ``mlp`` or ``cnn``; see the module docstring."""

    def __init__(self, arch: str = "mlp", seed: int = 0):
        if arch not in ARCHS:
            raise ConfigError(f"digits task: arch must be one of {', '.join(ARCHS)}, got {arch!r}")
        self.arch = arch
        self.seed = int(seed)
        self.options = {"arch": arch, "seed": self.seed}
        self._split: dict[str, np.ndarray] | None = None

    @property
    def split(self) -> dict[str, np.ndarray]:
        if self._split is None:
            self._split = load_split()
        return self._split

    # -- model -------------------------------------------------------------------------------
    def default_checkpoint(self) -> Path:
        return gradindex_home() / "checkpoints" / f"digits-{self.arch}-seed{self.seed}.pt"

    def train(self, path: str | Path | None = None, indices: Sequence[int] | None = None,
              seed: int | None = None, keep_checkpoints: int = 0) -> Path:
        """Train on the training examples at ``indices`` (default: all) and save a checkpoint (with the
        Adam state). ``keep_checkpoints=K`` also keeps K evenly spaced intermediate ones in
        ``<path>.run/`` with their learning rates (``featurize --checkpoints-from``)."""
        rows = np.arange(len(self.split["x_train"])) if indices is None else np.asarray(indices)
        path = Path(path or self.default_checkpoint())
        keeper = CheckpointKeeper(path, self.arch, keep_checkpoints, EPOCHS)
        model = train_model(self.arch, self.split["x_train"][rows], self.split["y_train"][rows],
                            seed=self.seed if seed is None else seed, on_epoch=keeper if keep_checkpoints else None)
        return save_checkpoint(model, self.arch, path, extra={"optimizer": model.optimizer_state})

    def load_model(self, checkpoint: str | Path | None) -> nn.Module:
        out = checkpoint if checkpoint is not None else self.default_checkpoint()
        how_to_train = f"train one with `python tools/train_digits.py --arch {self.arch} --out {out}`"
        return load_or_train(self, checkpoint, lambda: build_model(self.arch), self.arch, "digits", how_to_train,
                             f"digits {self.arch}")

    # -- data --------------------------------------------------------------------------------
    def train_dataset(self) -> Sequence:
        return torch.utils.data.TensorDataset(torch.from_numpy(self.split["x_train"]), torch.from_numpy(self.split["y_train"]))

    def query_dataset(self) -> Sequence:
        return torch.utils.data.TensorDataset(torch.from_numpy(self.split["x_test"]), torch.from_numpy(self.split["y_test"]))

    def metadata(self, dataset: Sequence) -> dict[str, np.ndarray]:
        return {"label": dataset.tensors[1].numpy()} if isinstance(dataset, torch.utils.data.TensorDataset) else {}

    def load_queries(self, path: str | Path) -> Sequence:
        path = Path(path)
        if path.suffix == ".npz":
            data = read_npz(path, "digits")
            if "x" not in data:
                raise ConfigError(f"{path}: expected an array named 'x' (and optional 'y'), found {sorted(data)}")
            x, y = data["x"], data.get("y")
        else:
            x, y = read_npy(path, "digits"), None
        return self._query_arrays(x, y, str(path))

    def queries_from_json(self, inputs) -> Sequence:
        """``{"x": [n, 8, 8] or [n, 64] pixels 0..16, "y": [n] labels (optional)}``: the arrays of a query ``.npz``."""
        if not isinstance(inputs, dict) or "x" not in inputs or set(inputs) - {"x", "y"}:
            keys = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
            raise ConfigError(f"inputs: expected an object with 'x' (and optional 'y'), got {keys}")
        y = inputs.get("y")
        return self._query_arrays(json_array(inputs["x"], "inputs.x"), None if y is None else json_array(y, "inputs.y"),
                                  "inputs")

    def query_from_image(self, image: np.ndarray, fields: dict) -> dict:
        """An uploaded image ``[H, W]`` or ``[H, W, 3]`` (0..1) → ``{"x": [[8 x 8 pixels 0..16]], "y": [label]}``:
        grey, ink the darker side unless the background is dark, block-averaged to 8 x 8; ``fields``:
        optional ``{"y": label}`` (default -1, the model's prediction)."""
        if set(fields) - {"y"}:
            raise ConfigError(f"fields: digits queries take only 'y' (a label 0..9), got {sorted(fields)}")
        small = resample_image(image, 8, 8)
        small = small.mean(axis=2) if small.ndim == 3 else small
        small = 1.0 - small if small.mean() > 0.5 else small  # dark ink on a light page, or light on dark
        small = small / small.max() if small.max() > 0 else small
        return {"x": [np.round(small * 16).tolist()], "y": [int(fields.get("y", -1))]}

    def _query_arrays(self, x: np.ndarray, y: np.ndarray | None, where: str) -> Sequence:
        """Queries from pixels ``x [n, 8, 8] or [n, 64]`` (0..16) and labels ``y [n]`` (-1: the model's prediction)."""
        if x.ndim == 3 and x.shape[1:] == (8, 8):
            x = x.reshape(len(x), 64)
        if x.ndim != 2 or x.shape[1] != 64 or len(x) == 0:
            raise ConfigError(f"{where}: expected digits of shape [n, 64] or [n, 8, 8], got {tuple(x.shape)}")
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)) \
                or not np.isfinite(x).all() or x.min() < 0 or x.max() > 16:
            raise ConfigError(f"{where}: pixel values must be numbers in 0..16 (as in sklearn's load_digits)")
        y = np.full(len(x), -1) if y is None else np.asarray(y).reshape(-1)
        if len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or y.dtype.kind == "b" \
                or ((y < -1) | (y > 9)).any():
            raise ConfigError(f"{where}: 'y' must hold {len(x)} labels in 0..9 (or -1 for the model's prediction)")
        x = x.astype(np.float32) / 16.0
        return torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))

    # -- losses ------------------------------------------------------------------------------
    def compute_train_loss(self, batch, model: nn.Module) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")

    def compute_sampled_loss(self, batch, model: nn.Module) -> torch.Tensor:
        return sampled_cross_entropy(model(batch[0]))

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        x, y = batch
        return margin(model(x), y)

    # -- display -----------------------------------------------------------------------------
    def render(self, item) -> np.ndarray:
        return np.asarray(item[0]).reshape(8, 8)

    def describe(self, item) -> str:
        label = int(item[1])
        return f"label {label}" if label >= 0 else "unlabelled"
