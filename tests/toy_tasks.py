"""Tiny seeded tasks for the weight-learning and LDS tests (trained in well under a second).

* :class:`ToyTask`: three Gaussian classes in 8 dimensions, 200 training
  examples, 48 queries; an MLP ``body`` (two linear layers) plus a parallel
  ``noise`` branch, a linear layer fed with each example's own random vector
  ``z`` (scaled by ``noise_scale``) whose weights stay zero: its gradients
  ``δ zᵀ`` carry no information about the example yet dominate the gradient norm.
* :class:`TwoConceptTask`: the same inputs with two labels and two heads;
  concept ``first`` measures head one's margin, ``second`` head two's.

Load them in other processes with ``load_task(f"{__file__}:ToyTask")``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradindex.task import Task

DIM, NOISE_DIM, CLASSES, NUM_TRAIN, NUM_QUERIES = 8, 16, 3, 200, 48


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.6, (CLASSES, DIM))
    total = NUM_TRAIN + NUM_QUERIES
    label = rng.integers(0, CLASSES, total)
    second = rng.integers(0, CLASSES, total)
    x = centres[label] + rng.normal(0, 1.0, (total, DIM)) + 0.8 * np.eye(CLASSES, DIM)[second]
    z = rng.normal(0, 1.0, (total, NOISE_DIM))
    as_tensor = lambda a, dtype: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    return {"x": as_tensor(x, torch.float32), "z": as_tensor(z, torch.float32),
            "y": as_tensor(label, torch.int64), "y2": as_tensor(second, torch.int64)}


class Margins(nn.Module):
    def __init__(self, heads: int, noise_scale: float):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(16, CLASSES) for _ in range(heads)])
        self.noise = nn.Linear(NOISE_DIM, CLASSES * heads, bias=False)
        nn.init.zeros_(self.noise.weight)
        self.noise_scale = noise_scale

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, heads, CLASSES]``."""
        hidden = self.body(x)
        logits = torch.stack([head(hidden) for head in self.heads], dim=1)
        return logits + self.noise(self.noise_scale * z).reshape(logits.shape)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -torch.inf)
    return true - torch.logsumexp(others, dim=1)


class ToyTask(Task):
    heads = 1

    def __init__(self, noise_scale: float = 30.0):
        self.noise_scale = float(noise_scale)
        self.options = {"noise_scale": self.noise_scale}
        self.data = _data()

    def _items(self, rows: slice):
        return [{key: value[i] for key, value in self.data.items()} for i in range(*rows.indices(NUM_TRAIN + NUM_QUERIES))]

    def train_dataset(self):
        return self._items(slice(0, NUM_TRAIN))

    def query_dataset(self):
        return self._items(slice(NUM_TRAIN, None))

    def build(self) -> nn.Module:
        return Margins(self.heads, self.noise_scale)

    def train(self, path, indices=None, seed=0) -> Path:
        rows = torch.arange(NUM_TRAIN) if indices is None else torch.as_tensor(np.asarray(indices))
        torch.manual_seed(seed)
        model = self.build()
        body = [p for name, p in model.named_parameters() if not name.startswith("noise")]
        optimizer = torch.optim.Adam(body, lr=0.08)
        batch = {key: value[rows] for key, value in self.data.items()}
        for _ in range(100):
            optimizer.zero_grad()
            self.compute_train_loss(batch, model).mean().backward()
            optimizer.step()
        torch.save(model.state_dict(), path)
        return Path(path)

    def load_model(self, checkpoint) -> nn.Module:
        if checkpoint is None:
            raise FileNotFoundError("toy tasks need an explicit checkpoint")
        model = self.build()
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        return model.eval()

    def logits(self, batch, model) -> torch.Tensor:
        return model(batch["x"], batch["z"])

    def compute_train_loss(self, batch, model) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch, model)[:, 0], batch["y"], reduction="none")

    def compute_measurement(self, batch, model) -> torch.Tensor:
        return margin(self.logits(batch, model)[:, 0], batch["y"])


class TwoConceptTask(ToyTask):
    heads = 2
    concepts = ("first", "second")

    def __init__(self, noise_scale: float = 0.0):
        super().__init__(noise_scale)

    def compute_train_loss(self, batch, model) -> torch.Tensor:
        logits = self.logits(batch, model)
        return (F.cross_entropy(logits[:, 0], batch["y"], reduction="none")
                + F.cross_entropy(logits[:, 1], batch["y2"], reduction="none"))

    def compute_measurement(self, batch, model) -> torch.Tensor:
        return self.concept_measurement(batch, model, "first") + self.concept_measurement(batch, model, "second")

    def concept_measurement(self, batch, model, concept: str) -> torch.Tensor:
        logits = self.logits(batch, model)
        if concept == "first":
            return margin(logits[:, 0], batch["y"])
        return margin(logits[:, 1], batch["y2"])


class EncoderClassifier(nn.Module):
    """Token sequences ``[B, T]`` -> logits ``[B, CLASSES]`` through ``nn.TransformerEncoderLayer`` s (the
    default ``batch_first=False`` layout, a padding mask, ``nn.MultiheadAttention`` inside)."""

    def __init__(self, vocab: int = 13, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 2, 16, dropout=0.0), 2,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == 0
        hidden = self.enc(self.embed(tokens).transpose(0, 1), src_key_padding_mask=pad).transpose(0, 1)
        keep = (~pad).unsqueeze(-1).float()
        return self.head((hidden * keep).sum(1) / keep.sum(1))


class EncoderTask(Task):
    """A classifier built from ``nn.TransformerEncoderLayer``, on 40 random padded token sequences
    (label: token 1's count mod 3); 8 queries. An untrained seeded model when no checkpoint is given."""

    def _items(self, start: int, stop: int):
        generator = torch.Generator().manual_seed(7)
        tokens = torch.randint(1, 13, (48, 6), generator=generator)
        for row in range(0, 48, 3):
            tokens[row, 4:] = 0  # padded
        labels = (tokens == 1).sum(1) % CLASSES
        return [{"tokens": tokens[i], "y": labels[i]} for i in range(start, stop)]

    def train_dataset(self):
        return self._items(0, 40)

    def query_dataset(self):
        return self._items(40, 48)

    def load_model(self, checkpoint) -> nn.Module:
        torch.manual_seed(0)
        model = EncoderClassifier()
        if checkpoint is not None:
            model.load_state_dict(torch.load(checkpoint, weights_only=True))
        return model.eval()

    def compute_train_loss(self, batch, model) -> torch.Tensor:
        return F.cross_entropy(model(batch["tokens"]), batch["y"], reduction="none")
