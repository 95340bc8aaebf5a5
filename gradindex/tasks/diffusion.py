"""Built-in task ``diffusion``: a tiny conditional DDPM on synthetic subject × style × background images.

Data: :mod:`gradindex.tasks.concepts` generates the images from ``data/concepts.json``
(option ``config``; ``num_train`` overrides its size): 16×16 RGB, 5 subjects × 5
styles × 4 backgrounds with position/size jitter, 5 subject × style combinations
withheld from training. Metadata columns ``subject``, ``style``, ``background`` (display
and evaluation only). Items are ``(image [3, H, W] in [-1, 1], tokens [3], key)``; the
key (the sample id, or ``-1 − i`` for query ``i``) seeds the item's noise draws.

Model, training and sampler: :mod:`gradindex.tasks.diffusion_model` (patch mixer
conditioned on one token per factor, classifier-free dropout, DDIM). The default
checkpoint is trained on first use and cached under ``$GRADINDEX_HOME/checkpoints``.

Losses (all over ``R = draws`` fixed, seeded ``(t, ε)`` draws per item; the model sees
``R·B`` rows, an item's rows contiguous):

* training loss ``ℓ(x) = mean_r ‖ε̂(x_t, t, c) − ε‖²`` with the item's own tokens;
* measurement ``m(q) = −ℓ(q)`` (higher = the model produces ``q`` more);
* concept measurement ``m_c(q) = mean_r (‖ε̂(x_t, t, c with c nulled) − ε‖² − ‖ε̂(x_t, t, c) − ε‖²)``:
  how much concept ``c``'s token helps the model denoise ``q`` (DESIGN §1.4). Terms the
  nulled and full predictions share cancel, so only what the model draws from ``c``
  drives its gradient. The model sees ``2R·B`` rows.

Query files (``load_queries``): ``.npz`` with ``images [n, H, W, 3]`` uint8 and string
arrays ``subject``, ``style``, ``background`` (the prompts), as :meth:`DiffusionTask.save_queries`
writes them.
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
from gradindex.errors import ArtifactNotFoundError, ConfigError
from gradindex.inputs import read_npz, resample_image
from gradindex.task import Task
from gradindex.inputs import json_array
from gradindex.tasks.checkpoints import gradindex_home, load_or_train, save_checkpoint
from gradindex.tasks.concepts import FACTORS, ConceptConfig, ConceptImages, generate
from gradindex.tasks.diffusion_model import (
    ModelConfig,
    PatchMixer,
    TrainConfig,
    denoising_errors,
    fixed_draws,
    sample,
    train_model,
)

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "data" / "concepts.json"
ARCH_KIND = "patch-mixer"
DRAW_SEED = 0
DEFAULT_QUERIES = 120


class ConceptDataset(torch.utils.data.Dataset):
    """``(image [3, H, W] float in [-1, 1], tokens [3] int64, key int64)`` items over uint8 images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, keys: np.ndarray):
        if not (len(images) == len(labels) == len(keys)):
            raise ConfigError(f"concept dataset: {len(images)} images, {len(labels)} labels, {len(keys)} keys")
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.keys = np.asarray(keys, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().contiguous() / 127.5 - 1
        return image, torch.from_numpy(self.labels[i]), torch.tensor(self.keys[i])


class DiffusionTask(Task):
    """The built-in conditional diffusion task; see the module docstring.

    Options: ``config`` (a concepts JSON), ``num_train`` (overrides the config's),
    ``seed`` (training seed), ``draws`` (noise draws per example), ``steps``
    (training steps), ``width``, ``depth``.
    """

    concepts = FACTORS
    checkpoint_prefix = "diffusion"

    def __init__(self, config: str | None = None, num_train: int | None = None, seed: int = 0, draws: int = 4,
                 steps: int = TrainConfig.steps, width: int = 96, depth: int = 3):
        path = Path(config) if config else DEFAULT_CONFIG
        if not config and not DEFAULT_CONFIG.is_file():
            raise ArtifactNotFoundError(
                f"the diffusion task's default concepts config {DEFAULT_CONFIG} is missing (it ships in the source "
                "tree's data/); pass --task-option config=PATH/concepts.json"
            )
        for name, value in (("draws", draws), ("steps", steps), ("num_train", num_train or 1)):
            require_positive(value, f"diffusion task {name}")
        self.concept_config = ConceptConfig.load(path)
        self.num_train = int(num_train or self.concept_config.num_train)
        self.seed = int(seed)
        self.draws = int(draws)
        self.options = {"config": str(config) if config else None, "num_train": num_train, "seed": self.seed,
                        "draws": self.draws, "steps": steps, "width": width, "depth": depth}
        values = tuple(len(self.concept_config.values(f)) for f in FACTORS)
        self.model_config = ModelConfig(values, image_size=self.concept_config.image_size, width=width, depth=depth)
        self.train_config = TrainConfig(steps=steps)
        self._data: ConceptImages | None = None
        self._train: ConceptDataset | None = None

    # -- data -----------------------------------------------------------------------------------
    @property
    def data(self) -> ConceptImages:
        if self._data is None:
            self._data = generate(self.concept_config, self.num_train)
        return self._data

    def train_dataset(self) -> Sequence:
        if self._train is None:
            self._train = ConceptDataset(self.data.images, self.data.labels, np.arange(len(self.data)))
        return self._train

    def metadata(self, dataset: Sequence) -> dict[str, np.ndarray]:
        if not isinstance(dataset, ConceptDataset):
            return {}
        # the null token (an unspecified factor of a generated query; diffusion-text: label -1) reads ""
        return {f: np.array([*self.concept_config.values(f), ""])[dataset.labels[:, j]] for j, f in enumerate(FACTORS)}

    def tokens(self, prompts: Sequence[Sequence[str | None]]) -> np.ndarray:
        """``[n, 3]`` token indices of ``(subject, style, background)`` name triples (``None`` or ``""``:
        the factor's null token)."""
        return np.array([[self.model_config.num_values[j] if name in (None, "") else
                          self.concept_config.index(f, str(name)) for j, (f, name) in enumerate(zip(FACTORS, prompt))]
                         for prompt in prompts], dtype=np.int64).reshape(-1, 3)

    def heldout_prompts(self, count: int | None = None) -> list[tuple[str, str, str]]:
        """Withheld subject × style combinations × every background, cycled to ``count``."""
        config = self.concept_config
        prompts = [(config.subjects[s], config.values("style")[t], background)
                   for s, t in config.withheld_combos() for background in config.values("background")]
        if count is None:
            return prompts
        return [prompts[i % len(prompts)] for i in range(count)]

    def random_prompts(self, count: int, seed: int = 0) -> list[tuple[str, str, str]]:
        """``count`` prompts with every factor drawn uniformly and independently (seeded), so
        that sharing one factor's value says nothing about the others (held-out combinations included)."""
        rng = np.random.default_rng([seed, 7])
        values = [self.concept_config.values(f) for f in FACTORS]
        return [tuple(v[int(rng.integers(len(v)))] for v in values) for _ in range(count)]

    def concept_prompts(self, concept: str, count: int, seed: int = 0) -> list[tuple[str | None, ...]]:
        """``count`` prompts that specify only ``concept`` (its values cycled, seeded order; the other
        factors ``None``): the queries ``w^c`` is learned from, so only what ``c`` draws drives them."""
        column = self.concept_column(concept)
        values = self.concept_config.values(concept)
        order = np.random.default_rng([seed, 11, column]).permutation(count)
        return [tuple(values[int(i) % len(values)] if j == column else None for j in range(len(FACTORS)))
                for i in order]

    def concept_queries(self, concept: str) -> Sequence:
        """:data:`DEFAULT_QUERIES` generations of :meth:`concept_prompts` from the default checkpoint."""
        return self.generate(self.load_model(None), self.concept_prompts(concept, DEFAULT_QUERIES, seed=1), seed=1)

    def generate(self, model: nn.Module, prompts: Sequence[Sequence[str]], seed: int = 0, steps: int = 25,
                 guidance: float = 2.0) -> ConceptDataset:
        """Generated images of ``prompts`` (name triples) as a query dataset (keys ``-1 − i``)."""
        tokens = self.tokens(prompts)
        return ConceptDataset(sample_pixels(model, tokens, seed, steps, guidance), tokens, -1 - np.arange(len(tokens)))

    def sample_queries(self, model: nn.Module, count: int, seed: int = 0) -> Sequence:
        """Generations of :meth:`random_prompts` (seeded)."""
        return self.generate(model, self.random_prompts(count, seed), seed=seed)

    def query_dataset(self) -> Sequence:
        """:data:`DEFAULT_QUERIES` generations of random prompts from the default checkpoint: the default
        queries weights are learned from (write held-out-combination queries with
        ``tools/make_diffusion_queries.py`` to evaluate on)."""
        return self.sample_queries(self.load_model(None), DEFAULT_QUERIES, seed=1)

    def save_queries(self, path: str | Path, dataset: ConceptDataset) -> Path:
        from gradindex.store.feature_store import write_arrays

        path = Path(path)
        names = self.metadata(dataset)
        write_arrays(path, {"images": dataset.images, **{f: names[f].astype(str) for f in FACTORS}})
        return path

    def load_queries(self, path: str | Path) -> Sequence:
        images, prompts, _ = self._read_query_file(path)
        return self._query_arrays(images, prompts, str(path))

    def _read_query_file(self, path: str | Path, extra: tuple[str, ...] = ()) -> tuple[np.ndarray, list, dict]:
        """``(images, prompts [(subject, style, background)], {extra field: array})`` of a query ``.npz``."""
        data = read_npz(path, f"{self._spec_name()} queries")
        fields = ("images", *FACTORS, *extra)
        missing = [key for key in fields if key not in data]
        if missing:
            raise ConfigError(f"{path}: expected arrays {', '.join(fields)}; missing {missing}")
        if any(data[f].ndim != 1 or data[f].dtype.kind not in "USO" for f in FACTORS):
            raise ConfigError(f"{path}: {', '.join(FACTORS)} must be 1-d arrays of value names (strings)")
        prompts = list(zip(*(data[f].astype(str) for f in FACTORS)))
        return data["images"], prompts, {f: data[f] for f in extra}

    def queries_from_json(self, inputs: Any) -> Sequence:
        """``{"images": [n, H, W, 3] integers 0..255, "subject": [n], "style": [n], "background": [n]}``:
        the arrays of a query ``.npz``."""
        images, prompts, _ = self._json_fields(inputs)
        return self._query_arrays(images, prompts, "inputs")

    def query_from_image(self, image: np.ndarray, fields: dict[str, Any]) -> dict[str, Any]:
        """An uploaded image (0..1) resampled to the task's size as 0..255 RGB, with the prompt's fields
        (``{"subject": ..., "style": ..., "background": ...}``; names of their values) as one query."""
        size = self.concept_config.image_size
        pixels = resample_image(image, size, size)
        pixels = np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels
        rgb = np.clip(np.round(pixels * 255), 0, 255).astype(int)
        if not all(isinstance(value, str) for value in fields.values()):
            raise ConfigError(f"fields: expected names (strings) for {', '.join(FACTORS)}, got {fields}")
        return {"images": [rgb.tolist()], **{name: [value] for name, value in fields.items()}}

    def _json_fields(self, inputs: Any, extra: tuple[str, ...] = ()) -> tuple[np.ndarray, list, dict[str, np.ndarray]]:
        """``(images [n, H, W, 3] uint8, prompts [(subject, style, background)], {extra field: array})``
        from a request's JSON ``inputs`` (exactly the fields images, the factors and ``extra``)."""
        fields = ("images", *FACTORS, *extra)
        if not isinstance(inputs, dict) or set(inputs) != set(fields):
            keys = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
            raise ConfigError(f"inputs: expected an object with {', '.join(fields)}; got {keys}")
        images = json_array(inputs["images"], "inputs.images")
        if (images.ndim != 4 or images.dtype.kind not in "iu" or not images.size or images.min() < 0
                or images.max() > 255):
            raise ConfigError(f"inputs.images: expected integers in 0..255 of shape [n, H, W, 3], got "
                              f"{images.dtype} {tuple(images.shape)}")
        names = [json_array(inputs[f], f"inputs.{f}") for f in FACTORS]
        if any(n.dtype.kind != "U" or n.ndim != 1 for n in names):
            raise ConfigError(f"inputs: {', '.join(FACTORS)} must be lists of names")
        return images.astype(np.uint8), list(zip(*names)), {f: json_array(inputs[f], f"inputs.{f}") for f in extra}

    def _query_arrays(self, images: np.ndarray, prompts: list[tuple[str, str, str]], where: str) -> Sequence:
        size = self.concept_config.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8 or not len(images):
            raise ConfigError(f"{where}: expected uint8 images of shape [n, {size}, {size}, 3], got "
                              f"{images.dtype} {tuple(images.shape)}")
        if len(prompts) != len(images):
            raise ConfigError(f"{where}: {len(images)} images but {len(prompts)} prompts")
        return ConceptDataset(images, self.tokens(prompts), -1 - np.arange(len(images)))

    # -- model ----------------------------------------------------------------------------------
    def arch(self) -> dict[str, Any]:
        return {"kind": ARCH_KIND, **asdict(self.model_config)}

    def default_checkpoint(self) -> Path:
        key = json.dumps({"arch": self.arch(), "train": asdict(self.train_config), "seed": self.seed,
                          "data": self.concept_config.fingerprint(), "num_train": self.num_train}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return gradindex_home() / "checkpoints" / f"{self.checkpoint_prefix}-{digest}.pt"

    def train(self, path: str | Path | None = None, indices: Sequence[int] | None = None,
              seed: int | None = None) -> Path:
        """Train on the training images at ``indices`` (default: all) and save a checkpoint at ``path``."""
        rows = np.arange(len(self.data)) if indices is None else np.asarray(indices, dtype=np.int64)
        if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= len(self.data):
            raise ConfigError(f"diffusion train: indices must be positions in 0..{len(self.data) - 1}")
        images = torch.from_numpy(self.data.images[rows]).permute(0, 3, 1, 2).float().contiguous() / 127.5 - 1
        model = train_model(self.model_config, images, torch.from_numpy(self.data.labels[rows]), self.train_config,
                            seed=self.seed if seed is None else int(seed))
        return save_checkpoint(model, self.arch(), path or self.default_checkpoint())

    def load_model(self, checkpoint: str | Path | None) -> nn.Module:
        return load_or_train(self, checkpoint, lambda: PatchMixer(self.model_config), self.arch(), "diffusion",
                             "DiffusionTask(...).train(path) writes one", "diffusion task's model (a few minutes)")

    # -- losses ---------------------------------------------------------------------------------
    def _errors(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Per-draw denoising errors ``[B, R]`` (an item's ``R`` rows contiguous, draws seeded by its key)."""
        images, tokens, keys = batch
        t, noise = fixed_draws(keys.tolist(), self.draws, self.model_config.timesteps, tuple(images.shape[1:]),
                               DRAW_SEED)
        x0 = images.repeat_interleave(self.draws, dim=0)
        rows = tokens.repeat_interleave(self.draws, dim=0)
        errors = denoising_errors(model, x0, t.to(images.device), noise.to(images.device), rows)
        return errors.reshape(-1, self.draws)

    def compute_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self._errors(batch, model).mean(1)

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return -self.compute_train_loss(batch, model)

    def concept_measurement(self, batch: Any, model: nn.Module, concept: str) -> torch.Tensor:
        column = self.concept_column(concept)
        images, tokens, keys = batch
        nulled = tokens.clone()
        nulled[:, column] = self.model_config.num_values[column]
        return self._contrast(images, tokens, nulled, keys, model)

    def concept_column(self, concept: str) -> int:
        if concept not in FACTORS:
            raise ConfigError(f"{self._spec_name()} task: concept must be one of {', '.join(FACTORS)}, got {concept!r}")
        return FACTORS.index(concept)

    def _spec_name(self) -> str:
        return getattr(self, "_spec", self.checkpoint_prefix)

    def _contrast(self, images: torch.Tensor, full: torch.Tensor, changed: torch.Tensor, keys: torch.Tensor,
                  model: nn.Module) -> torch.Tensor:
        """``mean_r (error with the changed condition − error with the full one)`` ``[B]``, shared draws;
        one forward over 2R rows per item (R full, then R changed; an item's rows contiguous)."""
        pairs = torch.stack([full, changed], dim=1).reshape(-1, *full.shape[1:])
        doubled = (images.repeat_interleave(2, dim=0), pairs, keys.repeat_interleave(2))
        errors = self._errors(doubled, model).reshape(len(keys), 2, self.draws)
        return (errors[:, 1] - errors[:, 0]).mean(1)

    # -- display --------------------------------------------------------------------------------
    def render(self, item: Any) -> np.ndarray:
        return ((item[0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)

    def describe(self, item: Any) -> str:
        tokens = item[1].tolist()
        return " ".join(self.concept_config.values(f)[v] if v < len(self.concept_config.values(f)) else "-"
                        for f, v in zip(FACTORS, tokens))


def sample_pixels(model: nn.Module, tokens: np.ndarray, seed: int, steps: int, guidance: float) -> np.ndarray:
    """DDIM samples of condition ``tokens [n, ...]`` as uint8 images ``[n, H, W, 3]``."""
    images = sample(model, torch.from_numpy(tokens), steps=steps, guidance=guidance, seed=seed)
    return ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
