"""``gradindex serve --ray``: the same HTTP API on Ray Serve, the index parts on replicas across machines.

In: a store every node sees, whose concept partitions were built in parts
(``build-index --shards-per-part``), and a Ray cluster. Out: one Serve application
(:data:`APP`) answering exactly what ``gradindex serve`` answers without Ray:

* ``gradindex-parts-<concept>-<i>`` deployments, one per contiguous range of a concept's index
  parts (:func:`~gradindex.index.ray_search.part_layout`, as ``query --ray`` spreads them), each
  replica an :class:`~gradindex.index.ray_search.IndexPartHolder` that opens its parts once;
  ``replicas_per_part`` interchangeable replicas each.
* ``gradindex-api``: the FastAPI app of :mod:`gradindex.serve.app` (built on each replica when it
  starts): the model, projections and preconditioner for query features, the micro-batcher, and per
  concept a :class:`ServeIndex` that sends a batch's query vectors to every parts deployment and
  merges their top-k exactly (:func:`~gradindex.index.topk.merge_topk`, ties by sample id).

Serve's HTTP proxy listens on ``ServeConfig.host:port`` (loopback by default). Needs Ray Serve with
ingress builder functions (Ray >= 2.47): ``pip install 'gradindex[serve]' 'ray[serve]'``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.config import SearchConfig, ServeConfig
from gradindex.errors import ConfigError, GradIndexError, MissingDependencyError
from gradindex.index.ray_search import IndexPartHolder, RayIndex, part_layout
from gradindex.index.shards import index_entry
from gradindex.store.feature_store import FeatureStore, open_store
from gradindex.index.topk import TopK

logger = logging.getLogger(__name__)

APP = "gradindex"
API = "gradindex-api"
INSTALL_HINT = "pip install 'gradindex[serve]' 'ray[serve]>=2.47'"


def import_serve():
    """``ray.serve`` with ingress builder functions, or a one-line error saying how to install it."""
    try:
        from ray import serve
    except ImportError as err:
        raise MissingDependencyError(f"serve --ray needs Ray Serve ({err}): {INSTALL_HINT}") from None
    import ray

    major, minor = (int(p) for p in ray.__version__.split(".")[:2])
    if (major, minor) < (2, 47):
        raise MissingDependencyError(f"serve --ray needs Ray >= 2.47 (found {ray.__version__}): {INSTALL_HINT}")
    return serve


def parts_name(concept: str, group: int) -> str:
    return f"gradindex-parts-{concept}-{group}"


class ServeIndex(RayIndex):
    """A concept's partition held by Serve deployments: ``search`` fans out to each one and merges."""

    def __init__(self, entry: dict[str, Any], handles: Sequence[Any]):
        super().__init__(entry, list(handles), None, ExitStack())

    def _fan_out(self, vectors: np.ndarray, k: int) -> list[TopK]:
        responses = [handle.search.remote(vectors, k) for handle in self.actors]
        return [response.result() for response in responses]

    def close(self) -> None:
        self.actors = []  # the replicas belong to the Serve application


def api_builder(store_path: str, concepts: Sequence[str], config: dict[str, Any], checkpoint: str | None,
                device: str, names: dict[str, list[str]], trust_task: bool = False,
                task: str | None = None) -> Callable[[], Any]:
    """The builder each ``gradindex-api`` replica runs when it starts: engine and app, warm (``trust_task``,
    ``task``: the consent to run the store's task, see :func:`~gradindex.features.query.load_store_task`)."""

    def build() -> Any:
        from ray import serve

        from gradindex.query.attributor import Attributor, warn_if_weights_changed
        from gradindex.features.query import QueryFeaturizer
        from gradindex.serve.app import create_app
        from gradindex.serve.engine import AttributionEngine

        store = FeatureStore.open(store_path, trust_task=trust_task, task=task)
        attributors = {}
        for concept in concepts:
            handles = [serve.get_deployment_handle(name, app_name=APP) for name in names[concept]]
            index = ServeIndex(index_entry(store, concept), handles)
            featurizer = QueryFeaturizer.open(store, concept, index.config.preconditioner, index.config.damping,
                                              checkpoint, device)
            warn_if_weights_changed(store, concept, index)
            attributors[concept] = Attributor(featurizer, index)
        return create_app(AttributionEngine(store, attributors, ServeConfig.from_dict(config)), page=False)

    return build


def deploy(store: str | Path | FeatureStore, concepts: Sequence[str] = ("all",), config: ServeConfig = ServeConfig(),
           checkpoint: str | Path | None = None, device: str = "cpu", search: SearchConfig | None = None,
           actors: int | None = None, replicas_per_part: int = 1, api_replicas: int = 1,
           cpus_per_actor: int = 1, index_device: str = "auto") -> str:
    """Start (or replace) the Serve application on the connected Ray cluster; its URL.

    ``actors``: parts deployments per concept (default: one per part, at most one per GPU or CPU slot).
    Stop it with ``ray.serve.shutdown()`` (or by closing the Ray session that started it).
    """
    serve = import_serve()
    import ray

    if replicas_per_part < 1 or api_replicas < 1 or cpus_per_actor < 1:
        raise ConfigError(f"serve --ray: expected replicas and CPUs per actor >= 1, got {replicas_per_part}, "
                          f"{api_replicas} and {cpus_per_actor}")
    store = open_store(store)
    concepts = list(dict.fromkeys(concepts or ("all",)))
    knobs = search.to_dict() if search is not None else None
    names: dict[str, list[str]] = {}
    parts = []
    for concept in concepts:
        entry = index_entry(store, concept)
        if not entry["parts"]:
            raise ConfigError(f"{store.path}: index {concept!r} has no parts; run build-index")
        options, groups, part_device = part_layout(ray, len(entry["parts"]), actors, index_device, cpus_per_actor)
        names[concept] = [parts_name(concept, i) for i in range(len(groups))]
        for name, group in zip(names[concept], groups):
            deployment = serve.deployment(IndexPartHolder, name=name, num_replicas=replicas_per_part,
                                          ray_actor_options=options)
            parts.append(deployment.bind(str(store.path), concept, group, part_device, cpus_per_actor, knobs))
    builder = api_builder(str(store.path), concepts, config.to_dict(), None if checkpoint is None else str(checkpoint),
                          device, names, store.trust_task, store.task)
    api = serve.deployment(serve.ingress(builder)(), name=API, num_replicas=api_replicas,
                           ray_actor_options={"num_cpus": 0})  # query features: the replica's own thread
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(api.bind(*parts), name=APP, route_prefix="/", blocking=False)
    host = f"[{config.host}]" if ":" in config.host else config.host
    logger.info("Serve application %r: %s", APP, {c: len(n) for c, n in names.items()})
    url = f"http://{host}:{config.port}"
    probe = url if config.host not in ("0.0.0.0", "::") else f"http://127.0.0.1:{config.port}"
    wait_until_routed(probe + "/v1/health")
    return url


def wait_until_routed(health_url: str, timeout: float = 120.0) -> None:
    """Return once ``health_url`` answers 200: ``serve.run`` returns when the replicas are up, but Serve's
    HTTP proxy learns the route a moment later (until then it answers 404 "Path ... not found")."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(health_url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not routed yet (404), or the proxy is still starting
        if time.monotonic() > deadline:
            raise GradIndexError(f"serve --ray: {health_url} did not answer within {timeout:.0f} s")
        time.sleep(0.2)
