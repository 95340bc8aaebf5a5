"""Linear datamodeling score (DESIGN §4): retrain on random subsets, measure, correlate.

In: a task with a training routine (:meth:`~gradindex.task.Task.train`), an
:class:`~gradindex.config.LDSConfig`, query inputs, and attribution scores.
Out: :class:`RetrainedModels` (subset masks ``[M, N]``, measurements
``{concept: [M, Q]}`` averaged over ``R`` training runs per subset, and the runs themselves
``{concept: [R, M, Q]}``) and per-query Spearman correlations ``[Q]``.

Model ``j`` trains on subset ``S_j``; for query ``q`` its measurement is
``y_j(q)`` and the attribution's prediction ``ŷ_j(q) = Σ_{i∈S_j} τ(q, x_i)``.
LDS is the mean over queries of ``Spearman(y(q), ŷ(q))`` over the models. The
prediction is linear in the scores, so with ``τ = Σ_g w_g ψ_gᵀφ_g`` it is
``ŷ_j(q) = Σ_g w_g ψ_g(q)ᵀ (Σ_{i∈S_j} φ_g(x_i))``: :func:`subset_sums` streams
the store once into ``[M, k_g]`` per group, after which any weighting, single
group or preconditioner is evaluated in milliseconds (:func:`group_predictions`).

Cache layout (resumable: a rerun reuses every finished model and measurement)::

    CACHE/lds.json                               task spec, training-set size and ids hash, config
    CACHE/models/model-00012/<checkpoint>        checkpoint trained on subset 12 (Task.train's format), run 0
    CACHE/models/model-00012-run1/<checkpoint>   the same subset, training run 1 (another training seed)
    CACHE/measurements/<queries>/model-00012.npz {concept: [Q]} measurements of one query set (run 0;
                                                 model-00012-run1.npz for run 1, ...)

Run 0 is what a single-run cache holds, so a cache written with ``R = 1`` stays valid and
raising ``R`` (``runs_per_subset``) or ``M`` later trains only what is missing.

A new query set re-measures the cached checkpoints without retraining. Models
train in ``workers`` spawned processes (one torch thread each) with a progress bar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradindex.config import (
    AUTO_DAMPING,
    DEFAULT_DAMPING,
    MAX_WORKERS,
    LDSConfig,
    Preconditioner,
    parse_damping,
    require_positive,
    setting_key,
)
from gradindex.weights.damping import resolve_damping
from gradindex.errors import ConfigError, GradIndexError, StoreMismatchError, TaskError
from gradindex.features.projection import derive_seed
from gradindex.features.kfac import is_factor_preconditioner
from gradindex.features.query import QueryFeaturizer, measurement_function, precondition_features
from gradindex.store.feature_store import FeatureStore, atomic_write_json, temporary_path, write_arrays
from gradindex.task import (
    Task,
    default_queries,
    hash_into,
    load_task,
    make_batch,
    query_digests,
    require_training_routine,
)
from gradindex.weights.group_weights import learned_weights
from gradindex.eval.reliability import REPLICATES, bootstrap_lds, bootstrap_se, lds_ceiling, paired_se

logger = logging.getLogger(__name__)

CACHE_MANIFEST = "lds.json"
MODEL_DIR = "models"
MEASUREMENT_DIR = "measurements"


# -- LDS itself ---------------------------------------------------------------------------------
def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of every column pair: ``a [M, Q]``, ``b [M, Q]`` -> ``[Q]``.

    Ties get average ranks; a column that is constant in ``a`` or ``b`` correlates 0.
    """
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ConfigError(f"spearman: expected two [M, Q] arrays of one shape, got {a.shape} and {b.shape}")
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    denominator = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(0) / denominator
    return np.where(denominator > 0, rho, 0.0)


