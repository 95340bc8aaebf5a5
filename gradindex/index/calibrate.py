"""Self-calibrated search knobs: the cheapest setting that reaches a target recall@k.

In: a built partition (:class:`~gradindex.index.GradIndex`) and its store.
Out: :class:`Calibration` — the :class:`~gradindex.config.SearchConfig` (``nprobe`` and
``rerank`` for ivf / ivfpq, ``ef_search`` for hnsw) that ``build-index --target-recall R``
records as the partition's default, with the recall it measured.

Calibration queries are query vectors ``u [m, D]`` in the partition's stored space, in
*families* (:func:`calibration_queries`):

* ``task``: the task's own held-out queries through the model (when the task loads);
* ``rows``: a seeded sample of stored rows through the query path, ``u = −√w ⊙ H⁻¹φ(x)``;
* ``negated``, ``blend`` (two rows' unit queries summed), ``rescaled`` (each group's block
  times ``e^U(−2, 2)``: other group weights), ``noisy`` (a unit query plus an isotropic unit
  vector in the searched space): stored rows made *unlike* the stored data, as queries from
  another distribution are. On 10⁶ enlarged-digits vectors ``noisy`` and ``rescaled`` were as
  hard as the hardest real query set measured (uniform-noise images). A purely isotropic
  query was dropped: no gradient looks like it, and PQ re-ranking cannot separate its near-equal
  top scores (recall@10 0.92 with every cell scanned and 1,600 re-ranked).

Each family is split in two halves (even / odd positions). A setting *reaches* ``R`` when the
mean recall@k of every family reaches it — the worst family, not the mean over all, decides,
so one easy family cannot hide a hard one. The cheapest setting reaching ``R + margin`` on the
first half (``margin`` = a fifth of ``1 − R``) is then checked on the second, held-out half and
raised until that half reaches ``R`` too; the held-out recall is what is recorded. Cost model:
vectors scanned (``nprobe · N / nlist``) plus :data:`RERANK_COST` per re-ranked candidate
(ivfpq), or ``ef_search`` (hnsw).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from gradindex.config import IndexKind, SearchConfig

logger = logging.getLogger(__name__)

FAMILIES = ("task", "rows", "negated", "blend", "rescaled", "noisy")
PER_FAMILY = 128  # stored-row queries per family
TASK_QUERIES = 256
MARGIN = 0.2  # share of 1 − R added to the target on the fitting half
RERANK_COST = 16.0  # one exact float16 re-score ≈ 16 PQ code scans (768 multiply-adds vs 96 look-ups)
NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
RERANK_PER_K = (5, 10, 20, 40, 80, 160)
EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
SEARCH_BATCH = 64  # queries per search call while sweeping (bounds the re-rank buffer)


@dataclass(frozen=True)
class CalibrationQueries:
    """Query vectors ``[m, D]`` and the family of each (``family[i]`` indexes ``names``)."""

    vectors: np.ndarray
    family: np.ndarray
    names: tuple[str, ...]

    def first_half(self) -> np.ndarray:
        """``[m]`` bool: the even positions within each family (the fitting half)."""
        rank = np.zeros(len(self.family), np.int64)
        for f in range(len(self.names)):
            members = np.flatnonzero(self.family == f)
            rank[members] = np.arange(len(members))
        return rank % 2 == 0

    def subset(self, mask: np.ndarray) -> "CalibrationQueries":
        return CalibrationQueries(self.vectors[mask], self.family[mask], self.names)

    def halves(self) -> tuple["CalibrationQueries", "CalibrationQueries"]:
        """(fitting, held-out): alternate positions within each family."""
        first = self.first_half()
        return self.subset(first), self.subset(~first)

    def family_means(self, recall: np.ndarray) -> dict[str, float]:
        return {name: float(recall[self.family == f].mean())
                for f, name in enumerate(self.names) if np.any(self.family == f)}


@dataclass(frozen=True)
class Calibration:
    """What a calibration chose and measured (``to_dict()`` goes into the manifest entry)."""

    search: SearchConfig
    target: float
    k: int
    recall: float  # held-out mean recall@k at ``search``
    worst: float  # held-out recall of the worst family
    families: dict[str, float] = field(default_factory=dict)  # held-out recall per family
    queries: int = 0
    reached: bool = True
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"search": self.search.to_dict(), "target": self.target, "k": self.k, "recall": self.recall,
                "worst": self.worst, "families": dict(self.families), "queries": self.queries,
                "reached": self.reached, "seconds": round(self.seconds, 1)}


# -- queries ------------------------------------------------------------------------------------
def stored_row_queries(store, index, count: int = PER_FAMILY, seed: int = 0,
                       query_weights=None) -> dict[str, np.ndarray]:
    """The stored-row families (see the module docstring) as query vectors ``{family: [count, D]}``.

    ``query_weights``: the per-group scales of the query side (default: the partition's ``√w``).
    """
    import torch

    from gradindex.config import Preconditioner
    from gradindex.precondition import QueryPreconditioner
    from gradindex.weights import scaled_vectors

    groups = store.groups
    n = store.num_samples
    rng = np.random.default_rng([seed, 7211])
    rows = np.sort(rng.choice(n, size=min(n, 2 * count), replace=False))
    picked, offset = {g: [] for g in groups}, 0
    for ids, feats, _ in store.iter_shards(groups):
        lo, hi = np.searchsorted(rows, [offset, offset + len(ids)])
        for g in groups:
            picked[g].append(np.asarray(feats[g][rows[lo:hi] - offset], np.float32))
        offset += len(ids)
    feats = {g: np.concatenate(picked[g]) for g in groups}
    config = index.config
    grams = store.read_gram() if config.preconditioner is Preconditioner.GRAM else None
    precondition = QueryPreconditioner(config.preconditioner, grams, config.damping, groups)
    psi = precondition({g: torch.from_numpy(feats[g]) for g in groups})
    weights = query_weights if query_weights is not None else index.weights
    u = scaled_vectors({g: (-psi[g]).numpy() for g in groups}, weights, groups)
    transform = index.parts[0].transform if index.parts else None
    to_search = (lambda x: transform.query(x)) if transform is not None else (lambda x: x)
    from_search = (lambda x: transform.stored(x)) if transform is not None else (lambda x: x)
    order = rng.permutation(len(u))
    first, second = u[order[:count]], u[order[count:2 * count]] if len(u) >= 2 * count else u[order[:count]][::-1]
    unit = lambda x: x / np.maximum(np.linalg.norm(to_search(x), axis=1, keepdims=True), 1e-30)  # noqa: E731
    dims = [store.group_dims[g] for g in groups]
    edges = np.concatenate([[0], np.cumsum(dims)])
    scales = np.exp(rng.uniform(-2, 2, (len(first), len(groups)))).astype(np.float32)
    rescaled = first * np.repeat(scales, dims, axis=1)
    noise = rng.normal(size=(len(first), int(edges[-1]))).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return {
        "rows": first,
        "negated": -first,
        "blend": unit(first) + unit(second),
        "rescaled": rescaled,
        "noisy": from_search(to_search(unit(first)) + noise),
    }


def task_query_vectors(store, index, count: int = TASK_QUERIES, device: str = "cpu",
                       concept: str | None = None, query_weights=None) -> np.ndarray | None:
    """Up to ``count`` of the task's own queries as query vectors, or ``None`` when the task
    (or its model) cannot be loaded or has no queries."""
    import torch

    from gradindex.query_features import QueryFeaturizer
    from gradindex.weights import scaled_vectors

    from gradindex.index.shared import SHARED

    config = index.config
    concept = concept or ("all" if config.concept == SHARED else config.concept)
    try:
        featurizer = QueryFeaturizer.open(store, concept, config.preconditioner, config.damping, device=device)
    except Exception as err:  # noqa: BLE001 - any task failure only drops this family
        logger.info("calibration without the task's queries (%s)", str(err).splitlines()[0] if str(err) else err)
        return None
    try:
        dataset = featurizer.task.query_dataset()
        if dataset is None or len(dataset) == 0:
            return None
        dataset = torch.utils.data.Subset(dataset, range(min(count, len(dataset))))
        feats = featurizer.group_features(dataset)
    except Exception as err:  # noqa: BLE001
        logger.info("calibration without the task's queries (%s)", str(err).splitlines()[0] if str(err) else err)
        return None
    finally:
        featurizer.close()
    weights = query_weights if query_weights is not None else index.weights
    return scaled_vectors(feats, weights, featurizer.groups)


def calibration_queries(store, index, per_family: int = PER_FAMILY, task_queries: int = TASK_QUERIES,
                        seed: int = 0, device: str = "cpu") -> CalibrationQueries:
    """Every family's queries (``task`` only when the task's queries can be computed)."""
    families: dict[str, np.ndarray] = {}
    task = task_query_vectors(store, index, task_queries, device) if task_queries else None
    if task is not None and len(task):
        families["task"] = task
    families.update(stored_row_queries(store, index, per_family, seed))
    return _stack(families)


def _stack(families: dict[str, np.ndarray]) -> CalibrationQueries:
    names = tuple(families)
    vectors = np.concatenate([families[n] for n in names]).astype(np.float32)
    family = np.concatenate([np.full(len(families[n]), i) for i, n in enumerate(names)])
    return CalibrationQueries(np.ascontiguousarray(vectors), family, names)


# -- recall ---------------------------------------------------------------------------------------
def exact_neighbours(store, index, vectors: np.ndarray, k: int):
    """Exact top-``k`` of ``vectors`` over the partition's stored vectors (streamed from the store)."""
    from gradindex.evaluate import exact_topk, stored_vector_blocks

    return exact_topk(vectors, stored_vector_blocks(store, index.weights), k)


