"""Sharded lookups on Ray (imported lazily; Ray is the optional extra ``gradindex[ray]``).

In: a store whose concept partition was built in parts (``build-index --shards-per-part``,
:mod:`gradindex.index.shards`) and query vectors ``u(q) [n, D]``. Out:
:class:`~gradindex.index.topk.TopK` ``[n, k]`` equal to
:class:`~gradindex.index.shards.ShardedIndex` ``.search`` on one machine.

How: each :class:`IndexPartHolder` actor opens its parts once (on its GPU when the
cluster has GPUs and FAISS can use them) and keeps them; :class:`RayIndex` puts the
query vectors in the object store once, every actor returns the merged top-k of its
parts, and the driver merges those with the exact
:func:`~gradindex.index.topk.merge_topk` (ties by sample id, so the answer does not depend
on how parts are spread over actors). :class:`RayIndex` stands in for ``GradIndex``
inside an :class:`~gradindex.query.attributor.Attributor`
(:func:`gradindex.query.ray.open_ray_attributor` builds one whose actors stay warm between queries).
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.config import IndexConfig, SearchConfig, require_positive
from gradindex.features.distributed import ray_session
from gradindex.errors import ConfigError
from gradindex.index.kinds import import_faiss
from gradindex.index.shards import check_queries, index_entry, open_part
from gradindex.store.feature_store import FeatureStore, open_store
from gradindex.index.topk import TopK, merge_topk
from gradindex.weights.group_weights import GroupWeights

logger = logging.getLogger(__name__)


class IndexPartHolder:
    """One Ray actor holding some parts of a concept's partition, loaded once."""

    def __init__(self, store_path: str, concept: str, parts: list[int], device: str, threads: int,
                 search: dict[str, Any] | None = None):
        import_faiss().omp_set_num_threads(threads)
        store = FeatureStore.open(store_path)
        knobs = SearchConfig.from_dict(search) if search is not None else None
        self.parts = [open_part(store, concept, i, device, knobs) for i in parts]

    def describe(self) -> dict[str, Any]:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "parts": [p.name for p in self.parts], "device": self.parts[0].device}

    def search(self, vectors: np.ndarray, k: int) -> TopK:
        """The exact merge of this actor's parts' top-``k`` (each part padded to ``k``)."""
        return merge_topk([p.search(vectors, k) for p in self.parts], k)


def part_layout(ray: Any, count: int, actors: int | None, device: str,
                cpus_per_actor: int) -> tuple[dict[str, Any], list[list[int]], str]:
    """How ``count`` index parts go on Ray: ``(actor resource options, contiguous part numbers per
    actor, part device)`` — one actor per part, at most ``actors`` and at most one per GPU (when the
    cluster has GPUs and ``device`` is not ``cpu``) or per ``cpus_per_actor`` CPUs."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if device != "cpu" and gpus:
        options, slots, part_device = {"num_gpus": 1, "num_cpus": cpus_per_actor}, gpus, "cuda"
    else:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        options, slots, part_device = {"num_cpus": cpus_per_actor}, max(1, cpus // cpus_per_actor), "cpu"
    if actors is not None and actors > slots:
        logger.warning("%d actors asked, the Ray cluster has room for %d; using %d", actors, slots, slots)
    size = min(count, actors or slots, slots)  # more would wait for resources forever
    groups = [[int(i) for i in g] for g in np.array_split(np.arange(count), size)]
    return options, groups, part_device


class RayIndex:
    """A concept's partition spread over Ray actors; ``search`` fans out and merges.

    ``RayIndex.open(store, concept)``; keeps its actors (and the Ray connection it
    opened, if any) until :meth:`close`. Usable as a context manager.
    """

    def __init__(self, entry: dict[str, Any], actors: list[Any], ray: Any, session: ExitStack):
        self.entry = entry
        self.config = IndexConfig.from_dict(entry["config"])
        self.actors = actors
        self._ray = ray
        self._session = session

    @classmethod
    def open(cls, store: str | Path | FeatureStore, concept: str = "all", address: str | None = None,
             actors: int | None = None, device: str = "auto", cpus_per_actor: int = 1,
             search: SearchConfig | None = None) -> "RayIndex":
        """Start the actors: one per part, at most ``actors`` and at most one per GPU (when the
        cluster has GPUs and ``device`` is not ``cpu``) or per ``cpus_per_actor`` CPUs.
        ``search``: query-time knobs for every part (default: the ones the index was built with)."""
        store = open_store(store)
        entry = index_entry(store, concept)
        count = len(entry["parts"])
        if count == 0:
            raise ConfigError(f"{store.path}: index {concept!r} has no parts; run build-index")
        if (actors is not None and actors < 1) or cpus_per_actor < 1:
            raise ConfigError(f"sharded query on Ray: expected actors >= 1 and cpus_per_actor >= 1, "
                              f"got {actors} and {cpus_per_actor}")
        session = ExitStack()
        try:
            ray = session.enter_context(ray_session(address))
            options, groups, part_device = part_layout(ray, count, actors, device, cpus_per_actor)
            size = len(groups)
            holder = ray.remote(IndexPartHolder).options(**options, scheduling_strategy="SPREAD")
            handles = [holder.remote(str(store.path), concept, g, part_device, cpus_per_actor,
                                     search.to_dict() if search is not None else None)
                       for g in groups]
            ray.get([h.describe.remote() for h in handles])  # loaded (or the load error) before the first query
        except BaseException:
            session.close()
            raise
        logger.info("index %r: %d parts on %d Ray actor(s) (%s)", concept, count, size, part_device)
        return cls(entry, handles, ray, session)

    @property
    def weights(self) -> GroupWeights:
        return GroupWeights(self.config.concept, self.entry["weights"]["weights"], self.entry["weights"]["info"])

    @property
    def ntotal(self) -> int:
        return int(self.entry.get("ntotal", sum(p["ntotal"] for p in self.entry["parts"])))

    @property
    def kind(self) -> str:
        return self.entry["kind"]

    def describe(self) -> list[dict[str, Any]]:
        """Where each actor runs and which parts it holds."""
        return self._ray.get([a.describe.remote() for a in self.actors])

    def search(self, vectors: np.ndarray, k: int) -> TopK:
        """Top-``k`` stored vectors by inner product for each row of ``vectors [n, D]``, all parts merged."""
        if not self.actors:
            raise ConfigError("RayIndex: closed")
        require_positive(k, "k", numpy_ok=True)
        vectors = check_queries(vectors, self.entry["dim"])
        k = min(int(k), self.ntotal)
        if k == 0:
            return TopK(np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64))
        return merge_topk(self._fan_out(vectors, k), k)

    def _fan_out(self, vectors: np.ndarray, k: int) -> list[TopK]:
        """Every actor's top-``k`` of its parts (the vectors go to the object store once)."""
        shared = self._ray.put(vectors)
        return self._ray.get([a.search.remote(shared, k) for a in self.actors])

    def close(self) -> None:
        """Stop the actors (and the Ray connection this index opened)."""
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        self._session.close()

    def __enter__(self) -> "RayIndex":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
