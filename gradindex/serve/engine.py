"""The warm engine behind ``gradindex serve``: a request's JSON → query items → ``query --json``'s objects.

In: a store and one :class:`~gradindex.query.attributor.Attributor` per served concept (model,
projections, preconditioner and index loaded once; the index may live on Ray,
:mod:`gradindex.serve.ray_serve`). A request body ``{"inputs": ..., "k": 10, "concept": "all", "opponents": false}``
is checked and turned into query items by the task's ``queries_from_json`` (:meth:`parse`).
Out: for a batch of parsed requests, each request's list of
``{"query": i, "results": [{"rank", "sample_id", "score", ...metadata}]}`` (with ``"opponents": true``
also ``"opponents"``: the bottom-k, most negative first) — built by
:func:`~gradindex.query.attributor.result_records`, the function behind ``query --json``.

A batch runs one query featurization per concept (all its requests' queries together)
and one index search per distinct ``k`` (an approximate index's candidates depend on
``k``, so requests are never searched at a larger ``k`` and cut).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.config import SearchConfig, ServeConfig
from gradindex.errors import ConfigError, GradIndexError
from gradindex.query.attributor import Attributor, MetadataTable, result_records
from gradindex.query.opponents import search_opponents
from gradindex.store.feature_store import FeatureStore, open_store, read_manifest
from gradindex.checks import short_repr
from gradindex.eval.summary import store_summary
from gradindex.index.topk import TopK

REQUEST_KEYS = ("inputs", "k", "concept", "opponents")
MAX_RESULTS = 100_000  # results in one answer (queries x k x 2 with opponents): about 8 MB of JSON per 100,000
STALE_CHECK_S = 1.0  # how often a request rereads the store's manifest to see whether it was rebuilt
DEFAULT_K = 10
QUERY_BATCH_SIZE = 64  # queries per backward pass, as `gradindex query --batch-size`'s default


@dataclass(frozen=True)
class AttributeRequest:
    """One parsed request: the task's query items, the depth ``k`` and the concept partition."""

    queries: Sequence
    k: int
    concept: str
    opponents: bool = False