def measure(index, search: SearchConfig, vectors: np.ndarray, exact, k: int) -> np.ndarray:
    """Per-query recall@k of ``index`` at ``search`` (queries searched in batches)."""
    from gradindex.evaluate import per_query_recall
    from gradindex.topk import TopK

    searcher = index.with_search(search)
    parts = [searcher.search(vectors[i:i + SEARCH_BATCH], k) for i in range(0, len(vectors), SEARCH_BATCH)]
    approx = TopK(np.concatenate([p.scores for p in parts]), np.concatenate([p.sample_ids for p in parts]))
    return per_query_recall(approx, exact)


# -- choosing knobs -----------------------------------------------------------------------------
def candidates(index, k: int, fixed: SearchConfig | None = None) -> list[tuple[float, SearchConfig]]:
    """``(cost, setting)`` of the kind's knob grid, cheapest first (``fixed``'s non-zero knobs kept)."""
    fixed = fixed or SearchConfig()
    kind = IndexKind(index.kind)
    out: list[tuple[float, SearchConfig]] = []
    if kind is IndexKind.HNSW:
        grid = [fixed.ef_search] if fixed.ef_search else list(EF_GRID)
        out = [(float(ef), replace(fixed, ef_search=ef)) for ef in grid]
    elif kind in (IndexKind.IVF, IndexKind.IVFPQ):
        nlist = int(index.entry["layout"]["nlist"])
        probes = [fixed.nprobe] if fixed.nprobe else sorted({min(p, nlist) for p in NPROBE_GRID})
        reranks = [0]
        if kind is IndexKind.IVFPQ:
            reranks = [fixed.rerank] if fixed.rerank else [r * k for r in RERANK_PER_K]
        per_probe = index.ntotal / nlist
        out = [(p * per_probe + RERANK_COST * r, replace(fixed, nprobe=p, rerank=r)) for p in probes for r in reranks]
    out.sort(key=lambda item: item[0])
    return out


