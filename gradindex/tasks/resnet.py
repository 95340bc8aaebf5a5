"""Built-in task ``resnet``: a deep residual image classifier on synthetic concept images.

Data: :mod:`gradindex.tasks.concepts` generates 16×16 RGB images from
``data/resnet_concepts.json`` (option ``config``): 6 subjects (circle, square,
triangle, star, cross, diamond) painted in 5 styles on 6 backgrounds (noisy,
striped and checkered ones among them), with position and size jitter. The class is
the **subject**; style and background are nuisances (stored as metadata columns for
display and evaluation). ``num_train`` training images (default 2000, from the
config's seed) and ``num_queries`` held-out query images of the same distribution
(default 400, from seed + 1). Items are ``(image [3, H, W] in [-1, 1], label)``.

Model (:class:`ResNet`): a ResNet-14 for small images — stem ``conv`` + ``bn``, three
stages of two basic blocks (``blocks.<i>.conv1/bn1/conv2/bn2``; widths w, 2w, 4w;
the first block of stages 2 and 3 halves the resolution and has a 1×1
``shortcut_conv`` + ``shortcut_bn``), global average pooling and a linear ``head``.
Every module is its own default group: 31 groups (15 convolutions, 15 BatchNorms, the
head). BatchNorm normalises with batch statistics while training and with its running
statistics in ``eval()`` mode, in which gradients and measurements are taken, so
examples never interact.

Training (:func:`train_resnet`): AdamW with a one-cycle learning rate, batch 128,
12 epochs, seeded initialisation and batch order, on one CPU thread (the result does
not depend on the machine's thread count; parallel retrainings do not fight over
cores); about 30 s on one core for the 2000 images. The default checkpoint is
trained on first use and cached under ``$GRADINDEX_HOME/checkpoints``.

Loss: per-example cross-entropy. Measurement: the margin of the query's label
(:func:`~gradindex.tasks.classification.margin`); label ``-1`` = the model's prediction.
Query files: ``.npz`` with ``images [n, H, W, 3]`` uint8 and optional ``y`` (labels).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradindex.config import require_positive
from gradindex.errors import ArtifactNotFoundError, ConfigError
from gradindex.inputs import read_npz
from gradindex.task import Task
from gradindex.tasks.checkpoints import (
    CheckpointKeeper, adam_state, gradindex_home, load_or_train, save_checkpoint,
)
from gradindex.tasks.classification import check_labels, margin, sampled_cross_entropy
from gradindex.tasks.concepts import FACTORS, ConceptConfig, ConceptImages, generate
from gradindex.tasks.training import one_thread, seeded_model, train_epochs

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "data" / "resnet_concepts.json"
ARCH_KIND = "resnet"


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int
    width: int = 12
    blocks_per_stage: int = 2
    stages: int = 3

    def __post_init__(self) -> None:
        for name in ("num_classes", "width", "blocks_per_stage", "stages"):
            require_positive(getattr(self, name), f"resnet model {name}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    batch_size: int = 128
    lr: float = 5e-3
    weight_decay: float = 5e-4


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is a strided 1×1 conv + BN
    when the block changes resolution or width, else the identity."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut_conv = self.shortcut_bn = None
        if stride != 1 or channels_in != channels_out:
            self.shortcut_conv = nn.Conv2d(channels_in, channels_out, 1, stride, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        skip = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x))
        return F.relu(h + skip)


class ResNet(nn.Module):
    """``images [B, 3, H, W] -> logits [B, num_classes]``; see the module docstring."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, channels = [], width
        for stage in range(config.stages):
            out = width * 2**stage
            for index in range(config.blocks_per_stage):
                blocks.append(BasicBlock(channels, out, 2 if stage > 0 and index == 0 else 1))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(images))))
        return self.head(x.mean((2, 3)))


