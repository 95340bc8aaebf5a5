"""The query stage: query inputs → top-k training examples (DESIGN §1.5).

In: a store with a built index partition and query inputs. Out:
:class:`~gradindex.index.topk.TopK` ``scores / sample_ids [n, k]`` and JSON-ready records.

* :mod:`~gradindex.query.attributor` — :class:`~gradindex.query.attributor.Attributor`: a warm
  query featurizer and index; every score ``[n, N]`` without an index (``all_scores``).
* :mod:`~gradindex.query.ray` — the same with the index parts on Ray actors (``gradindex[ray]``).
* :mod:`~gradindex.query.tokens` — token heatmaps inside the retrieved documents (``query --tokens``).
"""