def cheapest_reaching(index, queries: CalibrationQueries, exact, target: float, k: int,
                      fixed: SearchConfig | None = None,
                      ) -> tuple[SearchConfig, np.ndarray, bool, list[tuple[float, SearchConfig]]]:
    """The cheapest setting whose every family reaches ``target`` on ``queries``.

    Returns ``(setting, per-query recall there, reached, the grid)``; when none reaches, the most
    expensive setting of the grid. Recall is taken as monotone in each knob: for every value of
    the other knob, a binary search over ``nprobe`` / ``ef_search``.
    """
    grid = candidates(index, k, fixed)
    cache: dict[tuple, np.ndarray] = {}

    def recall(setting: SearchConfig) -> np.ndarray:
        key = tuple(setting.to_dict().items())
        if key not in cache:
            cache[key] = measure(index, setting, queries.vectors, exact, k)
        return cache[key]

    def reaches(setting: SearchConfig) -> bool:
        return min(queries.family_means(recall(setting)).values()) >= target

    lines: dict[int, list[tuple[float, SearchConfig]]] = {}
    for cost, setting in grid:
        lines.setdefault(setting.rerank, []).append((cost, setting))
    best: tuple[float, SearchConfig] | None = None
    for rerank in sorted(lines):
        line = sorted(lines[rerank], key=lambda item: item[0])
        if best is not None and line[0][0] >= best[0]:
            continue
        if not reaches(line[-1][1]):
            continue
        lo, hi = 0, len(line) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if reaches(line[mid][1]):
                hi = mid
            else:
                lo = mid + 1
        if best is None or line[lo][0] < best[0]:
            best = line[lo]
    if best is None:
        top = grid[-1][1]
        return top, recall(top), False, grid
    return best[1], recall(best[1]), True, grid


