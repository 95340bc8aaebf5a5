"""Fitting K-FAC / EK-FAC factors for a store (``gradindex fit-factors``), and reading them back.

In: a complete store, its task and checkpoint model. Out: ``factors-<sha>.npz`` in the
store, listed in the manifest as ``factors`` (file, sha256, fisher, count, …) and
read back as :class:`~gradindex.features.kfac.Factors`.

Two passes over (a seeded sample of at most ``max_examples``) training examples:
1. covariances ``A``, ``S`` of every K-FAC block → float64 eigenbases;
2. per-example full gradients → EK-FAC's ``Λ = E[(Q_Sᵀ G Q_A)²]`` and the diagonal
   ``E[g²]`` of the blocks K-FAC does not cover.
The losses use labels sampled from the model (``Task.compute_sampled_loss``: the true
Fisher, the default) or the training labels (``fisher="empirical"``); a task that cannot
sample falls back to the empirical Fisher, and the manifest says so. Sampling is seeded
and the same in both passes. ``build-index``/``learn-weights``/``eval lds``/``query`` fit
the factors on first use with the defaults (:func:`ensure_factors`), like kronfluence's
``fit_all_factors`` before ``compute_pairwise_scores``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradindex.config import FeaturizeConfig
from gradindex.errors import ConfigError
from gradindex.features.groups import ParameterGroup
from gradindex.features.kfac import CovarianceAccumulator, EigenvalueAccumulator, Factors, full_gradient_projector
from gradindex.features.run import resolve_groups
from gradindex.store.feature_store import FeatureStore, write_factors
from gradindex.task import Task, make_batch

logger = logging.getLogger(__name__)

FISHER_KINDS = ("true", "empirical")
#: kronfluence's covariance_max_examples / lambda_max_examples default
DEFAULT_MAX_EXAMPLES = 100_000


def loss_function(task: Task, fisher: str) -> tuple[Callable[[Any, torch.nn.Module], torch.Tensor], str]:
    """``(loss(batch, model) -> [B], fisher used)``: sampled labels for ``true`` when the task can draw them."""
    if fisher not in FISHER_KINDS:
        raise ConfigError(f"fisher: expected one of {', '.join(FISHER_KINDS)}, got {fisher!r}")
    if fisher == "true" and type(task).compute_sampled_loss is not Task.compute_sampled_loss:
        return task.compute_sampled_loss, "true"
    if fisher == "true":
        logger.warning("%s defines no compute_sampled_loss: the factors use the empirical Fisher (training labels)",
                       type(task).__name__)
    return task.compute_train_loss, "empirical"


def fit_factors(task: Task, model: torch.nn.Module, groups: Sequence[ParameterGroup], dataset: Sequence,
                rows: Sequence[int], loss: Callable, batch_size: int = 64, device: torch.device | str = "cpu",
                seed: int = 0, show_progress: bool = False) -> Factors:
    """K-FAC eigenbases, EK-FAC eigenvalues and diagonals over ``dataset[rows]`` (two passes)."""
    device = torch.device(device)
    rows = list(rows)
    accumulator = CovarianceAccumulator(model, groups, device)
    try:
        _run(task, model, dataset, rows, batch_size, device, seed, "covariances",
             lambda batch: accumulator.step(lambda: loss(batch, model)), show_progress)
        kron = accumulator.eigenbases()
    finally:
        accumulator.close()
    eigen = EigenvalueAccumulator(groups, kron, device)
    projector = full_gradient_projector(model, groups, device)
    try:
        _run(task, model, dataset, rows, batch_size, device, seed, "eigenvalues",
             lambda batch: eigen.update(projector(lambda: loss(batch, model))), show_progress)
    finally:
        projector.close()
    return eigen.result(kron)


def _run(task: Task, model, dataset: Sequence, rows: list[int], batch_size: int, device: torch.device, seed: int,
         what: str, step: Callable, show_progress: bool) -> None:
    """One seeded pass: ``step(batch)`` per batch (label sampling reproducible and the same in both passes)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            tqdm(total=len(rows), desc=f"factors: {what}", unit="ex", disable=not show_progress) as bar:
        torch.manual_seed(seed)
        for offset in range(0, len(rows), batch_size):
            chunk = rows[offset: offset + batch_size]
            step(task.to_device(make_batch(task, dataset, chunk), device))
            bar.update(len(chunk))


def store_positions(store: FeatureStore, task: Task, dataset: Sequence) -> np.ndarray:
    """Positions in ``dataset`` of the training examples the store holds (``featurize --limit`` keeps a prefix)."""
    ids = np.asarray(task.sample_ids(dataset))
    stored = np.concatenate([shard_ids for shard_ids, _, _ in store.iter_shards(groups=[])] or [np.zeros(0, np.int64)])
    positions = np.flatnonzero(np.isin(ids, stored))
    if len(positions) != len(stored):
        raise ConfigError(f"{store.path}: {len(stored) - len(positions)} of the store's sample ids are not in the task's "
                          "training set; featurize again")
    return positions


def sample_rows(count: int, max_examples: int, seed: int) -> np.ndarray:
    """All positions, or a seeded sorted sample of ``max_examples`` of them."""
    if max_examples <= 0:
        raise ConfigError(f"max_examples: expected a positive integer, got {max_examples}")
    if count <= max_examples:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, max_examples, replace=False))


def fit_store_factors(store: FeatureStore, task: Task, model: torch.nn.Module, fisher: str = "true",
                      max_examples: int = DEFAULT_MAX_EXAMPLES, batch_size: int = 0, device: str = "cpu",
                      seed: int = 0, show_progress: bool = False) -> FeatureStore:
    """Fit the factors of ``store`` (model = the store's checkpoint) and list them in its manifest."""
    config = FeaturizeConfig.from_dict(store.manifest["config"])
    groups = resolve_groups(task, model, config)
    loss, used = loss_function(task, fisher)
    dataset = task.train_dataset()
    rows = store_positions(store, task, dataset)
    rows = rows[sample_rows(len(rows), max_examples, seed)]
    start = time.perf_counter()
    factors = fit_factors(task, model, groups, dataset, rows, loss, batch_size or config.batch_size,
                          next(model.parameters()).device, seed, show_progress)
    seconds = time.perf_counter() - start
    entry = {**write_factors(store.storage, factors.to_arrays()), "fisher": used, "count": int(len(rows)),
             "max_examples": int(max_examples), "seed": int(seed), "seconds": round(seconds, 3),
             "kronecker_blocks": sorted(factors.kron), "diagonal_blocks": sorted(factors.diag)}
    old = store.manifest.get("factors")
    store.update_manifest({"factors": entry})
    if old and old["file"] != entry["file"]:
        store.storage.delete(old["file"])
    logger.info("fitted factors (%s Fisher, %d examples) in %.1fs", used, len(rows), seconds)
    return store.refresh()


def store_factors(store: FeatureStore) -> Factors | None:
    """The store's factors (verified), or None when none were fitted."""
    arrays = store.read_factors()
    return None if arrays is None else Factors.from_arrays(arrays, store.manifest["factors"])


def ensure_factors(store: FeatureStore, task: Task, model: torch.nn.Module,
                   show_progress: bool = False) -> tuple[FeatureStore, Factors]:
    """The store's factors, fitted first (with the defaults) when the store has none."""
    factors = store_factors(store)
    if factors is None:
        logger.info("%s has no K-FAC factors yet: fitting them (gradindex fit-factors sets the options)", store.path)
        store = fit_store_factors(store, task, model, show_progress=show_progress)
        factors = store_factors(store)
    return store, factors
