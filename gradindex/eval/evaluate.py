"""Reference search and quality measures.

* :func:`exact_topk`: blockwise exact maximum-inner-product top-k over
  ``(ids, vectors)`` blocks with a running merge (the reference FAISS is tested against).
* :func:`recall_at_k`: fraction of the exact top-k an approximate search returned;
  :func:`index_recall` measures it for a built index partition against exact search on its store.
* :func:`concept_precision`: per-query concept precision@k against factor labels, with chance;
  :func:`concept_recall`: per-query concept recall@k (hits over ``min(k, #relevant)``);
  :func:`evaluate_precision` runs both for a store's concept partitions on a query set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gradindex.config import require_positive
from gradindex.errors import ConfigError
from gradindex.index import TopK
from gradindex.query.attributor import Attributor
from gradindex.index.topk import exact_topk, recall_distribution
from gradindex.weights.group_weights import stored_vector_blocks
from gradindex.features.query import load_store_task
from gradindex.store.feature_store import FeatureStore
from gradindex.task import default_queries


@dataclass(frozen=True)
class RecallResult:
    """recall@k of one index partition against exact search over the same store; with a target,
    the cheapest knobs reaching it on the same queries (``None`` for exact kinds)."""

    concept: str
    kind: str
    k: int
    queries: int
    recall: float
    ntotal: int
    search: dict
    target: float | None = None
    knobs: dict | None = None  # SearchConfig fields of the cheapest setting reaching ``target``
    knobs_recall: float | None = None  # the recall measured there
    reached: bool | None = None
    p5: float = 0.0  # 5th-percentile query's recall@k
    worst: float = 0.0  # worst query's recall@k
    below_0_8: float = 0.0  # share of queries with recall@k under 0.8
    certified: float = 0.0  # share of queries whose top-k the search certified exact
    cells_scanned: float = 0.0  # mean per query (ivf / ivfpq)
    rows_reranked: float = 0.0  # mean per query: rows scored exactly

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def index_recall(store: FeatureStore, concept: str = "all", query_vectors: np.ndarray | None = None,
                 queries: Sequence | None = None, k: int = 10, search=None, device: str = "cpu",
                 num_queries: int | None = None, shared: bool | None = None,
                 target: float | None = None) -> RecallResult:
    """recall@k of the partition answering ``concept`` (with ``search`` knobs) against exact search.

    Query vectors ``u(q)``: ``query_vectors`` if given (in the partition's query space), else the
    task's (or ``queries``') query features through the partition's preconditioner and the
    concept's weights. ``shared``: as in :func:`gradindex.index.shared.resolve_partition`.
    ``target``: also find the cheapest knobs reaching that mean recall on these queries.
    """
    from gradindex.index.calibrate import cheapest_reaching
    from gradindex.index.shared import open_concept_index
    from gradindex.features.query import QueryFeaturizer

    require_positive(k, "k")
    index, weights = open_concept_index(store, concept, search=search, shared=shared)
    if query_vectors is None:
        featurizer = QueryFeaturizer.open(store, concept, index.config.preconditioner, index.config.damping,
                                          device=device)
        attributor = Attributor(featurizer, index, weights)
        try:
            dataset = queries if queries is not None else default_queries(attributor.task)
            if num_queries is not None:
                dataset = torch.utils.data.Subset(dataset, range(min(num_queries, len(dataset))))
            query_vectors = attributor.query_vectors(dataset)
        finally:
            attributor.close()
    exact = exact_topk(query_vectors, stored_vector_blocks(store, index.weights), k)
    approx = index.search(query_vectors, k)
    spread = recall_distribution(approx, exact)
    costs = {name: float(np.mean(getattr(approx, name))) if getattr(approx, name) is not None and len(approx) else 0.0
             for name in ("cells_scanned", "rows_reranked")}
    knobs = knobs_recall = reached = None
    if target and index.kind != "flat":
        from gradindex.index.calibrate import CalibrationQueries

        single = CalibrationQueries(np.ascontiguousarray(query_vectors, np.float32), np.zeros(len(query_vectors), int),
                                    ("inputs",))
        setting, per_query, reached = cheapest_reaching(index, single, exact, target, k, search)
        knobs, knobs_recall = setting.to_dict(), float(per_query.mean())
    return RecallResult(concept, index.kind, k, len(query_vectors), spread["mean"], index.ntotal,
                        index.parts[0].search_config.to_dict() if index.parts else {}, target, knobs, knobs_recall,
                        reached, spread["p5"], spread["worst"], spread["below_0_8"], spread["certified"], **costs)


def concept_precision(
    top: TopK,
    train_ids: np.ndarray,
    train_values: np.ndarray,
    query_values: np.ndarray,
    k: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Concept precision@k (DESIGN §4) per query, and its chance level per query.

    ``top``: results ``[n, ≥k]``; ``train_ids [N]`` / ``train_values [N]``: every training
    example's id and value of the concept (a metadata column); ``query_values [n]``: the
    query's value. Precision is the fraction of the top-``k`` ids whose value equals the
    query's (a missing result, id -1, counts as a miss); chance is the fraction of the
    training set with the query's value (the expected precision of a random top-k).
    Returns ``(precision [n], chance [n])``.
    """
    hits = _concept_hits(top, train_ids, train_values, query_values, k)
    values, counts = np.unique(np.asarray(train_values), return_counts=True)
    frequency = dict(zip(values.tolist(), (counts / len(train_values)).tolist()))
    chance = np.array([frequency.get(v, 0.0) for v in np.asarray(query_values).tolist()])
    return hits.mean(axis=1), chance