def calibrate(store, index, target: float, k: int = 10, queries: CalibrationQueries | None = None,
              fixed: SearchConfig | None = None, seed: int = 0, device: str = "cpu") -> Calibration:
    """Choose ``index``'s default knobs for recall@k ≥ ``target`` (see the module docstring)."""
    start = time.perf_counter()
    if queries is None:
        queries = calibration_queries(store, index, seed=seed, device=device)
    exact = exact_neighbours(store, index, queries.vectors, k)
    first = queries.first_half()
    fit, held = queries.subset(first), queries.subset(~first)
    exact_fit, exact_held = _take(exact, first), _take(exact, ~first)
    goal = min(1.0, target + MARGIN * (1 - target))
    setting, _, reached, grid = cheapest_reaching(index, fit, exact_fit, goal, k, fixed)
    held_recall = measure(index, setting, held.vectors, exact_held, k)
    position = next(i for i, (_, s) in enumerate(grid) if s == setting)
    while min(held.family_means(held_recall).values()) < target and position + 1 < len(grid):
        position = _next_dominating(grid, position)
        setting = grid[position][1]
        held_recall = measure(index, setting, held.vectors, exact_held, k)
    families = held.family_means(held_recall)
    worst = min(families.values())
    return Calibration(setting, float(target), int(k), float(held_recall.mean()), float(worst), families,
                       len(queries.vectors), bool(reached and worst >= target), time.perf_counter() - start)


def _next_dominating(grid: Sequence[tuple[float, SearchConfig]], position: int) -> int:
    """The next grid position whose knobs are all at least the current ones (last if none)."""
    current = grid[position][1]
    for i in range(position + 1, len(grid)):
        s = grid[i][1]
        if s.nprobe >= current.nprobe and s.rerank >= current.rerank and s.ef_search >= current.ef_search:
            return i
    return len(grid) - 1


def _take(top, mask: np.ndarray):
    from gradindex.topk import TopK

    return TopK(top.scores[mask], top.sample_ids[mask])


def describe(calibration: Calibration | dict[str, Any], kind: str) -> str:
    """One line: the knobs and the recall they measured."""
    data = calibration.to_dict() if isinstance(calibration, Calibration) else calibration
    knobs = knob_text(data["search"], kind)
    families = ", ".join(f"{n} {v:.3f}" for n, v in data.get("families", {}).items())
    status = "" if data.get("reached", True) else f" (target {data['target']} NOT reached)"
    return (f"{knobs}: recall@{data['k']} {data['recall']:.3f} on {data['queries'] // 2} held-out queries, "
            f"worst family {data['worst']:.3f} (target {data['target']}){status}; {families}")


def knob_text(search: dict[str, Any], kind: str) -> str:
    names = {"hnsw": ("ef_search",), "ivf": ("nprobe",), "ivfpq": ("nprobe", "rerank")}.get(kind, ())
    return ", ".join(f"{n} {search.get(n, 0)}" for n in names) or "exact"