class AttributionEngine:
    """Warm attributors for the served concepts of one store; answers batches of requests."""

    def __init__(self, store: FeatureStore, attributors: Mapping[str, Attributor], config: ServeConfig,
                 metadata: MetadataTable | None = None):
        if not attributors:
            raise ConfigError("serve: no concept to serve")
        self.store = store
        self.attributors = dict(attributors)
        self.config = config
        self.metadata = metadata if metadata is not None else MetadataTable.read(store)
        self._served = self._builds(store.manifest)
        self._stale: tuple[float, str | None] = (time.monotonic(), None)

    @classmethod
    def open(cls, store: str | Path | FeatureStore, concepts: Sequence[str] = ("all",),
             config: ServeConfig = ServeConfig(), checkpoint: str | Path | None = None, device: str = "cpu",
             search: SearchConfig | None = None, trust_task: bool = False) -> "AttributionEngine":
        """Load the model and each concept's index once (the same calls as ``gradindex query``;
        ``trust_task``: see :func:`~gradindex.features.query.load_store_task`)."""
        store = open_store(store)
        attributors: dict[str, Attributor] = {}
        try:
            for concept in dict.fromkeys(concepts or ("all",)):
                attributors[concept] = Attributor.open(store, concept=concept, checkpoint=checkpoint, device=device,
                                                       search=search, trust_task=trust_task)
            engine = cls(store, attributors, config)
            engine.warm_up()
            return engine
        except BaseException:
            for attributor in attributors.values():
                attributor.close()
            raise

    def warm_up(self) -> None:
        """Search each index once with a batch (first-use costs, such as BLAS set-up, before the first request)."""
        for attributor in self.attributors.values():
            attributor.index.search(np.zeros((2, attributor.index.entry["dim"]), np.float32), 1)

    @property
    def concepts(self) -> list[str]:
        return list(self.attributors)

    def parse(self, body: Any) -> AttributeRequest:
        """Check a request body and build its query items; a :class:`ConfigError` names what is wrong."""
        if not isinstance(body, dict):
            raise ConfigError('request: expected a JSON object {"inputs": ..., "k": 10, "concept": "all"}, '
                              f"got {type(body).__name__}")
        unknown = sorted(set(body) - set(REQUEST_KEYS))
        if unknown:
            raise ConfigError(f"request: unknown keys {short_repr(unknown, 200)}; expected {list(REQUEST_KEYS)}")
        if "inputs" not in body:
            raise ConfigError('request: no "inputs" (the task\'s query fields as JSON)')
        k = body.get("k", DEFAULT_K)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.config.max_k:
            raise ConfigError(f"request: k must be an integer in 1..{self.config.max_k}, got {short_repr(k, 100)}")
        concept = body.get("concept", "all" if "all" in self.attributors else self.concepts[0])
        if not isinstance(concept, str) or concept not in self.attributors:
            raise ConfigError(f"request: concept {short_repr(concept, 100)} is not served here; served: "
                              f"{', '.join(self.concepts)}")
        opponents = body.get("opponents", False)
        if not isinstance(opponents, bool):
            raise ConfigError(f"request: opponents must be true or false, got {short_repr(opponents, 100)}")
        queries = self.attributors[concept].task.queries_from_json(body["inputs"])
        if not 1 <= len(queries) <= self.config.max_queries:
            raise ConfigError(f"request: expected 1..{self.config.max_queries} queries, got {len(queries)}")
        results = len(queries) * k * (2 if opponents else 1)
        if results > MAX_RESULTS:
            raise ConfigError(f"request: {len(queries)} queries x k {k} = {results:,} results, more than "
                              f"the {MAX_RESULTS:,} one answer may hold; ask fewer queries or a smaller k")
        return AttributeRequest(queries, k, concept, opponents)

    def answer(self, requests: Sequence[AttributeRequest]) -> list[list[dict[str, Any]]]:
        """Each request's ``query --json`` objects (queries numbered from 0 within the request)."""
        answers: list[list[dict[str, Any]]] = [[] for _ in requests]
        for concept in dict.fromkeys(r.concept for r in requests):
            members = [i for i, r in enumerate(requests) if r.concept == concept]
            attributor = self.attributors[concept]
            datasets = [requests[i].queries for i in members]
            dataset = datasets[0] if len(datasets) == 1 else torch.utils.data.ConcatDataset(datasets)
            vectors = attributor.query_vectors(dataset, QUERY_BATCH_SIZE)
            bounds = np.cumsum([0, *(len(d) for d in datasets)])
            for k in sorted({requests[i].k for i in members}):
                chosen = [j for j, i in enumerate(members) if requests[i].k == k]
                rows = np.concatenate([np.arange(bounds[j], bounds[j + 1]) for j in chosen])
                top = attributor.index.search(vectors[rows], k)
                wanted = any(requests[members[j]].opponents for j in chosen)
                bottom = search_opponents(attributor.index, vectors[rows], k) if wanted else None
                start = 0
                for j in chosen:
                    stop = start + int(bounds[j + 1] - bounds[j])
                    answers[members[j]] = self._records(top, bottom if requests[members[j]].opponents else None,
                                                        start, stop)
                    start = stop
        return answers

    def _records(self, top: TopK, bottom: TopK | None, start: int, stop: int) -> list[dict[str, Any]]:
        """``query --json``'s objects of rows ``start:stop`` of a batch's answers."""
        part = top.select(slice(start, stop))
        self.metadata.require_known(part.sample_ids)
        if bottom is None:
            return result_records(part, self.metadata.lookup(part.sample_ids))
        low = bottom.select(slice(start, stop))
        self.metadata.require_known(low.sample_ids)
        return result_records(part, self.metadata.lookup(part.sample_ids), low, self.metadata.lookup(low.sample_ids))

    def _builds(self, manifest: Mapping[str, Any]) -> str:
        """What the served answers depend on in a manifest: each served concept's index entry and weights."""
        return json.dumps({concept: [manifest.get("indexes", {}).get(concept), manifest.get("weights", {}).get(concept)]
                           for concept in self.attributors}, sort_keys=True, default=str)

    def staleness(self, every_s: float = STALE_CHECK_S) -> str | None:
        """Why the served indexes or weights are older than the store's current build (``build-index`` or
        ``learn-weights`` ran since this server started), or None; the manifest is reread at most every
        ``every_s`` seconds. Restart ``gradindex serve`` to answer from the new build."""
        checked, reason = self._stale
        if reason is not None or time.monotonic() - checked < every_s:
            return reason
        try:
            current = self._builds(read_manifest(self.store.storage))
        except GradIndexError as err:  # a manifest being rewritten or gone: say so rather than guess
            current, why = None, f"the store's manifest cannot be read now ({err})"
        else:
            why = None
        if current != self._served:
            reason = why or ("the store was rebuilt (build-index or learn-weights ran) after this server started; "
                             "these answers come from the previous build: restart gradindex serve")
        self._stale = (time.monotonic(), reason if current is not None else None)
        return reason

    def info(self) -> dict[str, Any]:
        """``gradindex info``'s summary of the store, plus what this server answers."""
        served = {concept: {"kind": a.index.kind, "vectors": a.index.ntotal} for concept, a in self.attributors.items()}
        reason = self.staleness()
        return {**store_summary(self.store), "served": served, "stale": reason is not None, "stale_reason": reason,
                "limits": {"max_batch": self.config.max_batch, "max_wait_ms": self.config.max_wait_ms,
                           "max_body_mb": self.config.max_body_mb, "max_queries": self.config.max_queries,
                           "max_k": self.config.max_k}}

    def close(self) -> None:
        for attributor in self.attributors.values():
            attributor.close()