def concept_recall(
    top: TopK,
    train_ids: np.ndarray,
    train_values: np.ndarray,
    query_values: np.ndarray,
    k: int | None = None,
) -> np.ndarray:
    """Concept recall@k per query ``[n]``: of the training examples sharing the query's value
    (the relevant set ``G``), how many the top-``k`` found, normalised by the most it could
    find, ``|top-k ∩ G| / min(k, |G|)`` (0 when ``G`` is empty). It equals precision@k
    whenever ``|G| ≥ k``, and reaches 1 for a query whose few relevant examples all rank
    in the top-``k``. Arguments as :func:`concept_precision`.
    """
    hits = _concept_hits(top, train_ids, train_values, query_values, k).sum(axis=1)
    values, counts = np.unique(np.asarray(train_values), return_counts=True)
    size = dict(zip(values.tolist(), counts.tolist()))
    depth = top.k if k is None else k
    relevant = np.array([min(depth, size.get(v, 0)) for v in np.asarray(query_values).tolist()], dtype=np.float64)
    return np.divide(hits, relevant, out=np.zeros(len(hits)), where=relevant > 0)


def _concept_hits(top: TopK, train_ids: np.ndarray, train_values: np.ndarray, query_values: np.ndarray,
                  k: int | None) -> np.ndarray:
    """``[n, k]`` bool: whether each of a query's top-``k`` ids is a training example sharing its value."""
    k = top.k if k is None else k
    if k < 1 or k > top.k:
        raise ConfigError(f"precision@k: k must be in 1..{top.k} (the results' depth), got {k}")
    train_ids = np.asarray(train_ids)
    train_values = np.asarray(train_values)
    query_values = np.asarray(query_values)
    if len(query_values) != len(top):
        raise ConfigError(f"precision@k: {len(query_values)} query values for {len(top)} queries")
    order = np.argsort(train_ids)
    ids = top.sample_ids[:, :k]
    found = np.clip(np.searchsorted(train_ids, ids, sorter=order), 0, len(train_ids) - 1)
    rows = order[found]
    valid = (ids >= 0) & (train_ids[rows] == ids)
    return valid & (train_values[rows] == query_values[:, None])


@dataclass(frozen=True)
class PrecisionResult:
    """Concept precision@k and recall@k of one index partition over a query set."""

    concept: str
    k: int
    precision: np.ndarray  # [n] per query
    chance: np.ndarray  # [n] per query
    recall: np.ndarray  # [n] per query (see concept_recall)

    def to_dict(self) -> dict[str, float | int | str]:
        return {"concept": self.concept, "k": self.k, "queries": int(len(self.precision)),
                "precision": float(self.precision.mean()), "std": float(self.precision.std()),
                "recall": float(self.recall.mean()), "chance": float(self.chance.mean())}


def evaluate_precision(
    store: FeatureStore,
    queries: Sequence | None = None,
    concepts: Sequence[str] | None = None,
    k: int = 10,
    device: str = "cpu",
    batch_size: int = 64,
) -> list[PrecisionResult]:
    """Concept precision@k and recall@k of the store's partition for each concept (default: every concept
    the task measures that has an index). The concept's value of each query comes from
    ``task.metadata(queries)``, the training examples' from the store's metadata columns.
    ``queries`` default to the task's ``query_dataset()``."""
    task = load_store_task(store)
    built = set(store.manifest.get("indexes", {}))
    concepts = list(concepts) if concepts else [c for c in task.concepts if c in built]
    if not concepts:
        raise ConfigError(
            f"{store.path}: no concept partition to evaluate (the task measures {list(task.concepts) or 'none'}, "
            f"built: {sorted(built) or 'none'}); run `gradindex build-index {store.path} --concept C`"
        )
    queries = default_queries(task) if queries is None else queries
    query_meta = task.metadata(queries)
    train_ids, train_meta = store.read_metadata() if store.metadata_columns else (None, {})
    results = []
    for concept in concepts:
        if concept not in query_meta or concept not in train_meta:
            raise ConfigError(
                f"precision@k for concept {concept!r} needs its labels as a metadata column of the training set "
                f"({sorted(train_meta)}) and of the queries ({sorted(query_meta)})"
            )
        attributor = Attributor.open(store, concept=concept, device=device)
        try:
            top = attributor.attribute(queries, k=k, batch_size=batch_size)
        finally:
            attributor.close()
        precision, chance = concept_precision(top, train_ids, train_meta[concept], query_meta[concept], k)
        recall = concept_recall(top, train_ids, train_meta[concept], query_meta[concept], k)
        results.append(PrecisionResult(concept, k, precision, chance, recall))
    return results
