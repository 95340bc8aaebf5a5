"""Built-in tasks ``diffusion-text`` and ``diffusion-text-lora``: prompts in words, a frozen encoder, cross-attention.

Data: the ``diffusion`` task's images (:mod:`gradindex.tasks.concepts`, same options), each
captioned once, in a template drawn for it from the config's seed
(:mod:`gradindex.tasks.prompts`: "a yellow striped circle on grass", "grass background ,
circle , yellow striped", ...). Model: :mod:`gradindex.tasks.text_diffusion_model` — a
frozen prompt encoder read by cross-attention; no trainable parameter belongs to one concept
value (the ``diffusion`` task's per-factor embedding rows do not exist here). Items are
``(image [3, H, W] in [-1, 1], prompts [4, L] int64, key)``: the caption's token ids, then
the same caption with the subject, the style, the background written with its neutral word.

Losses over ``R = draws`` fixed ``(t, ε)`` draws per item, as in the ``diffusion`` task:

* ``ℓ(x) = mean_r ‖ε̂(x_t, t, prompt) − ε‖²``, ``m(q) = −ℓ(q)``;
* ``m_c(q) = mean_r (‖ε̂(x_t, t, prompt with c's words neutral) − ε‖² − ‖ε̂(x_t, t, prompt) − ε‖²)``:
  how much the words of concept ``c`` help denoise ``q``, through the encoder (shared draws;
  ``2R·B`` rows). With ``isolate_words`` (the default) its gradient reaches the
  cross-attention keys and values only through the positions of ``c``'s words (its value
  words in the full prompt, its neutral word in the other; every other position's keys and
  values are detached): a key/value projection's gradient ``Σ_j δ_j e_jᵀ`` then keeps only
  the terms of ``c``'s words, as the ``diffusion`` task's ``m_c`` reaches only ``c``'s null
  and value rows. Without it, changing ``c``'s words also moves the gradient at every other
  word (attention renormalises), and those terms match training images by their *other*
  concepts (measured: the subject partition's top-10 shared the query's background at 0.55,
  chance 0.25). Parameters outside the keys and values get the full gradient either way.

* ``concept_measure=denoise``: ``m_c(q) = −mean_r ½(‖ε̂(x_t, t, prompt) − ε‖² + ‖ε̂(x_t, t, prompt with
  c's words neutral) − ε‖²)``, isolated the same way: the full prompt's side reaches the training
  captions that name ``c``'s value (as ``contrast`` does), the neutral side's reaches those that
  write ``c`` with the neutral word — the training images whose caption does not name it. In
  ``contrast`` that side enters with the opposite sign (a neutral-captioned image like ``q`` makes
  the neutral prompt denoise ``q`` better, so it *lowers* ``m_c``), and a query whose prompt does
  not name ``c`` (an image-only query) has ``m_c ≡ 0``; under ``denoise`` it is the image's own
  denoising loss through ``c``'s neutral word.

**Sparse captions** (options ``caption_style`` and ``caption_background``, built-ins
``diffusion-text-sparse`` and ``diffusion-text-sparse-lora``: 0.3 and 0.2): each training caption
names the subject, and the style / background only with that probability (seeded per image,
:attr:`DiffusionTextTask.named`), writing the neutral word otherwise; the model trains on those
captions. Metadata keep the images' true values and add ``<factor>_named`` (bool), so
:mod:`gradindex.eval.ranking` can score the training images a caption search cannot find.
:meth:`DiffusionTextTask.image_queries` are held-out images whose caption names nothing.

Training: seeded AdamW with classifier-free dropout per factor (its words replaced by the
neutral word, p = 0.15 each) and of the whole prompt (the empty prompt, p = 0.1).

**LoRA variant** (option ``lora_rank`` > 0; built-in ``diffusion-text-lora``): the
subject × style combinations seen in training are split in two halves by their diagonal
``(style − subject) mod #styles`` (every subject and every style occurs in both). The base
model is pretrained on the images of the first half (cached like every checkpoint), then
:func:`~gradindex.tasks.lora.add_lora` adapts the ``lora_targets`` linears (default: every
cross-attention projection) and only the adapters are fine-tuned on the second half, which
is this task's training set: attribution runs over the fine-tuning images, with the LoRA
factors as the only parameter groups (the base is frozen).

Query files (``load_queries``): ``.npz`` with ``images [n, H, W, 3]`` uint8, string arrays
``subject``, ``style``, ``background`` (``""`` = unspecified, written with the neutral word)
and ``template [n]`` int, as :meth:`DiffusionTextTask.save_queries` writes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradindex.config import require_positive
from gradindex.errors import ConfigError
from gradindex.tasks.checkpoints import gradindex_home, load_checkpoint, load_or_train, save_checkpoint
from gradindex.tasks.concepts import FACTORS, generate
from gradindex.tasks.diffusion import ConceptDataset, DiffusionTask, sample_pixels
from gradindex.tasks.diffusion_model import TrainConfig, train_denoiser
from gradindex.tasks.lora import add_lora
from gradindex.tasks.prompts import BOS, PAD, TEMPLATES, Prompter
from gradindex.tasks.text_diffusion_model import TextModelConfig, TextPatchMixer

logger = logging.getLogger(__name__)

ARCH_KIND = "text-patch-mixer"
#: per-factor classifier-free dropout (neutral word) and whole-prompt dropout (empty prompt)
DROP_FACTOR, DROP_ALL = 0.15, 0.1
DEFAULT_LORA_TARGETS = "blocks.*.cross.*"
#: m_c: the error difference (today's), or the denoising loss under both prompts (see the module docstring)
CONCEPT_MEASURES = ("contrast", "denoise")


class TextConceptDataset(ConceptDataset):
    """``(image [3, H, W] in [-1, 1], prompts [4, L] int64, key)`` items; see the module docstring.

    ``labels [n, 3]`` (``-1``: unspecified) are the images' values; ``named [n, 3]`` (default: all
    true) says which of them the caption names (the others are written with the neutral word),
    ``templates [n]`` in which template.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, templates: np.ndarray, keys: np.ndarray,
                 prompter: Prompter, named: np.ndarray | None = None):
        super().__init__(images, np.asarray(labels).reshape(-1, 3), keys)
        if len(templates) != len(keys):
            raise ConfigError(f"text concept dataset: {len(keys)} images, {len(templates)} templates")
        self.templates = np.asarray(templates, dtype=np.int64)
        self.named = np.ones(self.labels.shape, dtype=bool) if named is None else np.asarray(named, dtype=bool)
        if self.named.shape != self.labels.shape:
            raise ConfigError(f"text concept dataset: named {self.named.shape}, labels {self.labels.shape}")
        self.prompts = prompter.variants(self.caption_labels, self.templates)  # [n, 4, L]

    @property
    def caption_labels(self) -> np.ndarray:
        """``[n, 3]`` what the captions say: the labels, ``-1`` (the neutral word) where a factor is not named."""
        return np.where(self.named, self.labels, -1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, _, key = super().__getitem__(i)
        return image, torch.from_numpy(self.prompts[i]), key


class DiffusionTextTask(DiffusionTask):
    """The built-in text-conditioned diffusion task (and its LoRA variant); see the module docstring.

    Options: those of ``diffusion`` (``config``, ``num_train``, ``seed``, ``draws``, ``steps``,
    ``width``, ``depth``) plus ``heads`` (cross-attention heads), ``text_seed`` and ``text_dim``
    (the frozen encoder's weights and width), ``isolate_words`` (``m_c``'s key/value gradients
    through ``c``'s words only), ``lora_rank`` (0: no LoRA), ``lora_steps``, ``lora_targets``
    (comma-separated globs over module names), ``concept_measure`` (``contrast`` or ``denoise``), ``caption_style`` and ``caption_background`` (the
    fraction of training captions naming the image's style / background, default 1; see
    "Sparse captions" in the module docstring).
    """

    checkpoint_prefix = "diffusion-text"

    def __init__(self, config: str | None = None, num_train: int | None = None, seed: int = 0, draws: int = 4,
                 steps: int = TrainConfig.steps, width: int = 96, depth: int = 3, heads: int = 4, text_seed: int = 0,
                 text_dim: int = 64, isolate_words: bool = True, lora_rank: int = 0, lora_steps: int = 800,
                 lora_targets: str = DEFAULT_LORA_TARGETS, caption_style: float = 1.0,
                 caption_background: float = 1.0, concept_measure: str = "contrast"):
        super().__init__(config=config, num_train=num_train, seed=seed, draws=draws, steps=steps, width=width,
                         depth=depth)
        require_positive(lora_steps, "diffusion-text lora_steps")
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise ConfigError(f"diffusion-text lora_rank: expected an integer >= 0, got {lora_rank!r}")
        self.prompter = Prompter(self.concept_config)
        self.model_config = TextModelConfig(self.prompter.vocab_size, self.prompter.max_len,
                                            image_size=self.concept_config.image_size, width=width, depth=depth,
                                            heads=heads, text_dim=text_dim, text_seed=int(text_seed))
        if not isinstance(isolate_words, bool):
            raise ConfigError(f"diffusion-text isolate_words: expected true or false, got {isolate_words!r}")
        self.isolate_words = isolate_words
        self.lora_rank = lora_rank
        self.lora_targets = tuple(p.strip() for p in str(lora_targets).split(",") if p.strip())
        if lora_rank and not self.lora_targets:
            raise ConfigError("diffusion-text lora_targets: expected comma-separated module-name globs")
        self.lora_config = TrainConfig(steps=lora_steps)
        self.caption_rates = (1.0, _fraction(caption_style, "caption_style"),
                              _fraction(caption_background, "caption_background"))
        self.options.update({"heads": heads, "text_seed": int(text_seed), "text_dim": text_dim,
                             "isolate_words": isolate_words, "lora_rank": lora_rank, "lora_steps": lora_steps,
                             "lora_targets": ",".join(self.lora_targets)})
        if concept_measure not in CONCEPT_MEASURES:
            raise ConfigError(f"diffusion-text concept_measure: expected one of {', '.join(CONCEPT_MEASURES)}, "
                              f"got {concept_measure!r}")
        self.concept_measure = concept_measure
        if min(self.caption_rates) < 1:  # only then: today's stores keep their options
            self.options.update({"caption_style": self.caption_rates[1], "caption_background": self.caption_rates[2]})
        if concept_measure != "contrast":
            self.options["concept_measure"] = concept_measure
        if lora_rank:
            self.checkpoint_prefix = "diffusion-text-lora"
        self._captions: np.ndarray | None = None
        self._named: np.ndarray | None = None

    # -- data -----------------------------------------------------------------------------------
    @property
    def captions(self) -> np.ndarray:
        """The template of every generated training image ``[num_train]`` (seeded by the config's seed)."""
        if self._captions is None:
            rng = np.random.default_rng([self.concept_config.seed, 17])
            self._captions = rng.integers(0, len(TEMPLATES), size=len(self.data))
        return self._captions

    @property
    def named(self) -> np.ndarray:
        """``[num_train, 3]`` bool: which factors each generated image's caption names — the subject
        always, the style and the background independently with probability ``caption_style`` /
        ``caption_background`` (seeded by the config's seed; all true at the default rates of 1)."""
        if self._named is None:
            draws = np.random.default_rng([self.concept_config.seed, 29]).random((len(self.data), 3))
            self._named = draws < np.array(self.caption_rates)
        return self._named

    def halves(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the generated images ``(pretraining [n1], fine-tuning [n2])`` of the LoRA variant:
        the subject × style diagonals ``(style − subject) mod #styles`` present in training, the first
        half of them (sorted) for pretraining, the rest for fine-tuning."""
        styles = len(self.concept_config.values("style"))
        diagonal = (self.data.labels[:, 1] - self.data.labels[:, 0]) % styles
        present = np.unique(diagonal)
        if len(present) < 2:
            raise ConfigError("diffusion-text LoRA variant: the training combinations lie on one diagonal; "
                              "nothing to split into pretraining and fine-tuning")
        first = np.isin(diagonal, present[: len(present) // 2])
        return np.flatnonzero(first), np.flatnonzero(~first)

    def _rows(self) -> np.ndarray:
        """Positions of the generated images that form this task's training set."""
        return self.halves()[1] if self.lora_rank else np.arange(len(self.data))

    def train_dataset(self) -> Sequence:
        if self._train is None:
            rows = self._rows()
            self._train = TextConceptDataset(self.data.images[rows], self.data.labels[rows], self.captions[rows],
                                             rows, self.prompter, self.named[rows])
        return self._train

    def metadata(self, dataset: Sequence) -> dict[str, np.ndarray]:
        """Columns ``subject``, ``style``, ``background`` (the images' value names, ``""`` = unspecified),
        ``prompt`` (the caption) and, with sparse captions, ``<factor>_named`` (bool: the caption names it)."""
        if not isinstance(dataset, TextConceptDataset):
            return {}
        meta = super().metadata(dataset)  # label -1 (unspecified) picks the trailing ""
        meta["prompt"] = np.array([self.prompter.text(row, t)
                                   for row, t in zip(dataset.caption_labels, dataset.templates)])
        if min(self.caption_rates) < 1:
            meta.update({f"{f}_named": dataset.named[:, j].copy() for j, f in enumerate(FACTORS)})
        return meta

    def labels(self, prompts: Sequence[Sequence[str | None]]) -> np.ndarray:
        """``[n, 3]`` value indices of name triples (``None`` or ``""``: unspecified, ``-1``)."""
        return np.array([[-1 if name in (None, "") else self.concept_config.index(f, str(name))
                          for f, name in zip(FACTORS, prompt)] for prompt in prompts], dtype=np.int64).reshape(-1, 3)

    def generate(self, model: nn.Module, prompts: Sequence[Sequence[str | None]], seed: int = 0, steps: int = 25,
                 guidance: float = 2.0, templates: Sequence[int] | None = None) -> TextConceptDataset:
        """Generations of ``prompts`` (name triples, ``None`` = unspecified) in ``templates`` (default:
        drawn from ``seed``) as a query dataset (keys ``-1 − i``)."""
        labels = self.labels(prompts)
        if templates is None:
            templates = np.random.default_rng([seed, 19]).integers(0, len(TEMPLATES), size=len(labels))
        templates = np.asarray(templates, dtype=np.int64)
        pixels = sample_pixels(model, self.prompter.encode(labels, templates), seed, steps, guidance)
        return TextConceptDataset(pixels, labels, templates, -1 - np.arange(len(labels)), self.prompter)

    def image_queries(self, count: int, seed: int = 0) -> TextConceptDataset:
        """``count`` held-out images (drawn like the training set, from another seed) with a caption that
        names nothing (every factor its neutral word): "whose style is this?". Labels: the true values."""
        images = generate(self.concept_config, count, seed=self.concept_config.seed + 1000 + int(seed))
        templates = np.random.default_rng([seed, 23]).integers(0, len(TEMPLATES), size=count)
        return TextConceptDataset(images.images, images.labels, templates, -1 - np.arange(count), self.prompter,
                                  np.zeros(images.labels.shape, dtype=bool))

    def save_queries(self, path: str | Path, dataset: TextConceptDataset) -> Path:
        from gradindex.store.feature_store import write_arrays

        path = Path(path)
        names = self.metadata(dataset)
        write_arrays(path, {"images": dataset.images, **{f: names[f].astype(str) for f in FACTORS},
                            "template": dataset.templates})
        return path

    def load_queries(self, path: str | Path) -> Sequence:
        images, prompts, extra = self._read_query_file(path, ("template",))
        return self._text_query_arrays(images, prompts, extra["template"], str(path))

    def queries_from_json(self, inputs: Any) -> Sequence:
        """``{"images": [n, H, W, 3] integers 0..255, "subject": [n], "style": [n], "background": [n],
        "template": [n]}``: the arrays of a query ``.npz`` (``""``: unspecified)."""
        images, prompts, extra = self._json_fields(inputs, ("template",))
        return self._text_query_arrays(images, prompts, extra["template"], "inputs")

    def _text_query_arrays(self, images: np.ndarray, prompts: list[tuple[str, str, str]], templates: np.ndarray,
                           where: str) -> Sequence:
        size = self.concept_config.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8 or not len(images):
            raise ConfigError(f"{where}: expected uint8 images of shape [n, {size}, {size}, 3], got "
                              f"{images.dtype} {tuple(images.shape)}")
        if not (len(prompts) == len(images) == len(templates)):
            raise ConfigError(f"{where}: {len(images)} images, {len(prompts)} prompts, {len(templates)} templates")
        if (templates.ndim != 1 or templates.dtype.kind not in "iu" or templates.min() < 0
                or templates.max() >= len(TEMPLATES)):
            raise ConfigError(f"{where}: template must be integers in 0..{len(TEMPLATES) - 1}")
        return TextConceptDataset(images, self.labels(prompts), templates, -1 - np.arange(len(images)),
                                  self.prompter)

    # -- model ----------------------------------------------------------------------------------
    def arch(self) -> dict[str, Any]:
        arch = {"kind": ARCH_KIND, **asdict(self.model_config)}
        if self.lora_rank:
            arch["lora"] = {"rank": self.lora_rank, "targets": list(self.lora_targets)}
        return arch

    def build_model(self) -> TextPatchMixer:
        """A fresh model (with frozen base and LoRA adapters in the LoRA variant); weights from ``seed``."""
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = TextPatchMixer(self.model_config)
        if self.lora_rank:
            add_lora(model, self.lora_targets, self.lora_rank, seed=self.seed)
        return model

    def _checkpoint_key(self, what: str) -> str:
        key = {"what": what, "arch": {"kind": ARCH_KIND, **asdict(self.model_config)},
               "train": asdict(self.train_config), "seed": self.seed, "data": self.concept_config.fingerprint(),
               "num_train": self.num_train}
        if min(self.caption_rates) < 1:  # today's checkpoints keep their names
            key["caption_rates"] = list(self.caption_rates)
        return json.dumps(key, sort_keys=True)

    def default_checkpoint(self) -> Path:
        key = self._checkpoint_key("full")
        if self.lora_rank:
            key += json.dumps({"lora": self.arch()["lora"], "train": asdict(self.lora_config)}, sort_keys=True)
        return gradindex_home() / "checkpoints" / f"{self.checkpoint_prefix}-{_digest(key)}.pt"

    def base_checkpoint(self) -> Path:
        """The LoRA variant's pretrained base (trained on the pretraining half on first use)."""
        digest = _digest(self._checkpoint_key("base"))
        return gradindex_home() / "checkpoints" / f"diffusion-text-base-{digest}.pt"

    def _fit(self, model: nn.Module, rows: np.ndarray, train: TrainConfig, seed: int, desc: str) -> nn.Module:
        """Train ``model``'s trainable parameters on the generated images at ``rows`` (their captions)."""
        images = torch.from_numpy(self.data.images[rows]).permute(0, 3, 1, 2).float().contiguous() / 127.5 - 1
        captions = np.where(self.named[rows], self.data.labels[rows], -1)
        table = torch.from_numpy(self.prompter.dropout_table(captions, self.captions[rows]))
        bits = torch.tensor([1, 2, 4])

        def conditions(batch_rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            drop = torch.rand(len(batch_rows), 3, generator=generator) < DROP_FACTOR
            variant = (drop.long() * bits).sum(1)
            variant = torch.where(torch.rand(len(batch_rows), generator=generator) < DROP_ALL, 8, variant)
            return table[batch_rows, variant]

        return train_denoiser(model, images, conditions, train, seed=seed, desc=desc)

    def train(self, path: str | Path | None = None, indices: Sequence[int] | None = None,
              seed: int | None = None) -> Path:
        """Train on the training set at ``indices`` (default: all) and save a checkpoint at ``path``.

        LoRA variant: the base is pretrained on the pretraining half (cached, independent of
        ``indices``); the adapters are fine-tuned on the fine-tuning images at ``indices``.
        """
        rows = self._rows()
        chosen = np.arange(len(rows)) if indices is None else np.asarray(indices, dtype=np.int64)
        if chosen.ndim != 1 or not len(chosen) or chosen.min() < 0 or chosen.max() >= len(rows):
            raise ConfigError(f"{self.checkpoint_prefix} train: indices must be positions in 0..{len(rows) - 1}")
        seed = self.seed if seed is None else int(seed)
        if not self.lora_rank:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = TextPatchMixer(self.model_config)
            model = self._fit(model, rows[chosen], self.train_config, seed, "train diffusion-text")
            return save_checkpoint(model, self.arch(), path or self.default_checkpoint())
        model = self._pretrained_base()
        add_lora(model, self.lora_targets, self.lora_rank, seed=seed)
        model = self._fit(model, rows[chosen], self.lora_config, seed, "fine-tune LoRA")
        return save_checkpoint(model, self.arch(), path or self.default_checkpoint())

    def _pretrained_base(self) -> TextPatchMixer:
        base_arch = {"kind": ARCH_KIND, **asdict(self.model_config)}
        path = self.base_checkpoint()
        if not path.is_file():
            logger.info("pretraining the diffusion-text-lora base model (first use) -> %s", path)
            with torch.random.fork_rng():
                torch.manual_seed(self.seed)
                model = TextPatchMixer(self.model_config)
            model = self._fit(model, self.halves()[0], self.train_config, self.seed, "pretrain diffusion-text")
            save_checkpoint(model, base_arch, path)
        return load_checkpoint(TextPatchMixer(self.model_config), path, base_arch, "diffusion-text",
                               "DiffusionTextTask(lora_rank=...).train() writes one")

    def load_model(self, checkpoint: str | Path | None) -> nn.Module:
        return load_or_train(self, checkpoint, self.build_model, self.arch(), self.checkpoint_prefix,
                             "DiffusionTextTask(...).train(path) writes one",
                             f"{self.checkpoint_prefix} task's model (a few minutes)")

    # -- losses ---------------------------------------------------------------------------------
    def compute_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        images, prompts, keys = batch
        return self._errors((images, prompts[:, 0], keys), model).mean(1)

    def concept_measurement(self, batch: Any, model: nn.Module, concept: str) -> torch.Tensor:
        column = self.concept_column(concept)
        images, prompts, keys = batch
        full, neutral = prompts[:, 0], prompts[:, 1 + column]
        if self.isolate_words:
            words = torch.from_numpy(self.prompter.concept_ids(concept)).to(full.device)
            full = torch.stack([full, torch.isin(full, words).long()], dim=1)
            neutral = torch.stack([neutral, torch.isin(neutral, words).long()], dim=1)
        if self.concept_measure == "contrast":
            return self._contrast(images, full, neutral, keys, model)
        pairs = torch.stack([full, neutral], dim=1).reshape(-1, *full.shape[1:])
        doubled = (images.repeat_interleave(2, dim=0), pairs, keys.repeat_interleave(2))
        return -self._errors(doubled, model).reshape(len(keys), 2 * self.draws).mean(1)

    # -- display --------------------------------------------------------------------------------
    def describe(self, item: Any) -> str:
        words = [self.prompter.vocabulary[int(i)] for i in item[1][0] if int(i) not in (PAD, BOS)]
        return " ".join(words)


def _fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"diffusion-text {name}: expected a fraction in 0..1, got {value!r}")
    return float(value)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]
