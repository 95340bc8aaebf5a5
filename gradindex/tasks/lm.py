"""Built-in task ``lm``: a small decoder-only transformer on the synthetic fact corpus.

Data: :mod:`gradindex.tasks.lm_corpus` generates the corpus from
``data/lm_corpus.json`` (option ``corpus``): 589 training sequences of 1–3
sentences stating 640 facts, a 239-word vocabulary. Each training item is
``<bos>`` + the sequence's words.

Model (:class:`TinyTransformer`, pre-norm GPT): ``tok_emb`` and ``pos_emb``
(``nn.Embedding``), per layer ``blocks.<i>.ln1``, ``attn.q/k/v/out``
(``nn.Linear``), ``ln2``, ``mlp.up/down`` (``nn.Linear``, GELU), then ``ln_f`` and
an untied ``head``. Every module is its own default group, so the groups are the
model's anatomy. No dropout, so training and attribution see the same function.

Training (:func:`train_lm`): AdamW with warm-up and cosine decay, seeded
initialisation and batch order, mean of the per-example losses, on one CPU
thread (so the result does not depend on the machine's thread count, and
parallel retrainings do not fight over cores); about 30 s on one core. The
default checkpoint is trained on first use and cached under
``$GRADINDEX_HOME/checkpoints``.

Loss, measurement and query files: :mod:`gradindex.tasks.causal_lm` (token-mean
next-token loss; log-probability of a completion or of a span of it).
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
from gradindex.tasks.causal_lm import CausalLMTask, sequence_item
from gradindex.tasks.checkpoints import gradindex_home, load_or_train, save_checkpoint
from gradindex.tasks.lm_corpus import Corpus, CorpusConfig, WordTokenizer, generate_corpus
from gradindex.tasks.training import one_thread, seeded_model, train_epochs

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "data" / "lm_corpus.json"
ARCH_KIND = "tiny-transformer"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    max_length: int = 32
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_length", "width", "layers", "heads", "mlp_ratio"):
            require_positive(getattr(self, name), f"lm model {name}")
        if self.width % self.heads:
            raise ConfigError(f"lm model: width {self.width} is not divisible by heads {self.heads}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        mixed = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.out(mixed.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Layer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """``input_ids [B, T] -> logits [B, T, V]`` (causal; right padding never reaches real tokens)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.width)
        self.pos_emb = nn.Embedding(config.max_length, config.width)
        self.blocks = nn.ModuleList(
            Layer(config.width, config.heads, config.mlp_ratio * config.width) for _ in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab_size)
        for name, param in self.named_parameters():
            if param.ndim == 2:
                nn.init.normal_(param, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(param)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        if length > self.config.max_length:
            raise ConfigError(f"lm model: sequence of {length} tokens, at most {self.config.max_length}")
        # positions as [B, T], so the position embedding sees examples along dimension 0
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)
        for layer in self.blocks:
            x = layer(x)
        return self.head(self.ln_f(x))


def train_lm(task: "LMTask", indices: Sequence[int] | None, seed: int,
             config: TrainConfig = TrainConfig()) -> nn.Module:
    """Train a fresh model on the task's training items at ``indices`` (all by default)."""
    dataset = task.train_dataset()
    rows = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(rows) == 0:
        raise ConfigError("lm training: no training examples selected")
    with one_thread():
        return _train(task, dataset, rows, seed, config)


