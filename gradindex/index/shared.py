"""One index for every concept: stored ``φ(x)``, each concept's weights on the query side.

A concept's score is ``τ_w(q, x) = Σ_g w_g ψ_g(q)ᵀ φ_g(x)`` (DESIGN §1.5). A concept partition
stores ``√w_g φ_g(x)`` and queries with ``√w_g ψ_g(q)``; the *shared* index stores ``φ(x)``
once (preconditioned queries, balanced like any approximate partition) and queries concept
``c`` with ``u_c(q) = [w^c_g ψ^c_g(q)]``, so one set of N vectors serves every concept's
weights with the same scores (exact kinds: the same top-k).

It is the partition ``indexes/shared.phi/`` (manifest ``indexes["shared.phi"]``), built by
``build-index STORE --shared`` with uniform stored weights; ``query --concept C`` uses C's own
partition when there is one and the shared index otherwise (``--shared``: always the shared one).

* :func:`query_weights` ``(weights) -> GroupWeights``: the weights whose ``√`` scales give ``w``
  (what :func:`~gradindex.weights.group_weights.scaled_vectors` needs for the shared index's query side).
* :func:`open_concept_index` ``(store, concept, ...) -> (GradIndex, query-side GroupWeights)``.
"""

from __future__ import annotations


from gradindex.errors import ArtifactNotFoundError
from gradindex.index.shards import ShardedIndex
from gradindex.store.feature_store import FeatureStore
from gradindex.weights.group_weights import GroupWeights

SHARED = "shared.phi"  # the shared index's partition name (a dot: never a task's concept name)


def query_weights(weights: GroupWeights) -> GroupWeights:
    """``w²`` as a :class:`GroupWeights`: its scales ``√(w²) = w`` put all of ``w`` on the query side."""
    return GroupWeights(weights.concept, {g: float(w) ** 2 for g, w in weights.weights.items()},
                        {**weights.info, "query_side": "w (shared index)"})


def resolve_partition(store: FeatureStore, concept: str = "all", shared: bool | None = None,
                      ) -> tuple[str, GroupWeights | None]:
    """``(partition name, query-side weights)`` answering ``concept``; the weights are ``None``
    when the partition's own (``√w`` on both sides) apply.

    ``shared``: ``None`` = the concept's own partition if built, else the shared index;
    ``True`` = the shared index; ``False`` = the concept's own partition.
    """
    indexes = store.manifest.get("indexes", {})
    use_shared = shared if shared is not None else (concept not in indexes and SHARED in indexes)
    if not use_shared:
        return concept, None
    if SHARED not in indexes:
        raise ArtifactNotFoundError(f"{store.path}: no shared index; run `gradindex build-index {store.path} --shared`")
    config = indexes[SHARED]["config"]  # the concept's weights learned for the shared index's setting
    weights = GroupWeights.from_manifest(store.manifest, concept, store.groups, config["preconditioner"],
                                         config["damping"])
    return SHARED, query_weights(weights)


def open_concept_index(store: FeatureStore, concept: str = "all", device: str | None = None, search=None,
                       shared: bool | None = None) -> tuple[ShardedIndex, GroupWeights]:
    """The index answering ``concept`` and the weights whose scales make its query vectors
    (``shared`` as in :func:`resolve_partition`)."""
    name, weights = resolve_partition(store, concept, shared)
    index = ShardedIndex.open(store, name, device=device, search=search)
    return index, weights if weights is not None else index.weights
