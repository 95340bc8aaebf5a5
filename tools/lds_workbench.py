"""Shared machinery of the LDS benchmarks (bench_lds.py, bench_lm_lds.py, bench_quality.py).

* :func:`open_or_featurize`: a cached store per (task, seed, grouping, proj_dim);
* :class:`Workbench`: one store + its retrained models + the task's queries, with the raw
  (unpreconditioned) query features and the subset sums cached on disk, so that the LDS of
  any preconditioner, damping and group weighting costs milliseconds;
* :func:`oracle_weights`: group weights fitted to the retrained models (labels: a head-room
  diagnostic, not an attribution method);
* :func:`halves`: the fit/evaluation halves of the queries and their LDS; :func:`best_single`: the best group alone;
* :func:`paired`: paired per-query differences with their standard errors.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradindex.config import FeaturizeConfig, GroupRule, Preconditioner, ProjectionConfig  # noqa: E402
from gradindex.features.run import featurize  # noqa: E402
from gradindex.eval.lds import RetrainedModels, group_predictions, lds_per_query, subset_sums  # noqa: E402
from gradindex.features.query import QueryFeaturizer, precondition_features  # noqa: E402
from gradindex.store.feature_store import FeatureStore, write_arrays  # noqa: E402

GROUPINGS = {"module": (), "bias": (GroupRule("*.bias", "{param}"),)}


def open_or_featurize(task, path: Path, seed: int, grouping: str = "module", proj_dim: int = 256) -> FeatureStore:
    """The store at ``path``, featurized (default config, projection ``seed``) when it is missing or broken."""
    try:
        return FeatureStore.open(path)
    except Exception:
        config = FeaturizeConfig(projection=ProjectionConfig(proj_dim=proj_dim, seed=seed),
                                 group_rules=GROUPINGS[grouping])
        return featurize(task, path, config, overwrite=True, show_progress=False)


def _cached_arrays(path: Path, compute) -> dict[str, np.ndarray]:
    if path.is_file():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_arrays(path, arrays)
    return arrays


class Workbench:
    """LDS of any attribution built from one store, for the queries the retrained models measured.

    ``raw [group] [Q, k_g]``: the queries' unpreconditioned features ``−φ_g(q)`` (cached in
    ``folder/queries-raw.npz``); ``sums [group] [M, k_g]``: the subset sums (``folder/sums.npz``).
    """

    def __init__(self, store: FeatureStore, retrained: RetrainedModels, queries: Sequence, folder: Path,
                 concept: str = "all"):
        self.store = store
        self.retrained = retrained
        self.measured = retrained.measurements[concept]
        self.groups = store.groups

        def raw_features() -> dict[str, np.ndarray]:
            featurizer = QueryFeaturizer.open(store, concept, Preconditioner.IDENTITY)
            try:
                return featurizer.group_features(queries)
            finally:
                featurizer.close()

        self.raw = _cached_arrays(folder / "queries-raw.npz", raw_features)
        self.sums = _cached_arrays(folder / "sums.npz",
                                   lambda: subset_sums(store, retrained.masks, retrained.sample_ids))
        self._predictions: dict = {}

    def features(self, preconditioner: Preconditioner, damping, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``{group: −ψ_g(q) [Q, k_g]}`` under a setting (``damping``: one number or ``{group: number}``)."""
        raw = self.raw if rows is None else {g: v[rows] for g, v in self.raw.items()}
        return precondition_features(self.store, raw, preconditioner, damping)

    def predictions(self, preconditioner: Preconditioner, damping) -> dict[str, np.ndarray]:
        """``{group: ŷ_g [M, Q]}`` under a setting (memoised)."""
        key = (preconditioner.value, repr(sorted(damping.items())) if isinstance(damping, Mapping) else float(damping))
        if key not in self._predictions:
            self._predictions[key] = group_predictions(self.features(preconditioner, damping), self.sums)
        return self._predictions[key]

    def combined(self, preconditioner: Preconditioner, damping, weights: Mapping[str, float]) -> np.ndarray:
        predictions = self.predictions(preconditioner, damping)
        return sum(float(weights[g]) * predictions[g] for g in self.groups)

    def lds(self, predictions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Per-query LDS ``[len(rows)]`` of ``predictions [M, Q]`` on query ``rows``."""
        return lds_per_query(predictions[:, rows], self.measured[:, rows])


def oracle_weights(predictions: Mapping[str, np.ndarray], measured: np.ndarray, rows: np.ndarray,
                   steps: int = 300) -> dict[str, float]:
    """Group weights fitted to the retrained models themselves (labels!): maximise the mean Pearson
    correlation of ``Σ_g w_g ŷ_g`` with the measurements on query ``rows`` (a differentiable stand-in
    for LDS), over shares ``softmax(θ)`` of rms-normalised groups. An upper-bound diagnostic of what
    any group weighting can do, not an attribution method."""
    groups = list(predictions)
    stacked = torch.tensor(np.stack([predictions[g][:, rows] for g in groups]))  # [G, M, Q]
    target = torch.tensor(measured[:, rows])
    target = target - target.mean(0)
    rms = stacked.pow(2).mean((1, 2)).sqrt().clamp_min(1e-300)
    theta = torch.zeros(len(groups), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.05)
    for _ in range(steps):
        combined = torch.einsum("g,gmq->mq", torch.softmax(theta, 0) / rms, stacked)
        combined = combined - combined.mean(0)
        corr = (combined * target).sum(0) / (combined.norm(dim=0) * target.norm(dim=0)).clamp_min(1e-300)
        optimizer.zero_grad()
        (-corr.mean()).backward()
        optimizer.step()
    weights = (torch.softmax(theta, 0) / rms).detach().numpy()
    return dict(zip(groups, (weights / weights.mean()).tolist()))


def best_oracle(bench: Workbench, preconditioner: Preconditioner, damping, fit: np.ndarray) -> dict[str, float]:
    """The oracle of the quality suite: among uniform weights, each group alone and
    :func:`oracle_weights`, the weighting with the best LDS against the retrained models on the
    ``fit`` queries (to be scored on other queries)."""
    predictions = bench.predictions(preconditioner, damping)
    candidates = [{g: 1.0 for g in bench.groups}, oracle_weights(predictions, bench.measured, fit)]
    candidates += [{h: float(h == g) for h in bench.groups} for g in bench.groups]
    return max(candidates, key=lambda w: bench.lds(bench.combined(preconditioner, damping, w), fit).mean())


def halves(queries, measured: np.ndarray):
    """The two-halves protocol of the LDS benchmarks: ``(fit, dev, evaluation, lds)`` — the first half
    of ``queries`` as a dataset to learn weights on, the query rows of each half, and
    ``lds(predictions [M, Q], rows) -> mean LDS`` against ``measured [M, Q]`` on those rows."""
    half = len(queries) // 2
    fit = torch.utils.data.Subset(queries, list(range(half)))

    def lds(predictions: np.ndarray, rows: np.ndarray) -> float:
        return float(lds_per_query(predictions[:, rows], measured[:, rows]).mean())

    return fit, np.arange(half), np.arange(half, len(queries)), lds


def best_single(predictions: Mapping[str, np.ndarray], lds, dev: np.ndarray,
                evaluation: np.ndarray) -> tuple[str, dict[str, tuple[float, float]]]:
    """The group whose predictions alone score best on ``dev``, and every group's ``(dev, evaluation)`` LDS."""
    singles = {g: (lds(p, dev), lds(p, evaluation)) for g, p in predictions.items()}
    return max(singles, key=lambda g: singles[g][0]), singles


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over queries of the paired differences ``a − b`` (per-query arrays)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0


def mean_std(values: Sequence[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"