def _train(task: "LMTask", dataset: Sequence, rows: np.ndarray, seed: int, config: TrainConfig) -> nn.Module:
    model = seeded_model(lambda: TinyTransformer(task.model_config), seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(rows) // config.batch_size)
    total = config.epochs * steps_per_epoch
    warmup = min(config.warmup_steps, max(1, total // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / total))
    )

    def batch_loss(positions: torch.Tensor) -> torch.Tensor:
        batch = task.collate([dataset[int(i)] for i in rows[positions.numpy()]])
        return task.compute_train_loss(batch, model).mean()

    return train_epochs(model, batch_loss, len(rows), config.epochs, config.batch_size, seed, optimizer, schedule)


class TinyTransformerTask(CausalLMTask):
    """What the built-in word-level LMs share: a ``tokenizer``, a :class:`TinyTransformer` of
    ``model_config``, checkpoints trained on first use, training items ``_train_items``.
    Subclasses set ``name`` (the task's built-in name) and define ``arch``, ``train`` and
    ``default_checkpoint``."""

    name = "lm"

    # -- tokenizer ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    # -- model ----------------------------------------------------------------------------------
    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input_ids"])

    def load_model(self, checkpoint: str | Path | None) -> nn.Module:
        return load_or_train(self, checkpoint, lambda: TinyTransformer(self.model_config), self.arch(), self.name,
                             f"{type(self).__name__}(...).train(path) writes one")

    # -- data -----------------------------------------------------------------------------------
    def train_dataset(self) -> Sequence:
        return self._train_items


class LMTask(TinyTransformerTask):
    """The built-in causal LM task; see the module docstring. Options: ``corpus`` (a corpus
    config JSON), ``seed`` (training seed), ``layers``, ``width``, ``heads``, ``epochs``."""

    def __init__(self, corpus: str | None = None, seed: int = 0, layers: int = 2, width: int = 128, heads: int = 4,
                 epochs: int = TrainConfig.epochs):
        self.corpus_path = Path(corpus) if corpus else DEFAULT_CORPUS
        self.seed = int(seed)
        self.options = {"corpus": str(corpus) if corpus else None, "seed": self.seed, "layers": layers,
                        "width": width, "heads": heads, "epochs": epochs}
        if not corpus and not DEFAULT_CORPUS.is_file():
            raise ArtifactNotFoundError(
                f"the lm task's default corpus config {DEFAULT_CORPUS} is missing (it ships in the source tree's "
                "data/); pass --task-option corpus=PATH/lm_corpus.json"
            )
        self.corpus: Corpus = generate_corpus(CorpusConfig.load(self.corpus_path))
        self.tokenizer = WordTokenizer(self.corpus.vocabulary)
        self.pad_id = self.tokenizer.pad_id
        self.bos_ids = (self.tokenizer.bos_id,)
        self.train_config = TrainConfig(epochs=epochs)
        longest = max(len(s.split()) for s in self.corpus.sequences) + 1
        self.model_config = ModelConfig(len(self.tokenizer), max_length=max(32, longest), width=width, layers=layers,
                                        heads=heads)
        self.max_length = self.model_config.max_length
        self.vocab_size = self.model_config.vocab_size
        self._train_items = [sequence_item([*self.bos_ids, *self.tokenizer.encode(s)]) for s in self.corpus.sequences]

    # -- model ----------------------------------------------------------------------------------
    def arch(self) -> dict[str, Any]:
        """What a checkpoint must match: the model config and a hash of the vocabulary."""
        vocab = hashlib.sha256("\n".join(self.corpus.vocabulary).encode()).hexdigest()[:16]
        return {"kind": ARCH_KIND, **asdict(self.model_config), "vocabulary": vocab}

    def default_checkpoint(self) -> Path:
        key = json.dumps({"arch": self.arch(), "train": asdict(self.train_config), "seed": self.seed,
                          "corpus": hashlib.sha256("\n".join(self.corpus.sequences).encode()).hexdigest()},
                         sort_keys=True)
        return gradindex_home() / "checkpoints" / f"lm-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def train(self, path: str | Path | None = None, indices: Sequence[int] | None = None,
              seed: int | None = None) -> Path:
        """Train on the training sequences at ``indices`` (default: all) and save a checkpoint at ``path``."""
        model = train_lm(self, indices, self.seed if seed is None else int(seed), self.train_config)
        return save_checkpoint(model, self.arch(), path or self.default_checkpoint())

    # -- data -----------------------------------------------------------------------------------

    def metadata(self, dataset: Sequence) -> dict[str, np.ndarray]:
        if dataset is not self._train_items:
            return {}
        return {"text": np.array(self.corpus.sequences, dtype=object)}

    def query_records(self) -> list[dict[str, Any]]:
        """The default query records: the corpus's sampled facts as ``{prompt, completion, span}``."""
        return [self.corpus.query(self.corpus.facts[i]) for i in self.corpus.query_facts()]

    def query_dataset(self) -> Sequence:
        return [self.query_item(record, f"default query {n}") for n, record in enumerate(self.query_records())]
