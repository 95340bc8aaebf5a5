"""The store stage: where projected gradients live (DESIGN §2).

In: per-example feature blocks ``{group: [n, k_g]}`` written shard by shard. Out: a feature store
directory (local or ``s3://``): Parquet shards, Gram matrices, FAISS builds and ``manifest.json``
with checksums, read back through :class:`~gradindex.store.feature_store.FeatureStore`.

Modules, in the order the bytes flow:

* :mod:`~gradindex.store.settings` — object-storage settings from the environment.
* :mod:`~gradindex.store.storage` — one storage layer for local folders and ``s3://`` prefixes
  (atomic writes, checksums, a content-addressed local cache).
* :mod:`~gradindex.store.leases` — exact locks on object storage (conditional PUTs).
* :mod:`~gradindex.store.schema` — the manifest's JSON schema and consistency checks.
* :mod:`~gradindex.store.feature_store` — :class:`FeatureStore`: open, verify and read a store;
  :func:`~gradindex.store.feature_store.open_store` for "a path or an open store".
* :mod:`~gradindex.store.shards` — write, recognise and read one Parquet shard and its sidecar.
* :mod:`~gradindex.store.scores` — full score matrices (``query --all --out``), ``.npy`` or ``.parquet``.

Imports only :mod:`gradindex.config` and :mod:`gradindex.errors` (no torch, no FAISS).
"""
