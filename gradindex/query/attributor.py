"""Query stage: query inputs → query vectors ``u(q)`` → top-k training examples.

In: a complete store with an index partition, the task's query inputs.
Out: :class:`~gradindex.index.TopK` (scores ``[n, k]``, sample ids ``[n, k]``), or with
:func:`all_scores` every score ``u(q)ᵀv(x)`` ``[n, N]``, computed exactly block by block
from the store (no index needed).

``u(q) = [√w_g ψ_g(q)]`` with ``ψ_g(q) = −H_g⁻¹ P_g ∇m(q)``: the same groups,
seeds and projections as the stored training features, the partition's
preconditioner and weights. The sign makes a positive score mean "training on
x raises m(q)" (a proponent).

:class:`Attributor` keeps the model, projector, preconditioner and index warm
for many queries. It refuses a checkpoint whose parameters differ from the ones
the store was built from.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.config import (
    DEFAULT_DAMPING, UNIFORM_CONCEPT, IndexConfig, Preconditioner, SearchConfig, require_positive, setting_key,
)
from gradindex.errors import StoreMismatchError
from gradindex.index import GradIndex, TopK
from gradindex.features.query import QueryFeaturizer, load_store_task
from gradindex.query.opponents import search_opponents
from gradindex.store.feature_store import FeatureStore, open_store
from gradindex.weights.group_weights import GroupWeights, learned_weights, scaled_vectors, stored_vector_blocks

logger = logging.getLogger(__name__)


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
        trust_task: bool = False,
        shared: bool | None = None,
    ) -> "Attributor":
        """``trust_task``: run the task code the store names even if it is not built in
        (:func:`~gradindex.features.query.load_store_task`). ``shared``: see
        :func:`gradindex.index.shared.resolve_partition` (default: the concept's own partition when
        built, else the shared index)."""
        from gradindex.index.shared import open_concept_index

        store = open_store(store)
        index, weights = open_concept_index(store, concept, device=index_device, search=search, shared=shared)
        featurizer = QueryFeaturizer.open(store, concept, index.config.preconditioner, index.config.damping,
                                          checkpoint, device, trust_task)
        if index.config.concept == concept:  # the shared index carries no weights of its own to go stale
            warn_if_weights_changed(store, concept, index)
        return cls(featurizer, index, weights)

    def query_vectors(self, dataset: Sequence, batch_size: int = 64) -> np.ndarray:
        """``u(q)`` for every item of ``dataset``: ``[n, D]`` float32."""
        return scaled_vectors(self.featurizer.group_features(dataset, batch_size), self.weights, self.groups)

    def attribute(self, dataset: Sequence, k: int = 10, batch_size: int = 64) -> TopK:
        """Top-``k`` training examples for every query item."""
        require_positive(k, "k")
        return require_finite_scores(self.index.search(self.query_vectors(dataset, batch_size), k))

    def opponents(self, dataset: Sequence, k: int = 10, batch_size: int = 64) -> TopK:
        """The ``k`` most negative scores for every query item (ascending; :mod:`~gradindex.query.opponents`)."""
        return self.attribute_both(dataset, k, batch_size)[1]

    def attribute_both(self, dataset: Sequence, k: int = 10, batch_size: int = 64) -> tuple[TopK, TopK]:
        """``(proponents, opponents)``: the top-``k`` and bottom-``k`` of every query item, from one
        query featurization."""
        require_positive(k, "k")
        vectors = self.query_vectors(dataset, batch_size)
        return self.index.search(vectors, k), search_opponents(self.index, vectors, k)

    def close(self) -> None:
        self.featurizer.close()


def warn_if_weights_changed(store: FeatureStore, concept: str, index: GradIndex) -> bool:
    """One warning (stderr) when the store's current weights for the index's concept and setting are
    not the ones the index was built with (weights learned or reset after ``build-index``)."""
    if concept == UNIFORM_CONCEPT:
        return False
    config = index.config
    current = GroupWeights.from_manifest(store.manifest, concept, store.groups, config.preconditioner, config.damping)
    if current.weights == index.weights.weights:
        return False
    logger.warning(
        "warning: index %r of %s was built with weights %s; the store's current %s weights for it are %s: "
        "run `gradindex build-index %s --concept %s` to use them", concept, store.path, index.weights.describe(),
        setting_key(config.preconditioner, config.damping), current.describe(), store.path, concept)
    return True


class MetadataTable:
    """A store's metadata columns held in memory, looked up by sample id (a server reads them once)."""

    def __init__(self, sample_ids: np.ndarray, columns: Mapping[str, np.ndarray]):
        self.order = np.argsort(sample_ids)
        self.sample_ids = np.asarray(sample_ids)[self.order]
        self.columns = {name: np.asarray(values)[self.order] for name, values in columns.items()}

    @classmethod
    def read(cls, store: FeatureStore) -> "MetadataTable":
        if not store.metadata_columns:  # the ids alone: :meth:`require_known` checks answers against them
            return cls(store.read(groups=[])[0], {})
        return cls(*store.read_metadata())

    def require_known(self, sample_ids: np.ndarray) -> None:
        """A one-line error when an index returned a sample id (``>= 0``) the store does not hold: a damaged
        or crafted index file (its checksum rewritten to match) must not make ids up."""
        ids = np.asarray(sample_ids)[np.asarray(sample_ids) >= 0]
        if not len(ids):
            return
        found = np.clip(np.searchsorted(self.sample_ids, ids), 0, max(len(self.sample_ids) - 1, 0))
        known = (self.sample_ids[found] == ids) if len(self.sample_ids) else np.zeros(len(ids), bool)
        if not known.all():
            raise StoreMismatchError(f"the index returned sample id {int(ids[~known][0])}, which the store does not "
                                     "hold (a damaged or crafted index); run build-index again")

    def lookup(self, sample_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Every column at ``sample_ids [n, k]``: ``{name: [n, k] object}`` (``None`` where the id is -1 or unknown)."""
        if not self.columns:
            return {}
        found = np.clip(np.searchsorted(self.sample_ids, sample_ids), 0, len(self.sample_ids) - 1)
        valid = (sample_ids >= 0) & (self.sample_ids[found] == sample_ids)
        out = {}
        for name, values in self.columns.items():
            picked = values[found].astype(object)
            picked[~valid] = None
            out[name] = picked
        return out


def metadata_lookup(store: FeatureStore, sample_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The store's metadata columns at ``sample_ids [n, k]`` (``None`` where the id is -1)."""
    return MetadataTable.read(store).lookup(sample_ids)


def result_records(top: TopK, metadata: Mapping[str, np.ndarray], opponents: TopK | None = None,
                   opponent_metadata: Mapping[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """``query --json``'s objects (and ``serve``'s): per query row ``{"query": q, "results": [{"rank",
    "sample_id", "score", **metadata}]}``, ranks from 1, ``-1`` ids left out, plus ``certified``,
    ``cells_scanned`` and ``rows_reranked`` when the search reported them. ``metadata``: ``{name: [n, k]}``
    (:meth:`MetadataTable.lookup`). With ``opponents`` (the bottom-k, ascending) each object also has
    ``"opponents"``: the same rows for them (rank 1 = the most negative score)."""
    require_finite_scores(top)
    if opponents is not None:
        require_finite_scores(opponents)
    records = []
    for q in range(len(top)):
        record = {"query": q, "results": _rows(top, metadata, q)}
        if top.certified is not None:  # the search's own evidence (gradindex.index.topk.TopK)
            record.update(certified=bool(top.certified[q]), cells_scanned=int(top.cells_scanned[q]),
                          rows_reranked=int(top.rows_reranked[q]))
        if opponents is not None:
            record["opponents"] = _rows(opponents, opponent_metadata or {}, q)
        records.append(record)
    return records


def _rows(top: TopK, metadata: Mapping[str, np.ndarray], q: int) -> list[dict[str, Any]]:
    return [
        {"rank": rank + 1, "sample_id": int(sid), "score": float(score),
         **{name: _plain(values[q, rank]) for name, values in metadata.items()}}
        for rank, (sid, score) in enumerate(zip(top.sample_ids[q], top.scores[q])) if sid >= 0
    ]


def require_finite_scores(top: TopK) -> TopK:
    """``top`` unchanged, or a one-line error when a returned score is NaN or infinite (NaN in the stored
    features, the Gram matrices or the weights; checksums cannot tell: they were written that way)."""
    valid = top.sample_ids >= 0
    if not np.isfinite(top.scores[valid]).all():
        raise StoreMismatchError("scores are not finite (NaN or inf): the store's features, Gram matrices or weights "
                                 "hold NaN or inf; featurize (and learn-weights, build-index) again")
    return top


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def score_setting(store: FeatureStore, concept: str = "all") -> tuple[Preconditioner, float, GroupWeights]:
    """The preconditioner, damping and weights that score ``concept``: its index partition's when
    built (so the scores are the ones ``query`` ranks), else the setting its learned weights were
    fit for (the default setting's when there are several), else the defaults (Gram,
    :data:`DEFAULT_DAMPING`, uniform weights)."""
    entry = store.manifest.get("indexes", {}).get(concept)
    if entry is not None and "config" in entry and "weights" in entry:
        config = IndexConfig.from_dict(entry["config"])
        weights = GroupWeights(concept, entry["weights"]["weights"], entry["weights"].get("info", {}))
        return config.preconditioner, config.damping, weights
    learned = learned_weights(store.manifest, concept, store.groups)  # {setting: weights}
    if not learned:
        return Preconditioner.GRAM, DEFAULT_DAMPING, GroupWeights.uniform(concept, store.groups)
    weights = learned.get(setting_key(Preconditioner.GRAM, DEFAULT_DAMPING)) or next(iter(learned.values()))
    setting = weights.info.get("config") or {}
    preconditioner = Preconditioner(setting.get("preconditioner", Preconditioner.GRAM.value))
    damping = setting.get("damping", DEFAULT_DAMPING)  # per group ({group: value}) for --damping auto
    return preconditioner, dict(damping) if isinstance(damping, dict) else float(damping), weights


def all_scores(store: FeatureStore, inputs: str | Path, concept: str = "all", checkpoint: str | Path | None = None,
               device: str = "cpu", batch_size: int = 64) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """Every score of the queries in the ``inputs`` file against every stored training example.

    Returns ``(n, blocks)``: the number of queries and an iterator of ``(sample_ids [b],
    scores [n, b] float32)`` over the store's shards, in store order: exact ``u(q)ᵀv(x)``
    under :func:`score_setting` (no index is read).
    """
    require_positive(batch_size, "batch_size")
    preconditioner, damping, weights = score_setting(store, concept)
    logger.info("scoring concept %r: %s%s, %s weights", concept, preconditioner.value,
                f" (damping {damping:g})" if preconditioner is Preconditioner.GRAM else "",
                weights.info.get("method", "learned"))
    task = load_store_task(store)
    queries = task.load_queries(inputs)
    featurizer = QueryFeaturizer.open(store, concept, preconditioner, damping, checkpoint, device)
    try:
        vectors = scaled_vectors(featurizer.group_features(queries, batch_size), weights, featurizer.groups)
    finally:
        featurizer.close()

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids, stored in stored_vector_blocks(store, weights):
            yield ids, vectors @ stored.T

    return len(vectors), blocks()
