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

import numpy as np

from gradindex.config import SearchConfig, require_positive
from gradindex.index import GradIndex, TopK
from gradindex.query_features import QueryFeaturizer
from gradindex.store import FeatureStore
from gradindex.weights import GroupWeights, scaled_vectors


class Attributor:
    """Warm query engine for one concept partition of a store."""

    def __init__(self, featurizer: QueryFeaturizer, index: GradIndex, weights: GroupWeights | None = None):
        """``weights``: the query side's (default: the partition's; the shared index's are the concept's ``w²``)."""
        self.featurizer = featurizer
        self.index = index
        self.store = featurizer.store
        self.task = featurizer.task
        self.model = featurizer.model
        self.concept = featurizer.concept
        self.groups = featurizer.groups
        self.weights = weights if weights is not None else index.weights

    @classmethod
    def open(
        cls,
        store: str | Path | FeatureStore,
        concept: str = "all",
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        index_device: str | None = None,
        search: SearchConfig | None = None,
        shared: bool | None = None,
    ) -> "Attributor":
        """``shared``: see :func:`gradindex.index.shared.resolve_partition` (default: the concept's own
        partition when built, else the shared index)."""
        from gradindex.index.shared import open_concept_index

        store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        index, weights = open_concept_index(store, concept, device=index_device, search=search, shared=shared)
        featurizer = QueryFeaturizer.open(store, concept, index.config.preconditioner, index.config.damping,
                                          checkpoint, device)
        return cls(featurizer, index, weights)

    def query_vectors(self, dataset: Sequence, batch_size: int = 64) -> np.ndarray:
        """``u(q)`` for every item of ``dataset``: ``[n, D]`` float32."""
        return scaled_vectors(self.featurizer.group_features(dataset, batch_size), self.weights, self.groups)

    def attribute(self, dataset: Sequence, k: int = 10, batch_size: int = 64) -> TopK:
        """Top-``k`` training examples for every query item."""
        require_positive(k, "k")
        return self.index.search(self.query_vectors(dataset, batch_size), k)

    def close(self) -> None:
        self.featurizer.close()


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
