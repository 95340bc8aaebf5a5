"""The weights stage: per-group importance weights, learned from unlabeled queries (DESIGN §1.3).

In: a complete store and query inputs (default: the task's fit queries). Out:
:class:`~gradindex.weights.group_weights.GroupWeights` ``w_g ≥ 0`` per concept and setting, saved in
the manifest, and the √w block scaling that turns ``Σ_g w_g s_g`` into one dot product (DESIGN §1.5).

* :mod:`~gradindex.weights.group_weights` — :class:`GroupWeights`, their place in the manifest, scaling.
* :mod:`~gradindex.weights.damping` — the Gram damping ``λ_g`` chosen from the data (``--damping auto``).
* :mod:`~gradindex.weights.learn` — :func:`~gradindex.weights.learn.learn_weights` (snr, ssl, agreement).
"""
