"""Built-in task ``lm-deep``: a 6-layer causal transformer on Python's language reference.

Data: :mod:`gradindex.tasks.pydoc_corpus` — the help topics of ``pydoc_data.topics``
(real English prose with grammar and code examples, shipped with every CPython; the
text follows the interpreter's version), word-level tokens with an ``<unk>``, packed
into training sequences of 32 tokens; every 8th chunk of a topic is held out. Each
training item is ``<bos>`` + the sequence.

Model: :class:`~gradindex.tasks.lm.TinyTransformer` (pre-norm GPT, untied head, no
dropout) with 6 layers of width 64 and 4 heads: every module is its own default group,
52 groups (``tok_emb``, ``pos_emb``, per layer ``ln1``, ``attn.q/k/v/out``, ``ln2``,
``mlp.up/down``, then ``ln_f`` and ``head``). Training: :func:`~gradindex.tasks.lm.train_lm`
(AdamW, warm-up and cosine decay, seeded, one CPU thread), 8 epochs of the full training
set; a model trained on a subset of ``n`` of the ``N`` sequences gets ``round(8 · N / n)``
epochs, so that every model takes about the same number of optimizer steps (:meth:`DeepLMTask.epochs_for`).
Trained for 8 epochs, the LDS models on random halves were far less trained than the
full-data model (perplexity 85 against 39 on the queries) and uniform Gram LDS was 0.04;
with equal steps it is 0.13 (24 models, the eval split; docs/tasks.md). The default checkpoint
is trained on first use and cached under ``$GRADINDEX_HOME/checkpoints``.

Queries (default): every held-out chunk, its first 16 tokens as the prompt and the
other 16 as the completion; the measurement is the completion's log-probability
(:mod:`gradindex.tasks.causal_lm`). Query files are the causal-LM JSONL format.

Retrieval check (natural text plants no facts): the held-out chunk's **topic** (the
pydoc topic it comes from) is stored as query and training metadata (``topic``), so
topic precision@k — the fraction of a query's top-k training sequences from the
query's topic — measures whether attribution finds the text the span came from
(``tools/lm_topic_retrieval.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.tasks.causal_lm import completion_item, sequence_item
from gradindex.tasks.checkpoints import gradindex_home, save_checkpoint
from gradindex.tasks.lm import ModelConfig, TinyTransformerTask, TrainConfig, train_lm
from gradindex.tasks.pydoc_corpus import PydocCorpus, PydocCorpusConfig, build_corpus

logger = logging.getLogger(__name__)

ARCH_KIND = "tiny-transformer"
DEFAULT_TRAIN = TrainConfig(epochs=8, batch_size=32, lr=3e-3, warmup_steps=20)


class QueryItems(list):
    """The default query items, with each one's topic name (``topics [Q]``) for metadata."""

    def __init__(self, items: Sequence[dict[str, torch.Tensor]], topics: np.ndarray):
        super().__init__(items)
        self.topics = topics


class DeepLMTask(TinyTransformerTask):
    """The built-in ``lm-deep`` task; see the module docstring. Options: ``seed`` (training seed),
    ``layers``, ``width``, ``heads``, ``epochs``."""

    name = "lm-deep"

    def __init__(self, seed: int = 0, layers: int = 6, width: int = 64, heads: int = 4,
                 epochs: int = DEFAULT_TRAIN.epochs):
        self.seed = int(seed)
        self.options = {"seed": self.seed, "layers": layers, "width": width, "heads": heads, "epochs": epochs}
        self.corpus: PydocCorpus = build_corpus(PydocCorpusConfig(min_count=4))
        self.tokenizer = self.corpus.tokenizer
        self.pad_id = self.tokenizer.pad_id
        self.bos_ids = (self.tokenizer.bos_id,)
        self.train_config = TrainConfig(**{**asdict(DEFAULT_TRAIN), "epochs": epochs})
        self.model_config = ModelConfig(len(self.tokenizer), max_length=self.corpus.config.length + 1, width=width,
                                        layers=layers, heads=heads)
        self.max_length = self.model_config.max_length
        self._train_items = [sequence_item([*self.bos_ids, *ids]) for ids in self.corpus.sequences]
        self._queries: QueryItems | None = None

    # -- model ----------------------------------------------------------------------------------
    def arch(self) -> dict[str, Any]:
        """What a checkpoint must match: the model config and a hash of the vocabulary."""
        vocab = hashlib.sha256("\n".join(self.tokenizer.vocabulary).encode()).hexdigest()[:16]
        return {"kind": ARCH_KIND, **asdict(self.model_config), "vocabulary": vocab}

    def default_checkpoint(self) -> Path:
        text = hashlib.sha256(json.dumps(self.corpus.sequences).encode()).hexdigest()
        key = json.dumps({"arch": self.arch(), "train": asdict(self.train_config), "seed": self.seed,
                          "corpus": text}, sort_keys=True)
        return gradindex_home() / "checkpoints" / f"lm-deep-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def epochs_for(self, count: int) -> int:
        """Epochs of a model trained on ``count`` sequences: as many optimizer steps as the full set's
        ``train_config.epochs`` epochs, ``max(1, round(epochs · N / count))``."""
        return max(1, round(self.train_config.epochs * len(self._train_items) / max(1, count)))

    def train(self, path: str | Path | None = None, indices: Sequence[int] | None = None,
              seed: int | None = None) -> Path:
        """Train on the training sequences at ``indices`` (default: all) and save a checkpoint at ``path``."""
        count = len(self._train_items) if indices is None else len(indices)
        config = dataclasses.replace(self.train_config, epochs=self.epochs_for(count))
        model = train_lm(self, indices, self.seed if seed is None else int(seed), config)
        return save_checkpoint(model, self.arch(), path or self.default_checkpoint())

    # -- data -----------------------------------------------------------------------------------

    def topic_names(self, topics: Sequence[int]) -> np.ndarray:
        return np.array([self.corpus.topic_names[t] for t in topics], dtype=object)

    def metadata(self, dataset: Sequence) -> dict[str, np.ndarray]:
        if dataset is self._train_items:
            texts = [self.decode(ids) for ids in self.corpus.sequences]
            return {"topic": self.topic_names(self.corpus.sequence_topics), "text": np.array(texts, dtype=object)}
        if isinstance(dataset, QueryItems):
            return {"topic": dataset.topics}
        return {}

    def query_records(self) -> list[dict[str, Any]]:
        """The default queries as JSONL records ``{prompt, completion, meta: {topic}}`` (text, re-tokenized
        exactly: every token of the text is a vocabulary entry)."""
        return [{"prompt": self.decode(prompt), "completion": self.decode(completion),
                 "meta": {"topic": self.corpus.topic_names[topic]}}
                for (prompt, completion), topic in zip(self.corpus.queries, self.corpus.query_topics)]

    def query_dataset(self) -> Sequence:
        if self._queries is None:
            items = [completion_item([*self.bos_ids, *prompt], completion) for prompt, completion in self.corpus.queries]
            self._queries = QueryItems(items, self.topic_names(self.corpus.query_topics))
        return self._queries
