"""Query stage: query inputs → query vectors ``u(q)`` → top-k training examples.

In: a complete store with an index partition, the task's query inputs.
Out: :class:`~gradindex.index.TopK` (scores ``[n, k]``, sample ids ``[n, k]``).

``u(q) = [√w_g ψ_g(q)]`` with ``ψ_g(q) = −H_g⁻¹ P_g ∇m(q)``: the same groups,
seeds and projections as the stored training features, the partition's
preconditioner and weights. The sign makes a positive score mean "training on
x raises m(q)" (a proponent).

:class:`Attributor` keeps the model, projector, preconditioner and index warm
for many queries. It refuses a checkpoint whose parameters differ from the ones
the store was built from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.config import FeaturizeConfig, Preconditioner
from gradindex.errors import ConfigError, StoreMismatchError
from gradindex.featurize import featurize_rows, resolve_groups
from gradindex.gradients import GradientProjector
from gradindex.groups import ParameterGroup
from gradindex.index import GradIndex, TopK
from gradindex.precondition import QueryPreconditioner
from gradindex.store import FeatureStore
from gradindex.task import Task, load_task, model_fingerprint
from gradindex.weights import scaled_vectors


def load_store_task(store: FeatureStore) -> Task:
    spec = store.manifest["task"]
    return load_task(spec["task"], spec.get("options", {}))


class Attributor:
    """Warm query engine for one concept partition of a store."""

    def __init__(self, store: FeatureStore, task: Task, model: torch.nn.Module, index: GradIndex,
                 device: torch.device):
        self.store = store
        self.task = task
        self.model = model
        self.index = index
        self.device = device
        self.concept = index.config.concept
        config = FeaturizeConfig.from_dict(store.manifest["config"])
        groups = resolve_groups(task, model, config)
        stored = [ParameterGroup.from_dict(g).to_dict() for g in store.manifest["groups"]]
        if [g.to_dict() for g in groups] != stored:
            raise StoreMismatchError(
                f"{store.path}: the model's parameter groups differ from the store's; featurize again"
            )
        self.groups = [g.name for g in groups]
        self.projector = GradientProjector(model, groups, config.projection, device)
        partition = index.config
        self.preconditioner = QueryPreconditioner(
            partition.preconditioner,
            store.read_gram() if partition.preconditioner is Preconditioner.GRAM else None,
            partition.damping,
            self.groups,
        )
        self.weights = index.weights

    @classmethod
    def open(
        cls,
        store: str | Path | FeatureStore,
        concept: str = "all",
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        index_device: str | None = None,
    ) -> "Attributor":
        store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        task = load_store_task(store)
        if concept != "all" and concept not in task.concepts:
            raise ConfigError(
                f"concept {concept!r}: the task measures {', '.join(('all', *task.concepts))}"
            )
        index = GradIndex.open(store, concept, device=index_device)
        torch_device = torch.device(device)
        model = task.load_model(checkpoint or store.manifest.get("checkpoint")).to(torch_device).eval()
        fingerprint = model_fingerprint(model)
        if fingerprint != store.manifest["model_fingerprint"]:
            raise StoreMismatchError(
                f"{store.path} was featurized from another checkpoint (model fingerprint "
                f"{store.manifest['model_fingerprint'][:12]}…, this one {fingerprint[:12]}…); "
                "query with the store's checkpoint or featurize this one"
            )
        return cls(store, task, model, index, torch_device)

    def measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
        if self.concept == "all":
            return self.task.compute_measurement(batch, model)
        return self.task.concept_measurement(batch, model, self.concept)

    def query_vectors(self, dataset: Sequence, batch_size: int = 64) -> np.ndarray:
        """``u(q)`` for every item of ``dataset``: ``[n, D]`` float32."""
        feats = featurize_rows(self.task, self.model, dataset, range(len(dataset)), self.projector, batch_size,
                               self.device, measurement=self.measurement)
        psi = self.preconditioner({g: torch.from_numpy(feats[g]) for g in self.groups})
        vectors = scaled_vectors({g: -psi[g] for g in self.groups}, self.weights, self.groups)
        return vectors.numpy()

    def attribute(self, dataset: Sequence, k: int = 10, batch_size: int = 64) -> TopK:
        """Top-``k`` training examples for every query item."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k: expected a positive integer, got {k!r}")
        return self.index.search(self.query_vectors(dataset, batch_size), k)

    def close(self) -> None:
        self.projector.close()


def metadata_lookup(store: FeatureStore, sample_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The store's metadata columns at ``sample_ids [n, k]`` (``None`` where the id is -1)."""
    if not store.metadata_columns:
        return {}
    ids, columns = store.read_metadata()
    order = np.argsort(ids)
    found = np.clip(np.searchsorted(ids, sample_ids, sorter=order), 0, len(ids) - 1)
    rows = order[found]
    valid = (sample_ids >= 0) & (ids[rows] == sample_ids)
    out = {}
    for name, values in columns.items():
        picked = values[rows].astype(object)
        picked[~valid] = None
        out[name] = picked
    return out