def train_resnet(config: ModelConfig, images: torch.Tensor, labels: torch.Tensor, seed: int,
                 train: TrainConfig = TrainConfig(), on_epoch=None) -> nn.Module:
    """A fresh :class:`ResNet` trained on ``images [n, 3, H, W]``, ``labels [n]`` (seeded, one thread);
    ``on_epoch(epoch, model, optimizer)`` after each epoch; the Adam state rides on ``model.optimizer_state``."""
    if len(images) == 0:
        raise ConfigError("resnet training: no training examples selected")
    images = images.contiguous()  # channels-last strides crash oneDNN's conv backward on AVX2-only CPUs
    with one_thread():
        model = seeded_model(lambda: ResNet(config), seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        steps = train.epochs * -(-len(images) // train.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, train.lr, total_steps=steps)
        model = train_epochs(model, lambda rows: F.cross_entropy(model(images[rows]), labels[rows]), len(images),
                             train.epochs, train.batch_size, seed, optimizer, schedule, on_epoch=on_epoch)
        model.optimizer_state = adam_state(optimizer, model)
        return model


class ConceptImageDataset(torch.utils.data.TensorDataset):
    """``(image [3, H, W] in [-1, 1], label)`` items; ``factors [n, 3]`` (subject, style, background
    indices, ``-1`` where unknown) ride along for metadata."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, factors: np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().contiguous() / 127.5 - 1
        super().__init__(images, torch.from_numpy(np.asarray(labels, dtype=np.int64)))
        self.factors = np.asarray(factors, dtype=np.int64).reshape(len(labels), len(FACTORS))


class ResNetTask(Task):
    """The built-in ResNet classification task; see the module docstring. Options: ``config`` (a concepts
    JSON), ``num_train``, ``num_queries``, ``seed`` (training seed), ``width``, ``epochs``."""

    def __init__(self, config: str | None = None, num_train: int | None = None, num_queries: int = 400,
                 seed: int = 0, width: int = 12, epochs: int = TrainConfig.epochs):
        path = Path(config) if config else DEFAULT_CONFIG
        if not config and not DEFAULT_CONFIG.is_file():
            raise ArtifactNotFoundError(
                f"the resnet task's default concepts config {DEFAULT_CONFIG} is missing (it ships in the source "
                "tree's data/); pass --task-option config=PATH/concepts.json"
            )
        for name, value in (("num_train", num_train or 1), ("num_queries", num_queries), ("epochs", epochs)):
            require_positive(value, f"resnet task {name}")
        self.concept_config = ConceptConfig.load(path)
        self.num_train = int(num_train or self.concept_config.num_train)
        self.num_queries = int(num_queries)
        self.seed = int(seed)
        self.options = {"config": str(config) if config else None, "num_train": num_train,
                        "num_queries": self.num_queries, "seed": self.seed, "width": width, "epochs": epochs}
        self.model_config = ModelConfig(len(self.concept_config.subjects), width=width)
        self.train_config = TrainConfig(epochs=epochs)
        self._train: ConceptImageDataset | None = None
        self._queries: ConceptImageDataset | None = None

    # -- data -----------------------------------------------------------------------------------
    @staticmethod
    def _dataset(data: ConceptImages) -> ConceptImageDataset:
        return ConceptImageDataset(data.images, data.labels[:, 0], data.labels)

    def train_dataset(self) -> Sequence:
        if self._train is None:
            self._train = self._dataset(generate(self.concept_config, self.num_train))
        return self._train

    def query_dataset(self) -> Sequence:
        """``num_queries`` held-out images of the training distribution (the config's seed + 1)."""
        if self._queries is None:
            self._queries = self._dataset(generate(self.concept_config, self.num_queries,
                                                   seed=self.concept_config.seed + 1))
        return self._queries

    def metadata(self, dataset: Sequence) -> dict[str, np.ndarray]:
        if not isinstance(dataset, ConceptImageDataset):
            return {}
        columns = {"label": dataset.tensors[1].numpy()}
        for j, factor in enumerate(FACTORS):
            known = dataset.factors[:, j] >= 0
            if known.all():
                columns[factor] = np.array(self.concept_config.values(factor))[dataset.factors[:, j]]
        return columns

    def load_queries(self, path: str | Path) -> Sequence:
        data = read_npz(path, "resnet queries")
        if "images" not in data:
            raise ConfigError(f"{path}: expected an array named 'images' (and optional 'y'), found {sorted(data)}")
        images, y = data["images"], data.get("y")
        size = self.concept_config.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8 or not len(images):
            raise ConfigError(f"{path}: expected uint8 images of shape [n, {size}, {size}, 3], got "
                              f"{images.dtype} {tuple(images.shape)}")
        labels = check_labels(y, len(images), self.model_config.num_classes, str(path))
        return ConceptImageDataset(images, labels, np.full((len(images), len(FACTORS)), -1))

    def save_queries(self, path: str | Path, dataset: ConceptImageDataset) -> Path:
        """Write ``dataset`` as a query file :meth:`load_queries` reads."""
        from gradindex.store.feature_store import write_arrays

        pixels = ((dataset.tensors[0].permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        write_arrays(path, {"images": pixels.numpy(), "y": dataset.tensors[1].numpy()})
        return Path(path)

    # -- model ----------------------------------------------------------------------------------
    def arch(self) -> dict[str, Any]:
        return {"kind": ARCH_KIND, **asdict(self.model_config), "image_size": self.concept_config.image_size}

    def default_checkpoint(self) -> Path:
        key = json.dumps({"arch": self.arch(), "train": asdict(self.train_config), "seed": self.seed,
                          "data": self.concept_config.fingerprint(), "num_train": self.num_train}, sort_keys=True)
        return gradindex_home() / "checkpoints" / f"resnet-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def train(self, path: str | Path | None = None, indices: Sequence[int] | None = None,
              seed: int | None = None, keep_checkpoints: int = 0) -> Path:
        """Train on the training images at ``indices`` (default: all) and save a checkpoint at ``path`` (with
        the AdamW state); ``keep_checkpoints=K`` keeps K evenly spaced ones in ``<path>.run/`` with their
        learning rates (``featurize --checkpoints-from``)."""
        images, labels = self.train_dataset().tensors
        rows = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= len(labels):
            raise ConfigError(f"resnet train: indices must be positions in 0..{len(labels) - 1}")
        index = torch.from_numpy(rows)
        path = Path(path or self.default_checkpoint())
        keeper = CheckpointKeeper(path, self.arch(), keep_checkpoints, self.train_config.epochs) \
            if keep_checkpoints else None
        model = train_resnet(self.model_config, images[index], labels[index],
                             self.seed if seed is None else int(seed), self.train_config, on_epoch=keeper)
        return save_checkpoint(model, self.arch(), path, extra={"optimizer": model.optimizer_state})

    def load_model(self, checkpoint: str | Path | None) -> nn.Module:
        return load_or_train(self, checkpoint, lambda: ResNet(self.model_config), self.arch(), "resnet",
                             "ResNetTask(...).train(path) writes one", "resnet task's model (~30 s)")

    # -- losses ---------------------------------------------------------------------------------
    def compute_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels, reduction="none")

    def compute_sampled_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return sampled_cross_entropy(model(batch[0]))

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        images, labels = batch
        return margin(model(images), labels)

    # -- display --------------------------------------------------------------------------------
    def render(self, item: Any) -> np.ndarray:
        return ((item[0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)

    def describe(self, item: Any) -> str:
        label = int(item[1])
        return self.concept_config.subjects[label] if label >= 0 else "unlabelled"
