"""The featurize stage: task → per-example projected gradients → feature store.

In: a :class:`~gradindex.task.Task`, a checkpoint and a
:class:`~gradindex.config.FeaturizeConfig`. Out: a complete
:class:`~gradindex.store.FeatureStore` (shards, Gram matrices, manifest).

The run key (a hash of the model fingerprint, config, groups and sample ids)
is written beside every shard, so a rerun with ``resume=True`` skips shards
already complete and verified, and never mixes shards of different runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradindex.config import FeaturizeConfig, StorageDtype
from gradindex.errors import TaskError
from gradindex.gradients import GradientProjector
from gradindex.groups import ParameterGroup, parameter_groups
from gradindex.precondition import GramAccumulator
from gradindex.store import (
    GRAM_FILE,
    FeatureStore,
    commit_manifest,
    completed_shard,
    prepare_store,
    read_shard,
    write_arrays,
    write_shard,
)
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
    metadata = {name: np.asarray(values) for name, values in task.metadata(dataset).items()}
    for name, values in metadata.items():
        if len(values) != len(dataset):
            raise TaskError(f"metadata column {name!r}: {len(values)} values for {len(dataset)} examples")
    return dataset, ids.astype(np.int64), metadata


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
    torch_device = torch.device(device)
    model = task.load_model(checkpoint).to(torch_device).eval()
    groups = resolve_groups(task, model, config)
    dataset, ids, metadata = training_table(task)
    if limit is not None:
        ids, metadata = ids[:limit], {name: values[:limit] for name, values in metadata.items()}
    fingerprint = model_fingerprint(model)
    run_key = _run_key(fingerprint, config, groups, ids, task)
    path = prepare_store(out, overwrite=overwrite, resume=resume)
    dtype = np.float16 if config.dtype is StorageDtype.FLOAT16 else np.float32
    started = time.perf_counter()
    with GradientProjector(model, groups, config.projection, torch_device) as projector:
        group_dims = projector.group_dims()
        gram = GramAccumulator(group_dims, config.gram_max_dim)
        shards = []
        bar = tqdm(total=len(ids), desc="featurize", unit="ex", disable=not show_progress)
        for shard_index, start in enumerate(range(0, len(ids), config.shard_size)):
            stop = min(len(ids), start + config.shard_size)
            info = completed_shard(path, shard_index, run_key) if resume else None
            if info is not None:
                gram.update(read_shard(path / info.path, list(group_dims))[1])
                bar.update(stop - start)
            else:
                feats = featurize_rows(task, model, dataset, range(start, stop), projector, config.batch_size,
                                       torch_device, dtype, verify_first=(start == 0), bar=bar)
                gram.update(feats)
                info = write_shard(path, shard_index, ids[start:stop], feats,
                                   {name: values[start:stop] for name, values in metadata.items()}, run_key)
            if info.rows != stop - start:
                raise TaskError(f"shard {shard_index}: {info.rows} rows written, expected {stop - start}")
            shards.append(info.to_dict())
        bar.close()
    grams = gram.result()
    group_names = [g.name for g in groups]
    gram_sha = write_arrays(path / GRAM_FILE, {f"g{group_names.index(g)}": m for g, m in grams.items()})
    manifest = {
        "task": task.spec(),
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        "model_fingerprint": fingerprint,
        "config": config.to_dict(),
        "groups": [
            {**group.to_dict(), "dim": group_dims[group.name],
             "blocks": [{**bp.block.to_dict(), **bp.dims()} for bp in projector.projectors[group.name]]}
            for group in groups
        ],
        "num_samples": int(len(ids)),
        "dtype": config.dtype.value,
        "metadata_columns": sorted(metadata),
        "shards": shards,
        "gram": {"sha256": gram_sha, "count": gram.count, "skipped_groups": gram.skipped},
        "run_key": run_key,
        "featurize_seconds": round(time.perf_counter() - started, 3),
    }
    commit_manifest(path, manifest)
    return FeatureStore.open(path)


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
    rows = list(rows)
    parts: dict[str, list[np.ndarray]] = {}
    for offset in range(0, len(rows), batch_size):
        chunk = rows[offset : offset + batch_size]
        batch = task.to_device(make_batch(task, dataset, chunk), device)
        feats = projector(lambda: compute(batch, model), verify=verify_first and offset == 0)
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
         "task": task.spec()},
        sort_keys=True,
    ).encode()
    digest = hashlib.sha256(payload)
    digest.update(np.ascontiguousarray(ids).tobytes())
    return digest.hexdigest()
