"""The featurize stage: task → per-example projected gradients → feature store.

In: a :class:`~gradindex.task.Task`, a checkpoint and a
:class:`~gradindex.config.FeaturizeConfig`. Out: a complete
:class:`~gradindex.store.feature_store.FeatureStore` (shards, Gram matrices, manifest).

The run key (a hash of the model fingerprint, config, groups, projection format and
sample ids) is written beside every shard, so a rerun with ``resume=True`` skips shards
already complete and verified, and never mixes shards of different runs. A run holds
the store's writer lock (:func:`~gradindex.store.feature_store.writer_lock`): a second run into the
same folder is refused, and the manifest is committed only over shards whose sidecars
still carry this run's key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradindex.config import FeaturizeConfig, ProjectionConfig, StorageDtype, check_index_dim
from gradindex.devices import resolve_device
from gradindex.errors import ObjectStoreError, StoreMismatchError, TaskError
from gradindex.features.gradients import GradientProjector
from gradindex.features.groups import ParameterGroup, parameter_groups, part_owners
from gradindex.features.normalize import make_projector
from gradindex.features.precondition import GramAccumulator
from gradindex.features.projection import block_dims, projection_format
from gradindex.store.feature_store import (
    FeatureStore,
    ShardInfo,
    Storage,
    commit_manifest,
    completed_shard,
    open_storage,
    prepare_store,
    read_written_shard,
    remove_unused_grams,
    sidecar_name,
    write_gram,
    write_shard,
    writer_lock,
)
from gradindex import faults
from gradindex.store.trust import record_own_store
from gradindex.task import Task, make_batch, model_fingerprint

logger = logging.getLogger(__name__)


def resolve_groups(task: Task, model: torch.nn.Module, config: FeaturizeConfig) -> list[ParameterGroup]:
    """User rules first, then the task's own rules, then the one-group-per-module default."""
    return parameter_groups(model, [*config.group_rules, *task.parameter_groups(model)])


def training_table(task: Task) -> tuple[Sequence, np.ndarray, dict[str, np.ndarray]]:
    """The training dataset, its validated sample ids and metadata columns."""
    dataset = task.train_dataset()
    ids = np.asarray(task.sample_ids(dataset))
    if ids.shape != (len(dataset),) or not np.issubdtype(ids.dtype, np.integer):
        raise TaskError(f"sample_ids: expected {len(dataset)} integers, got shape {ids.shape} of {ids.dtype}")
    if len(np.unique(ids)) != len(ids):
        raise TaskError("sample_ids: ids must be unique")
    if not len(ids):
        raise TaskError(f"{type(task).__name__}.train_dataset() is empty: nothing to featurize")
    if ids.min() < 0 or ids.max() > np.iinfo(np.int64).max:  # -1 marks an empty result slot
        raise TaskError(f"sample_ids: expected integers in 0..2^63-1, got {int(ids.min())}..{int(ids.max())}")
    metadata = {name: np.asarray(values) for name, values in task.metadata(dataset).items()}
    for name, values in metadata.items():
        if len(values) != len(dataset):
            raise TaskError(f"metadata column {name!r}: {len(values)} values for {len(dataset)} examples")
    return dataset, ids.astype(np.int64), metadata


@dataclass
class FeaturizeRun:
    """What one featurize run works on, shared by the single-process and the Ray paths."""

    model: torch.nn.Module
    groups: list[ParameterGroup]
    dataset: Sequence
    ids: np.ndarray  # [n] int64 sample ids of the featurized rows (rows 0..n-1 of the dataset)
    metadata: dict[str, np.ndarray]  # {name: [n]}
    fingerprint: str
    run_key: str

    def shards(self, shard_size: int) -> list[tuple[int, int, int]]:
        """``(shard_index, start, stop)`` of every shard, in order."""
        return [(i, start, min(len(self.ids), start + shard_size))
                for i, start in enumerate(range(0, len(self.ids), shard_size))]


@dataclass(frozen=True)
class RunOptions:
    """The keywords of one featurize run besides the task, ``out`` and the :class:`FeaturizeConfig`:
    the same for :func:`featurize` and :func:`~gradindex.features.distributed.featurize_ray`."""

    checkpoint: str | Path | None = None
    device: str = "cpu"
    overwrite: bool = False
    resume: bool = False
    limit: int | None = None
    show_progress: bool = True


