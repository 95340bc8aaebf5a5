"""The query stage on a Ray cluster: an :class:`Attributor` whose index parts live on Ray actors.

In: a store whose concept partition was built in parts and the address of a Ray cluster. Out: the
same :class:`~gradindex.index.topk.TopK` as a local :class:`~gradindex.query.attributor.Attributor`
(the parts are held by :class:`~gradindex.index.ray_search.RayIndex`; query features are computed on
this machine). Ray is the optional extra ``gradindex[ray]``; this module is imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradindex.config import SearchConfig
from gradindex.features.query import QueryFeaturizer
from gradindex.index.ray_search import RayIndex
from gradindex.query.attributor import Attributor, warn_if_weights_changed
from gradindex.store.feature_store import FeatureStore, open_store


class RayAttributor(Attributor):
    """An :class:`~gradindex.query.attributor.Attributor` whose index lives on Ray actors (kept warm)."""

    def close(self) -> None:
        super().close()
        self.index.close()

    def __enter__(self) -> "RayAttributor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_ray_attributor(store: str | Path | FeatureStore, concept: str = "all", checkpoint: str | Path | None = None,
                        device: str = "cpu", address: str | None = None, actors: int | None = None,
                        index_device: str = "auto", search: SearchConfig | None = None,
                        trust_task: bool = False, shared: bool | None = None) -> RayAttributor:
    """Query features on this machine (``device``), index parts on Ray actors (``trust_task``: see
    :func:`~gradindex.features.query.load_store_task`; ``shared``: the concept's own partition or the
    shared index, :func:`gradindex.index.shared.resolve_partition`)."""
    from gradindex.index.shared import resolve_partition

    store = open_store(store, trust_task=trust_task)
    partition, weights = resolve_partition(store, concept, shared)
    index = RayIndex.open(store, partition, address=address, actors=actors, device=index_device, search=search)
    try:
        featurizer = QueryFeaturizer.open(store, concept, index.config.preconditioner, index.config.damping,
                                          checkpoint, device)
    except BaseException:
        index.close()
        raise
    if index.config.concept == concept:  # the shared index carries no weights of its own to go stale
        warn_if_weights_changed(store, concept, index)
    return RayAttributor(featurizer, index, weights)
