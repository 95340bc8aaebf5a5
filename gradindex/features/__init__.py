"""The featurize stage: a task's model and data → per-example projected gradients (DESIGN §1.1).

In: a :class:`~gradindex.task.Task`, a checkpoint and a :class:`~gradindex.config.FeaturizeConfig`.
Out: a complete :class:`~gradindex.store.feature_store.FeatureStore` of
``φ_g(x) = P_g ∇_{θ_g} ℓ(x) [n, k_g]`` per group, and the query-side blocks
``−ψ_g(q) = −H_g⁻¹ P_g ∇m(q)`` that the later stages compare them with.

Modules, in the order the data flows:

* :mod:`~gradindex.features.groups` — parameter groups of a model (default: one per module; rules).
* :mod:`~gradindex.features.projection` — seeded per-group projections (dense, Kronecker-factored).
* :mod:`~gradindex.features.layouts` — where the examples sit in a module's inputs and outputs (``batch_first``,
  attention masks, recurrent states).
* :mod:`~gradindex.features.gradients` — per-example gradients projected without forming them.
* :mod:`~gradindex.features.positions` — a score split over the positions (tokens) of each example.
* :mod:`~gradindex.features.precondition` — per-group Gram accumulation and the damped inverse ``H_g⁻¹``.
* :mod:`~gradindex.features.run` — :func:`~gradindex.features.run.featurize`: the run, resumable, into a store.
* :mod:`~gradindex.features.append` — :func:`~gradindex.features.append.featurize_append`: new training data.
* :mod:`~gradindex.features.distributed` — the same run spread over a Ray cluster (``gradindex[ray]``).
* :mod:`~gradindex.features.query` — :class:`~gradindex.features.query.QueryFeaturizer`: query-side
  blocks for a store (used by weight learning, index calibration, queries and evaluation).
"""