def prepare_run(task: Task, config: FeaturizeConfig, checkpoint: str | Path | None, device: torch.device,
                limit: int | None = None) -> FeaturizeRun:
    """Load the model on ``device``, resolve its groups, read the training table and derive the run key."""
    with faults.stage(f"load model ({type(task).__name__}.load_model)"):
        model = task.load_model(checkpoint).to(device).eval()
    groups = resolve_groups(task, model, config)
    dataset, ids, metadata = training_table(task)
    if limit is not None:
        ids, metadata = ids[:limit], {name: values[:limit] for name, values in metadata.items()}
    fingerprint = model_fingerprint(model)
    return FeaturizeRun(model, groups, dataset, ids, metadata, fingerprint,
                        _run_key(fingerprint, config, groups, ids, task))


def storage_dtype(config: FeaturizeConfig) -> Any:
    return np.float16 if config.dtype is StorageDtype.FLOAT16 else np.float32


def featurize_shard(
    task: Task,
    run: FeaturizeRun,
    projector: GradientProjector,
    config: FeaturizeConfig,
    device: torch.device,
    store: str | Path,
    shard: tuple[int, int, int],
    bar: Any = None,
) -> tuple[ShardInfo, dict[str, np.ndarray]]:
    """Featurize rows ``[start, stop)`` and write them as shard ``shard_index`` of ``store``.

    The one per-shard routine of every featurize path (single process, Ray workers), so
    the same shard has the same bytes whoever computes it. Returns the shard's info and
    its features ``{group: [stop - start, k_g]}`` in the storage dtype.
    """
    shard_index, start, stop = shard
    with faults.stage(f"featurize shard {shard_index} (rows {start}-{stop})"):
        feats = featurize_rows(task, run.model, run.dataset, range(start, stop), projector, config.batch_size,
                               device, storage_dtype(config), verify_first=(start == 0), bar=bar)
    info = write_shard(store, shard_index, run.ids[start:stop], feats,
                       {name: values[start:stop] for name, values in run.metadata.items()}, run.run_key)
    if info.rows != stop - start:
        raise TaskError(f"shard {shard_index}: {info.rows} rows written, expected {stop - start}")
    return info, feats


def group_entries(groups: list[ParameterGroup], projector: GradientProjector) -> list[dict[str, Any]]:
    """The manifest's ``groups`` list: each group with its projected dim and block dims."""
    group_dims = projector.group_dims()
    return [
        {**group.to_dict(), "dim": group_dims[group.name],
         "blocks": [{**bp.block.to_dict(), **bp.dims()} for bp in projector.projectors[group.name]]}
        for group in groups
    ]


def planned_group_entries(groups: list[ParameterGroup], projection: ProjectionConfig) -> list[dict[str, Any]]:
    """What :func:`group_entries` will record for ``groups`` under ``projection``, as the manifest holds
    it (JSON types), computed without drawing a matrix: compare it with a store's ``groups`` before
    projecting anything for that store."""
    entries = []
    for group in groups:
        blocks = [{**block.to_dict(), **block_dims(group.name, block, projection)} for block in group.blocks]
        owners = part_owners(list(group.blocks))
        dim = sum(b["k"] if "k" in b else b["heads"] * b["k_left"] * b["k_right"]
                  for i, b in enumerate(blocks) if i in owners)
        entries.append({**group.to_dict(), "dim": dim, "blocks": blocks})
    return json.loads(json.dumps(entries))


def check_sidecars(path: str | Path | Storage, shards: list[dict[str, Any]], run_key: str) -> None:
    """Every shard about to be committed still carries this run's sidecar (no other run replaced it)."""
    storage = open_storage(path)
    for info in shards:
        try:
            written = json.loads(storage.read_bytes(sidecar_name(info["path"])))
        except (OSError, ValueError, ObjectStoreError):
            written = None
        if written != info or info.get("run_key") != run_key or storage.size(info["path"]) != info["bytes"]:
            raise StoreMismatchError(
                f"{path}: shard {info['path']} was rewritten by another run (its sidecar or size changed) before "
                "this run committed; run featurize again (with --resume) and let one run write the store"
            )


def commit_store(
    path: Storage,
    task: Task,
    run: FeaturizeRun,
    config: FeaturizeConfig,
    checkpoint: str | Path | None,
    groups: list[dict[str, Any]],
    shards: list[dict[str, Any]],
    gram: GramAccumulator,
    seconds: float,
    extra: dict[str, Any] | None = None,
) -> FeatureStore:
    """Write the Gram matrices, then the manifest (last): the store is complete.

    Call with the store's writer lock held. The returned store carries the user's consent to
    run ``task`` (it was given as an object, not read from a manifest), and a record in
    ``$GRADINDEX_HOME`` keeps it for later commands while the task file is unchanged
    (:mod:`gradindex.store.trust`).
    """
    check_sidecars(path, shards, run.run_key)
    group_names = [g.name for g in run.groups]
    gram_file = write_gram(path, {f"g{group_names.index(g)}": m for g, m in gram.result().items()})
    manifest = {
        "task": task.spec(),
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        "model_fingerprint": run.fingerprint,
        "config": config.to_dict(),
        "groups": groups,
        "num_samples": int(len(run.ids)),
        "dtype": config.dtype.value,
        "metadata_columns": sorted(run.metadata),
        "shards": shards,
        "gram": {**gram_file, "count": gram.count, "skipped_groups": gram.skipped},
        "projection_format": projection_format(),
        "run_key": run.run_key,
        "featurize_seconds": round(seconds, 3),
        **(extra or {}),
    }
    remove_unused_grams(path, commit_manifest(path, manifest))
    store = FeatureStore.open(path, task=task.spec()["task"])
    record_own_store(store.path, store.manifest, task)  # later commands here need no --trust-task
    return store


