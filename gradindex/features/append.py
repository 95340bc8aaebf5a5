"""Incremental featurization: add a task's new training examples to an existing store.

In: a complete store and its task, whose training set now holds examples the
store lacks (sample ids not yet stored; e.g. the same task with a larger size).
Out: the same store with new shards ``part-(S+1)…`` holding only those examples,
the Gram matrices updated to all ``N + n`` rows (``G = (N·G_old + Σ φφᵀ_new) / (N + n)``),
and the manifest rewritten last. Existing shards are not touched, so an index
partition gets the new rows with ``build-index --update`` (one new part) instead
of a rebuild. The checkpoint, featurize config and parameter groups must be the
store's; rows already stored are skipped by sample id.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gradindex.config import FeaturizeConfig
from gradindex.devices import resolve_device
from gradindex.errors import ConfigError, StoreMismatchError, TaskError
from gradindex.features.run import (
    _run_key, check_sidecars, featurize_rows, planned_group_entries, prepare_run, storage_dtype,
)
from gradindex.features.gradients import GradientProjector
from gradindex.features.precondition import GramAccumulator
from gradindex.features.projection import check_projection_format
from gradindex.store.feature_store import (
    FeatureStore, modify_manifest, remove_temporaries, remove_unlisted_shards, remove_unused_grams,
    write_gram, write_shard, writer_lock,
)
from gradindex.store.trust import record_own_store
from gradindex.task import Task


def featurize_append(
    task: Task,
    out: str | Path,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    limit: int | None = None,
    show_progress: bool = True,
) -> tuple[FeatureStore, int]:
    """Featurize the task's training examples missing from the store at ``out``; ``(store, rows added)``.

    Holds the store's writer lock. New shards and the new Gram file get names the manifest does
    not list yet, and the manifest switches to them in one rename, so an append killed at any
    point leaves the old store complete (its leftovers are removed by the next append).
    """
    with writer_lock(FeatureStore.open(out).storage) as path:
        store = FeatureStore.open(path)
        remove_temporaries(path)
        remove_unlisted_shards(path, store.manifest)
        remove_unused_grams(path, store.manifest)
        return _append(task, store, checkpoint, device, limit, show_progress)


def _append(task: Task, store: FeatureStore, checkpoint: str | Path | None, device: str, limit: int | None,
            show_progress: bool) -> tuple[FeatureStore, int]:
    manifest = store.manifest
    check_projection_format(manifest["projection_format"], str(store.path))
    config = FeaturizeConfig.from_dict(manifest["config"])
    torch_device = resolve_device(device)
    run = prepare_run(task, config, checkpoint or manifest.get("checkpoint"), torch_device, limit)
    if run.fingerprint != manifest["model_fingerprint"]:
        raise StoreMismatchError(f"{store.path}: featurize --append needs the store's checkpoint (other parameters)")
    model, groups, dataset, ids, metadata = run.model, run.groups, run.dataset, run.ids, run.metadata
    if planned_group_entries(groups, config.projection) != manifest["groups"]:
        raise StoreMismatchError(f"{store.path}: the model's parameter groups differ from the store's")
    if sorted(metadata) != sorted(manifest.get("metadata_columns", [])):
        raise TaskError(f"metadata columns {sorted(metadata)} differ from the store's {manifest['metadata_columns']}")
    stored = np.concatenate([shard_ids for shard_ids, _, _ in store.iter_shards(groups=[])] or [np.zeros(0, np.int64)])
    new_rows = np.flatnonzero(~np.isin(ids, stored))
    if len(new_rows) == 0:
        return store, 0
    grams = store.read_gram()
    count = int((manifest.get("gram") or {}).get("count", 0))
    dtype = storage_dtype(config)
    run_key = _run_key(run.fingerprint, config, groups, ids[new_rows], task)
    started = time.perf_counter()
    shards = list(manifest["shards"])
    if config.normalize.value != "none":  # Adam normalisation runs in-process only (featurize)
        raise ConfigError("--normalize adam: not supported with --append or --ray yet; featurize without them")
    with GradientProjector(model, groups, config.projection, torch_device) as projector:
        gram = GramAccumulator(projector.group_dims(), config.gram_max_dim)
        gram.add({group: grams[group] * count if group in grams else 0.0 for group in gram.sums}, count)
        with tqdm(total=len(new_rows), desc="featurize --append", unit="ex", disable=not show_progress) as bar:
            for start in range(0, len(new_rows), config.shard_size):
                rows = new_rows[start:start + config.shard_size]
                feats = featurize_rows(task, model, dataset, rows.tolist(), projector, config.batch_size,
                                       torch_device, dtype, bar=bar)
                gram.update(feats)
                info = write_shard(store.storage, len(shards), ids[rows], feats,
                                   {name: values[rows] for name, values in metadata.items()}, run_key)
                shards.append(info.to_dict())
    check_sidecars(store.storage, shards[len(manifest["shards"]):], run_key)
    names = store.groups
    gram_file = write_gram(store.storage, {f"g{names.index(g)}": m for g, m in gram.result().items()})
    appended = {"rows": int(len(new_rows)), "first_shard": len(manifest["shards"]),
                "seconds": round(time.perf_counter() - started, 3)}

    def change(current: dict[str, Any] | None) -> dict[str, Any]:
        if current is None or current["shards"] != manifest["shards"] or current.get("gram") != manifest.get("gram"):
            raise StoreMismatchError(f"{store.path}: the store's shards changed while appending; append again")
        return {**current, "task": task.spec(), "shards": shards,
                "num_samples": int(current["num_samples"] + len(new_rows)),
                "gram": {"skipped_groups": [], **current.get("gram", {}), **gram_file, "count": gram.count},
                "appended": [*current.get("appended", []), appended]}

    remove_unused_grams(store.storage, modify_manifest(store.storage, change))
    appended_store = FeatureStore.open(store.storage, task=task.spec()["task"])
    record_own_store(appended_store.path, appended_store.manifest, task)  # the task file may have changed
    return appended_store, int(len(new_rows))
