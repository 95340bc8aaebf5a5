"""The evaluation stage: how good the attributions and the index are (DESIGN §4).

In: a store, its index partitions and query sets. Out: numbers and reports.

* :mod:`~gradindex.eval.evaluate` — index recall@k against exact search; concept precision/recall@k.
* :mod:`~gradindex.eval.ranking` — average precision and recall@k of a query's ranking of the whole training set.
* :mod:`~gradindex.eval.baselines` — caption search and image-similarity scores to compare attributions with.
* :mod:`~gradindex.eval.lds` — the linear datamodeling score against retrained models (cached;
  ``R`` training runs per subset averaged).
* :mod:`~gradindex.eval.reliability` — the ground truth's ceiling (split-half, Spearman–Brown) and the
  two-way bootstrap over retrained models and queries behind every "± SE".
* :mod:`~gradindex.eval.tune` — ``gradindex tune``: a store's setting chosen by LDS on a small budget.
* :mod:`~gradindex.eval.report` — the demo's picture of queries and their top-k.
* :mod:`~gradindex.eval.summary` — the store summary ``info`` and ``/v1/info`` print (no torch).
"""