def featurize(
    task: Task,
    out: str | Path,
    config: FeaturizeConfig = FeaturizeConfig(),
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    resume: bool = False,
    limit: int | None = None,
    show_progress: bool = True,
) -> FeatureStore:
    """Featurize the task's training set into a new store at ``out``."""
    torch_device = resolve_device(device)
    run = prepare_run(task, config, checkpoint, torch_device, limit)
    with writer_lock(out) as storage:
        prepare_store(storage, overwrite=overwrite, resume=resume)
        return _featurize_into(storage, task, run, config, checkpoint, torch_device, resume, show_progress)


def _featurize_into(path: Storage, task: Task, run: FeaturizeRun, config: FeaturizeConfig,
                    checkpoint: str | Path | None, torch_device: torch.device, resume: bool,
                    show_progress: bool) -> FeatureStore:
    started = time.perf_counter()
    with make_projector(task, run.model, run.groups, config, checkpoint, torch_device) as projector:
        group_dims = projector.group_dims()
        check_index_dim(sum(group_dims.values()), "featurize")
        gram = GramAccumulator(group_dims, config.gram_max_dim)
        shards = []
        bar = tqdm(total=len(run.ids), desc="featurize", unit="ex", disable=not show_progress)
        for shard in run.shards(config.shard_size):
            shard_index, start, stop = shard
            info = completed_shard(path, shard_index, run.run_key) if resume else None
            if info is not None and info.rows == stop - start:
                gram.update(read_written_shard(path, info, list(group_dims))[1])
                bar.update(stop - start)
            else:
                info, feats = featurize_shard(task, run, projector, config, torch_device, path, shard, bar)
                gram.update(feats)
            shards.append(info.to_dict())
        bar.close()
        groups = group_entries(run.groups, projector)
    return commit_store(path, task, run, config, checkpoint, groups, shards, gram, time.perf_counter() - started)


def featurize_rows(
    task: Task,
    model: torch.nn.Module,
    dataset: Sequence,
    rows: Sequence[int],
    projector: GradientProjector,
    batch_size: int,
    device: torch.device,
    dtype: Any = np.float32,
    verify_first: bool = False,
    bar: Any = None,
    measurement: Any = None,
) -> dict[str, np.ndarray]:
    """Projected gradients ``{group: [len(rows), k_g]}`` of the given dataset rows.

    ``measurement(batch, model)`` replaces the training loss (query side).
    """
    compute = measurement or task.compute_train_loss
    hook = getattr(compute, "__name__", "")
    hook = f"{type(task).__name__}.{'concept_measurement' if hook == '<lambda>' else hook or 'measurement'}"
    rows = list(rows)
    parts: dict[str, list[np.ndarray]] = {}
    for offset in range(0, len(rows), batch_size):
        chunk = rows[offset : offset + batch_size]
        batch = task.to_device(make_batch(task, dataset, chunk), device)
        try:
            feats = projector(lambda: compute(batch, model), verify=verify_first and offset == 0)
        except TaskError as err:
            raise TaskError(f"task hook {hook}: {err}") from None
        for group, block in feats.items():
            if block.shape[0] != len(chunk):
                raise TaskError(f"the task returned {block.shape[0]} values for a batch of {len(chunk)} examples")
            parts.setdefault(group, []).append(block.detach().to("cpu").numpy().astype(dtype, copy=False))
        if bar is not None:
            bar.update(len(chunk))
    return {group: np.concatenate(blocks) for group, blocks in parts.items()}


def _run_key(fingerprint: str, config: FeaturizeConfig, groups: list[ParameterGroup], ids: np.ndarray, task: Task) -> str:
    payload = json.dumps(
        {"fingerprint": fingerprint, "config": config.to_dict(), "groups": [g.to_dict() for g in groups],
         "task": task.spec(), "projection_format": projection_format()},
        sort_keys=True,
    ).encode()
    digest = hashlib.sha256(payload)
    digest.update(np.ascontiguousarray(ids).tobytes())
    return digest.hexdigest()