def lds_per_query(predictions: np.ndarray, measurements: np.ndarray) -> np.ndarray:
    """Per-query LDS ``[Q]`` from predictions ``ŷ [M, Q]`` and measurements ``y [M, Q]``; a one-line error
    when no query's measurement varies across the models (the LDS is undefined, not 0)."""
    measured = np.asarray(measurements, dtype=np.float64)
    if measured.ndim == 2 and measured.size and not (np.ptp(measured, axis=0) > 0).any():
        raise ConfigError(
            f"LDS is undefined: no query's measurement varies across the {measured.shape[0]} retrained models (too "
            "few models, or subsets too small to change the model); use more --models or a larger --fraction"
        )
    return spearman_columns(predictions, measurements)


def predictions_from_scores(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``ŷ [M, Q] = masks [M, N] @ scores [Q, N]ᵀ`` for full attribution score matrices."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise ConfigError(f"scores: expected [Q, {masks.shape[1]}], got {scores.shape}")
    return masks.astype(np.float64) @ scores.T


def subset_sums(store: FeatureStore, masks: np.ndarray, sample_ids: np.ndarray,
                groups: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``{group: Σ_{i∈S_j} φ_g(x_i)}`` as ``[M, k_g]`` float64, streaming the store's shards.

    ``masks [M, N]`` is indexed like ``sample_ids [N]`` (the task's training order);
    stored examples are matched by id, and ids the store lacks contribute nothing.
    """
    groups = store.groups if groups is None else list(groups)
    position = _positions(sample_ids)
    sums = {g: np.zeros((masks.shape[0], store.group_dims[g])) for g in groups}
    for ids, feats, _ in store.iter_shards(groups):
        columns = np.array([position.get(int(i), -1) for i in ids])
        if (columns < 0).any():
            raise StoreMismatchError(
                f"{store.path}: {int((columns < 0).sum())} stored sample ids are not in the task's training set"
            )
        chunk = masks[:, columns].astype(np.float64)
        for g in groups:
            sums[g] += chunk @ feats[g].astype(np.float64)
    return sums


def group_predictions(query_features: Mapping[str, np.ndarray], sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{group: ŷ_g [M, Q]}`` with ``ŷ_g = Σ_{i∈S_j} ψ_g(q)ᵀ φ_g(x_i)``; weights combine them linearly."""
    return {g: sums[g] @ np.asarray(query_features[g], dtype=np.float64).T for g in query_features}


def weighted_predictions(predictions: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """``Σ_g w_g ŷ_g`` ``[M, Q]``."""
    return sum(float(weights[g]) * predictions[g] for g in predictions)


def lds_report(store: FeatureStore, retrained: "RetrainedModels", queries: Sequence, concept: str = "all",
               damping: float = DEFAULT_DAMPING, device: str = "cpu", show_progress: bool = False,
               replicates: int = REPLICATES, factor_settings: Sequence[Preconditioner] = ()) -> list[dict[str, Any]]:
    """LDS of the standard attributions of ``store`` for ``queries`` (the ones ``retrained`` measured).

    Rows: uniform weights, each single group alone (the per-group diagnostic) and
    the concept's learned weights when the manifest has them (under the setting
    they were learned for; "learned (tuned)" for those ``gradindex tune`` chose, "uniform (tuned)" when it
    chose uniform weights), for grad-dot and Gram preconditioning. Each row has
    ``attribution``, ``preconditioner``, ``damping`` (``"auto"`` for a per-group one), ``lds`` (mean over
    queries), ``se`` (its standard error: a bootstrap over retrained models and queries,
    :mod:`gradindex.eval.reliability`), ``sem_queries`` (the standard error over queries alone, for comparison)
    and ``ceiling`` (what the run-averaged ground truth allows; ``None`` with one run per subset). The learned
    row also has ``minus_uniform`` ± ``minus_uniform_se`` (paired, against uniform weights of its setting)
    and ``fit_overlap``: how many of ``queries`` the weights were fitted on (logged as a warning when not 0:
    that row is then optimistic). ``factor_settings`` (``kfac``, ``ekfac``) add their rows at ``damping``
    (factors fitted on first use).
    """
    damping = parse_damping(damping, "damping")
    featurizer = QueryFeaturizer.open(store, concept, Preconditioner.IDENTITY, device=device)
    try:
        raw = featurizer.group_features(queries, show_progress=show_progress)
    finally:
        featurizer.close()
    sums = subset_sums(store, retrained.masks, retrained.sample_ids)
    groups = store.groups
    learned_by_setting = learned_weights(store.manifest, concept, groups)
    settings = [(Preconditioner.IDENTITY, 0.0), (Preconditioner.GRAM, resolve_damping(store, damping)),
                *((Preconditioner(p), damping) for p in factor_settings)]
    rows, predictions_of, baselines = [], [], {}  # baselines: {learned row: uniform predictions of its setting}
    factor_features: dict[str, dict[str, np.ndarray]] = {}

    def features(preconditioner: Preconditioner, setting_damping) -> dict[str, np.ndarray]:
        """``−ψ_g(q)`` of one setting: from ``raw`` (identity, Gram) or a factor featurizer (K-FAC, EK-FAC)."""
        if not is_factor_preconditioner(preconditioner):
            return precondition_features(store, raw, preconditioner, setting_damping)
        key = setting_key(preconditioner, setting_damping)
        if key not in factor_features:
            factor = QueryFeaturizer.open(store, concept, preconditioner, setting_damping, device=device)
            try:
                factor_features[key] = factor.group_features(queries, show_progress=show_progress)
            finally:
                factor.close()
        return factor_features[key]

    def add(name: str, predictions: np.ndarray, preconditioner: Preconditioner, setting_damping) -> None:
        label = AUTO_DAMPING if isinstance(setting_damping, Mapping) else setting_damping
        rows.append({"attribution": name, "preconditioner": preconditioner.value,
                     "damping": label if preconditioner is not Preconditioner.IDENTITY else None})
        predictions_of.append(predictions)

    for preconditioner, setting_damping in settings:
        predictions = group_predictions(features(preconditioner, setting_damping), sums)
        add("uniform", weighted_predictions(predictions, {g: 1.0 for g in groups}), preconditioner, setting_damping)
        for g in groups:
            add(f"group {g}", predictions[g], preconditioner, setting_damping)
    digests = query_digests(queries) if learned_by_setting else []
    for learned in learned_by_setting.values():
        learned_setting = learned.info.get("config") or {}
        preconditioner = Preconditioner(learned_setting.get("preconditioner", "gram"))
        learned_damping = resolve_damping(store, learned_setting.get("damping", damping), preconditioner)
        if not isinstance(learned_damping, Mapping):
            learned_damping = float(learned_damping)
        predictions = group_predictions(features(preconditioner, learned_damping), sums)
        add("learned (tuned)" if learned.info.get("tuned") else "learned",
            weighted_predictions(predictions, learned.weights), preconditioner, learned_damping)
        baselines[len(rows) - 1] = weighted_predictions(predictions, {g: 1.0 for g in groups})
        overlap = learned.fit_overlap(digests)
        rows[-1]["fit_overlap"] = overlap
        if overlap:
            logger.warning("warning: %d of the %d evaluation queries were used to fit the learned weights of concept "
                           "%r; their LDS is optimistic (evaluate on other queries, e.g. the task's eval split)",
                           overlap, len(queries), concept)
    tuned = _tuned_uniform(store.manifest, concept)
    if tuned is not None:
        add("uniform (tuned)", weighted_predictions(group_predictions(features(*tuned), sums), {g: 1.0 for g in groups}),
            *tuned)
    return _with_errors(rows, predictions_of, retrained, concept, baselines, replicates)


def _tuned_uniform(manifest: Mapping[str, Any], concept: str) -> tuple[Preconditioner, float] | None:
    """The setting ``gradindex tune`` chose when it chose uniform weights (concept ``all``), else None."""
    tuned = manifest.get("tuned")
    if concept != "all" or not isinstance(tuned, Mapping) or tuned.get("method") != "uniform" \
            or tuned.get("preconditioner") not in (Preconditioner.IDENTITY.value, Preconditioner.GRAM.value):
        return None
    return Preconditioner(tuned["preconditioner"]), 0.0 if tuned.get("damping") is None else float(tuned["damping"])


def _with_errors(rows: list[dict[str, Any]], predictions: list[np.ndarray], retrained: "RetrainedModels",
                 concept: str, baselines: Mapping[int, np.ndarray], replicates: int) -> list[dict[str, Any]]:
    """Each row's LDS, bootstrap SE, SE over queries and the ceiling; learned rows' paired gain over
    ``baselines[row]`` (uniform weights of the row's setting)."""
    base_of = {row: len(predictions) + i for i, row in enumerate(baselines)}
    everything = [*predictions, *baselines.values()]
    boot = bootstrap_lds(everything, retrained.measurements[concept], replicates) if replicates > 1 else None
    se = bootstrap_se(boot) if boot is not None else np.zeros(len(everything))
    ceiling = retrained.ceiling(concept)
    for e, row in enumerate(rows):
        per_query = retrained.lds(predictions[e], concept)
        row.update(lds=float(per_query.mean()), se=float(se[e]),
                   sem_queries=float(per_query.std(ddof=1) / np.sqrt(len(per_query))) if len(per_query) > 1 else 0.0,
                   ceiling=None if ceiling is None else ceiling[1])
        if e in base_of:
            row["minus_uniform"] = row["lds"] - float(retrained.lds(baselines[e], concept).mean())
            row["minus_uniform_se"] = paired_se(boot, e, base_of[e]) if boot is not None else 0.0
    return rows


# -- retraining -----------------------------------------------------------------------------------
def subset_indices(num_train: int, fraction: float, seed: int, model: int) -> np.ndarray:
    """Sorted positions of subset ``model``: ``round(fraction · num_train)`` of ``range(num_train)``."""
    size = max(1, int(round(fraction * num_train)))
    rng = np.random.default_rng(derive_seed(seed, "lds-subset", str(model)))
    return np.sort(rng.permutation(num_train)[:size])


def training_seed(config: LDSConfig, model: int, run: int = 0) -> int:
    """The training seed of ``run`` of subset ``model`` (run 0: the seed a single-run evaluation uses)."""
    if config.training_seed is not None:
        return config.training_seed
    if run == 0:
        return derive_seed(config.seed, "lds-train", str(model)) % (2**31)
    return derive_seed(config.seed, "lds-train", str(model), f"run{run}") % (2**31)


def run_name(model: int, run: int = 0) -> str:
    """The cache name of ``run`` of subset ``model``: ``model-00012`` (run 0), ``model-00012-run1``, ..."""
    return f"model-{model:05d}" + (f"-run{run}" if run else "")


@dataclass(frozen=True)
class RetrainedModels:
    """What LDS needs from retraining: ``masks [M, N]`` (bool, the task's training order),
    the training ``sample_ids [N]``, ``measurements {concept: [M, Q]}`` (the mean over the runs)
    and, when known, every run's ``runs {concept: [R, M, Q]}``."""

    masks: np.ndarray
    sample_ids: np.ndarray
    measurements: dict[str, np.ndarray]
    runs: dict[str, np.ndarray] | None = None

    @property
    def runs_per_subset(self) -> int:
        return 1 if self.runs is None else len(next(iter(self.runs.values())))

    def queries(self, positions: Sequence[int]) -> "RetrainedModels":
        """The same models with the measurements of the queries at ``positions`` only (``[M, len(positions)]``),
        e.g. the eval split of the task's default queries."""
        positions = np.asarray(positions, dtype=np.int64)
        runs = None if self.runs is None else {c: r[:, :, positions] for c, r in self.runs.items()}
        return RetrainedModels(self.masks, self.sample_ids, {c: m[:, positions] for c, m in self.measurements.items()},
                               runs)

    def ceiling(self, concept: str = "all") -> tuple[float, float] | None:
        """``(reliability, ceiling)`` of ``concept``'s run-averaged measurements
        (:func:`gradindex.eval.reliability.lds_ceiling`); ``None`` with one run per subset."""
        return lds_ceiling(None if self.runs is None else self.runs.get(concept))

    def lds(self, predictions: np.ndarray, concept: str = "all") -> np.ndarray:
        """Per-query LDS ``[Q]`` of predictions ``[M, Q]`` against ``concept``'s measurements."""
        if concept not in self.measurements:
            raise ConfigError(f"LDS: no measurements of concept {concept!r} (have {sorted(self.measurements)})")
        measured = self.measurements[concept]
        if predictions.shape != measured.shape:
            raise ConfigError(f"LDS: predictions have shape {predictions.shape}, measurements {measured.shape}")
        return lds_per_query(predictions, measured)


@dataclass(frozen=True)
class _Job:
    """One model's work, picklable for a worker process."""

    task_spec: str
    task_options: dict[str, Any]
    cache: str
    model: int
    run: int
    indices: np.ndarray
    seed: int
    queries_file: str | None
    queries_key: str
    concepts: tuple[str, ...]


def retrain(
    task: Task,
    cache: str | Path,
    config: LDSConfig = LDSConfig(),
    queries_file: str | Path | None = None,
    workers: int = 2,
    show_progress: bool = True,
    queries: Sequence | None = None,
) -> RetrainedModels:
    """Train (or reuse) ``config.runs_per_subset`` models on each of ``config.num_models`` subsets and
    measure the queries on each; the measurements are averaged over a subset's runs.

    Queries are the task's :meth:`~gradindex.task.Task.query_dataset`, or
    ``task.load_queries(queries_file)`` (``queries``: that dataset, already loaded).
    Every concept of the task is measured (``all`` plus ``task.concepts``). With
    ``workers > 1`` each worker rebuilds the task from ``task.spec()``, so the task
    must be loadable by :func:`load_task`.
    """
    require_positive(workers, "workers", maximum=MAX_WORKERS)
    cache = Path(cache)
    if queries is None:
        queries = default_queries(task) if queries_file is None else task.load_queries(queries_file)
    plan = _Plan.of(task, cache, config, queries, queries_file)
    sample_ids, masks, jobs, key, concepts = plan.sample_ids, plan.masks, plan.jobs, plan.key, plan.concepts
    spec, runs = task.spec(), config.runs_per_subset
    total = config.num_models * runs
    if jobs:
        parallel = 1 if workers == 1 or len(jobs) == 1 else min(workers, len(jobs))
        logger.info("LDS: training %d of %d models (%d subsets x %d runs, each on %d of %d training examples) and "
                    "measuring %d queries on each, %d at a time; cached in %s, so a rerun reuses them. A model takes "
                    "about as long as training the task once; the time estimate follows the first model.",
                    len(jobs), total, config.num_models, runs, round(config.fraction * len(sample_ids)),
                    len(sample_ids), len(queries), parallel, cache)
        bar = tqdm(total=total, initial=total - len(jobs), desc="retrain", unit="model",
                   disable=not show_progress)
        started = time.perf_counter()

        def finished(done: int) -> None:
            bar.update(1)
            if done == 1 and len(jobs) > 1:
                seconds = (time.perf_counter() - started) * (len(jobs) - 1) / parallel
                logger.info("LDS: first model done in %.0f s; about %.0f min for the other %d",
                            time.perf_counter() - started, seconds / 60, len(jobs) - 1)

        if parallel == 1:
            for done, job in enumerate(jobs, start=1):
                _run_job(job, task, queries)
                finished(done)
        else:
            _run_parallel(jobs, spec, workers, parallel, finished)
        bar.close()
    measured = {c: np.zeros((runs, config.num_models, len(queries))) for c in concepts}
    for j in range(config.num_models):
        for r in range(runs):
            with np.load(_measurement_path(cache, key, j, r)) as data:
                for c in concepts:
                    measured[c][r, j] = data[c]
    return RetrainedModels(masks, sample_ids, {c: m.mean(0) for c, m in measured.items()}, measured)


def _run_parallel(jobs: list[_Job], spec: dict[str, Any], workers: int, parallel: int,
                  finished: Callable[[int], None]) -> None:
    """Run ``jobs`` in ``parallel`` spawned processes (each rebuilding the task from ``spec``), calling
    ``finished(done)`` as each completes; a worker's failure is one line (:class:`TaskError`)."""
    _check_loadable(spec)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=parallel, mp_context=get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(_run_job, job) for job in jobs]
        for done, future in enumerate(as_completed(futures), start=1):
            try:
                future.result()
            except GradIndexError:
                raise
            except Exception as err:  # the task's code failed in a worker: one line, not its traceback
                raise TaskError(f"LDS worker: {_worker_failure(err)}") from err
            finished(done)


@dataclass(frozen=True)
class _Plan:
    """What :func:`retrain` has to do: the subsets' ``masks [M, N]`` and the trainings still missing."""

    sample_ids: np.ndarray
    masks: np.ndarray
    jobs: list[_Job]
    key: str
    concepts: tuple[str, ...]

    @classmethod
    def of(cls, task: Task, cache: Path, config: LDSConfig, queries: Sequence,
           queries_file: str | Path | None = None) -> "_Plan":
        require_training_routine(task, "LDS")
        sample_ids = np.asarray(task.sample_ids(task.train_dataset()), dtype=np.int64)
        size = round(config.fraction * len(sample_ids))
        if not 2 <= size < len(sample_ids):
            raise ConfigError(f"LDSConfig.fraction: {config.fraction:g} of {len(sample_ids)} training examples is "
                              f"{size} per model; expected 2..{len(sample_ids) - 1} (a subset that trains a model)")
        concepts = ("all", *task.concepts)
        _open_cache(cache, task, config, sample_ids)
        key = dataset_key(task, queries)
        (cache / MEASUREMENT_DIR / key).mkdir(parents=True, exist_ok=True)
        spec = task.spec()
        jobs = []
        masks = np.zeros((config.num_models, len(sample_ids)), dtype=bool)
        for j in range(config.num_models):
            indices = subset_indices(len(sample_ids), config.fraction, config.seed, j)
            masks[j, indices] = True
            for r in range(config.runs_per_subset):
                if not _measurement_path(cache, key, j, r).is_file():
                    jobs.append(_Job(spec["task"], spec.get("options", {}), str(cache), j, r, indices,
                                     training_seed(config, j, r), None if queries_file is None else str(queries_file),
                                     key, concepts))
        return cls(sample_ids, masks, jobs, key, concepts)


def time_one_training(task: Task, cache: str | Path, config: LDSConfig, queries: Sequence) -> tuple[int, float | None]:
    """``(missing trainings, seconds one took)``: trains and measures the first missing model of
    :func:`retrain`'s plan (part of the budget: ``retrain`` then skips it) to time it; ``(0, None)``
    when everything is cached. The queries must be ``retrain``'s own (``queries_file`` unsupported)."""
    jobs = _Plan.of(task, Path(cache), config, queries).jobs
    if not jobs:
        return 0, None
    started = time.perf_counter()
    _run_job(jobs[0], task, queries)
    return len(jobs), time.perf_counter() - started


def _run_job(job: _Job, task: Task | None = None, queries: Sequence | None = None) -> int:
    """Train run ``job.run`` of subset ``job.model`` unless its checkpoint exists, then measure the queries on it."""
    task = task or load_task(job.task_spec, job.task_options)
    cache = Path(job.cache)
    folder = cache / MODEL_DIR / run_name(job.model, job.run)
    if not folder.is_dir():
        tmp = temporary_path(folder)
        tmp.mkdir(parents=True)
        try:
            written = Path(task.train(tmp / "checkpoint", job.indices, job.seed))
            if written.parent != tmp or not written.exists():
                raise TaskError(f"{type(task).__name__}.train(path, ...) must write the checkpoint at path and "
                                f"return it; asked for {tmp / 'checkpoint'}, got {written}")
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    checkpoint = _checkpoint_in(folder)
    model = task.load_model(checkpoint).eval()
    if queries is None:
        queries = default_queries(task) if job.queries_file is None else task.load_queries(job.queries_file)
    values = {c: measure(task, model, queries, c) for c in job.concepts}
    write_arrays(_measurement_path(cache, job.queries_key, job.model, job.run), values)
    return job.model


def measure(task: Task, model: torch.nn.Module, dataset: Sequence, concept: str = "all",
            batch_size: int = 256) -> np.ndarray:
    """The measurement ``m(q)`` (or ``m_c(q)``) of every item of ``dataset`` under ``model``: ``[Q]``."""
    function = measurement_function(task, concept)
    out = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = make_batch(task, dataset, range(start, min(len(dataset), start + batch_size)))
            values = function(batch, model)
            out.append(values.detach().to("cpu", torch.float64).numpy().reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)


def dataset_key(task: Task, dataset: Sequence, batch_size: int = 256) -> str:
    """A short hash of a query set's contents (its collated batches' tensors)."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    for start in range(0, len(dataset), batch_size):
        hash_into(digest, make_batch(task, dataset, range(start, min(len(dataset), start + batch_size))))
    return digest.hexdigest()[:16]


def _open_cache(cache: Path, task: Task, config: LDSConfig, sample_ids: np.ndarray) -> None:
    """Create the cache, or check that an existing one holds models of this task and config."""
    identity = {
        "task": task.spec(),
        "num_train": int(len(sample_ids)),
        "sample_ids_sha256": hashlib.sha256(np.ascontiguousarray(sample_ids).tobytes()).hexdigest(),
        "fraction": config.fraction,
        "seed": config.seed,
        "training_seed": config.training_seed,
    }
    path = cache / CACHE_MANIFEST
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except ValueError as err:
            raise StoreMismatchError(f"{path} is not valid JSON ({err}); delete the cache folder") from None
        differ = sorted(k for k in identity if stored.get(k) != identity[k])
        if differ:
            raise StoreMismatchError(
                f"LDS cache {cache} holds models of another setting (differs in {', '.join(differ)}); "
                "pass another --cache folder or delete this one"
            )
        return
    if cache.exists() and any(cache.iterdir()):
        raise ConfigError(f"LDS cache {cache} exists, is not empty and has no {CACHE_MANIFEST}; use an empty folder")
    (cache / MODEL_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, identity)


def _checkpoint_in(folder: Path) -> Path:
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) != 1:
        raise StoreMismatchError(f"LDS cache: {folder} should hold one checkpoint, found {len(entries)}; delete it")
    return entries[0]


def _measurement_path(cache: Path, key: str, model: int, run: int = 0) -> Path:
    return cache / MEASUREMENT_DIR / key / f"{run_name(model, run)}.npz"


def _positions(sample_ids: np.ndarray) -> dict[int, int]:
    return {int(i): p for p, i in enumerate(sample_ids)}


def _worker_failure(err: BaseException) -> str:
    """What failed in a worker process, with the innermost frame outside gradindex and the
    standard library (the task's own file:line) when the worker's traceback names one."""
    if isinstance(err, BrokenProcessPool):
        return ("a training process died (the task's train() or load_model() called sys.exit, crashed or ran out "
                "of memory); rerun with --workers 1 to see where")
    text = " ".join(str(err).split())
    what = f"{type(err).__name__}" + (f": {text[:300]}" if text else "")
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', str(getattr(err.__cause__, "tb", "")))
    package, library = str(Path(__file__).parents[1]), str(Path(os.__file__).parent)
    own = [f for f in frames if not f[0].startswith((package, library)) and "<frozen" not in f[0]]
    if own:
        file, line, function = own[-1]
        return f"task code ({function}) raised {what} ({file}:{line})"
    return what


def _check_loadable(spec: Mapping[str, Any]) -> None:
    try:
        load_task(spec["task"], spec.get("options", {}))
    except Exception as err:
        raise ConfigError(
            f"LDS with several workers rebuilds the task in each worker from its spec {spec['task']!r}, which "
            f"fails ({err}); use workers=1 or a task loadable as a built-in name, file.py:Class or module:Class"
        ) from None

