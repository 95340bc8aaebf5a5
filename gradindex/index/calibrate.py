"""Self-calibrated search knobs: the cheapest setting that reaches a target recall@k.

In: a built partition (:class:`~gradindex.index.GradIndex`) and its store.
Out: :class:`Calibration` — the :class:`~gradindex.config.SearchConfig` (``nprobe`` and
``rerank`` for ivf / ivfpq, ``ef_search`` for hnsw) that ``build-index --target-recall R``
records as the partition's default, with the recall it measured.

During a build (:class:`CalibrationPlan`) the stored rows come from the training sample and the
exact top-k of the calibration queries is kept up to date while the parts are filled, so
calibrating reads the store no further; afterwards (``build-index --update``, ``eval recall``)
:func:`calibrate` reads what it needs itself.

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
(ivfpq), or ``ef_search`` (hnsw). Recall is taken as monotone in each knob: a binary search
over ``nprobe`` / ``ef_search``; for ivfpq one search with the deepest re-rank gives the recall
of every shallower one (a search with ``rerank = r`` re-scores exactly the first ``r`` of the
deepest one's candidates in PQ order).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from gradindex.config import IndexConfig, IndexKind, SearchConfig
from gradindex.index.topk import TopK, canonical_order

logger = logging.getLogger(__name__)

FAMILIES = ("task", "rows", "negated", "blend", "rescaled", "noisy")
PER_FAMILY = 128  # stored-row queries per family
TASK_QUERIES = 128
MARGIN = 0.2  # share of 1 − R added to the target on the fitting half
RERANK_COST = 16.0  # one exact float16 re-score ≈ 16 PQ code scans (768 multiply-adds vs 96 look-ups)
NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
RERANK_PER_K = (5, 10, 20, 40, 80, 160)
EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
SEARCH_BATCH = 256  # queries per search call while sweeping
EXACT_BATCH = 256  # queries per product in the exact top-k


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
    adaptive: dict[str, float] = field(default_factory=dict)  # held-out recall_distribution of the adaptive default

    def to_dict(self) -> dict[str, Any]:
        return {"search": self.search.to_dict(), "target": self.target, "k": self.k, "recall": self.recall,
                "worst": self.worst, "families": dict(self.families), "queries": self.queries,
                "reached": self.reached, "seconds": round(self.seconds, 1), "adaptive": dict(self.adaptive)}


# -- queries ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuerySide:
    """What turns stored rows and task queries into a partition's query vectors ``u``:
    its config (concept, preconditioner, damping), stored-side weights and balancing transform."""

    config: IndexConfig
    weights: Any  # GroupWeights
    transform: Any = None  # QueryTransform | None

    @classmethod
    def of(cls, index) -> "QuerySide":
        return cls(index.config, index.weights, index.parts[0].transform if index.parts else None)

    def to_search(self, u: np.ndarray) -> np.ndarray:
        """Query vectors in the searched (balanced) space."""
        return self.transform.query(u) if self.transform is not None else u

    def from_search(self, q: np.ndarray) -> np.ndarray:
        return self.transform.stored(q) if self.transform is not None else q


def sample_scaled_rows(store, weights, count: int, seed: int = 0) -> np.ndarray:
    """``√w ⊙ φ(x)`` ``[count, D]`` of a seeded sample of stored rows (one pass over the store)."""
    from gradindex.weights.group_weights import scaled_vectors

    rows = np.sort(np.random.default_rng([seed, 7211]).choice(store.num_samples, size=min(store.num_samples, count),
                                                              replace=False))
    picked, offset = [], 0
    for ids, feats, _ in store.iter_shards(store.groups):
        lo, hi = np.searchsorted(rows, [offset, offset + len(ids)])
        block = {g: np.asarray(feats[g][rows[lo:hi] - offset], np.float32) for g in store.groups}
        picked.append(scaled_vectors(block, weights, store.groups))
        offset += len(ids)
    return np.concatenate(picked)


def row_queries(store, side: QuerySide, scaled_rows: np.ndarray, count: int = PER_FAMILY,
                seed: int = 0) -> dict[str, np.ndarray]:
    """The stored-row families (see the module docstring) as query vectors ``{family: [count, D]}``,
    from ``scaled_rows [m, D]`` = ``√w ⊙ φ(x)`` of stored rows (the query side of a row is
    ``u = −√w ⊙ H⁻¹φ(x)``; the preconditioner is per group, so it applies to ``√w ⊙ φ`` alike)."""
    import torch

    from gradindex.config import Preconditioner
    from gradindex.features.precondition import QueryPreconditioner

    groups = store.groups
    dims = [store.group_dims[g] for g in groups]
    edges = np.concatenate([[0], np.cumsum(dims)]).astype(int)
    config = side.config
    grams = store.read_gram() if config.preconditioner is Preconditioner.GRAM else None
    precondition = QueryPreconditioner(config.preconditioner, grams, config.damping, groups)
    blocks = {g: torch.from_numpy(np.ascontiguousarray(scaled_rows[:, edges[i]:edges[i + 1]], np.float32))
              for i, g in enumerate(groups)}
    psi = precondition(blocks)
    u = -np.concatenate([psi[g].numpy() for g in groups], axis=1).astype(np.float32)
    rng = np.random.default_rng([seed, 7212])
    order = rng.permutation(len(u))
    first = u[order[:count]]
    second = u[order[count:2 * count]] if len(u) >= 2 * count else first[::-1]
    unit = lambda x: x / np.maximum(np.linalg.norm(side.to_search(x), axis=1, keepdims=True), 1e-30)  # noqa: E731
    scales = np.exp(rng.uniform(-2, 2, (len(first), len(groups)))).astype(np.float32)
    noise = rng.normal(size=(len(first), int(edges[-1]))).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return {
        "rows": first,
        "negated": -first,
        "blend": unit(first) + unit(second),
        "rescaled": first * np.repeat(scales, dims, axis=1),
        "noisy": side.from_search(side.to_search(unit(first)) + noise),
    }


def task_query_vectors(store, side: QuerySide, count: int = TASK_QUERIES, device: str = "cpu") -> np.ndarray | None:
    """Up to ``count`` of the task's own queries as query vectors (the task's ``all`` measurement
    for the shared index), or ``None`` when the task may not or cannot run or has no queries."""
    import torch

    from gradindex.index.shared import SHARED
    from gradindex.features.query import QueryFeaturizer
    from gradindex.weights.group_weights import scaled_vectors

    config = side.config
    concept = "all" if config.concept == SHARED else config.concept
    featurizer = None
    try:
        featurizer = QueryFeaturizer.open(store, concept, config.preconditioner, config.damping, device=device)
        dataset = featurizer.task.query_dataset()
        if dataset is None or len(dataset) == 0:
            return None
        feats = featurizer.group_features(torch.utils.data.Subset(dataset, range(min(count, len(dataset)))))
    except Exception as err:  # noqa: BLE001 - any task failure (consent, model, data) only drops this family
        logger.info("calibration without the task's queries (%s)", (str(err).splitlines() or [repr(err)])[0])
        return None
    finally:
        if featurizer is not None:
            featurizer.close()
    return scaled_vectors(feats, side.weights, featurizer.groups)


def calibration_queries(store, side: QuerySide, scaled_rows: np.ndarray | None = None,
                        per_family: int = PER_FAMILY, task_queries: int = TASK_QUERIES, seed: int = 0,
                        device: str = "cpu") -> CalibrationQueries:
    """Every family's queries (``task`` only when the task's queries can be computed); stored rows
    from ``scaled_rows`` when given, else sampled from the store."""
    families: dict[str, np.ndarray] = {}
    task = task_query_vectors(store, side, task_queries, device) if task_queries else None
    if task is not None and len(task):
        families["task"] = task
    if scaled_rows is None:
        scaled_rows = sample_scaled_rows(store, side.weights, 2 * per_family, seed)
    families.update(row_queries(store, side, scaled_rows, per_family, seed))
    names = tuple(families)
    vectors = np.concatenate([families[n] for n in names]).astype(np.float32)
    family = np.concatenate([np.full(len(families[n]), i) for i, n in enumerate(names)])
    return CalibrationQueries(np.ascontiguousarray(vectors), family, names)


# -- exact neighbours -----------------------------------------------------------------------------
class ExactNeighbours:
    """The running exact top-``k`` of fixed query vectors over stored vectors streamed in.

    ``queries [m, D]`` are in the searched space (balanced when the partition is); ``observe(ids,
    vectors)`` takes stored vectors in the same space (the build's add batches)."""

    def __init__(self, queries: np.ndarray, k: int):
        import torch

        self.queries = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
        self.k = k
        self.scores = torch.full((len(queries), 0), -torch.inf)
        self.ids = torch.zeros((len(queries), 0), dtype=torch.int64)

    def observe(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        import torch

        block = torch.from_numpy(np.ascontiguousarray(vectors, np.float32))
        block_ids = torch.from_numpy(np.array(ids, np.int64))
        scores, out_ids = [], []
        for start in range(0, len(self.queries), EXACT_BATCH):
            s = torch.cat([self.scores[start:start + EXACT_BATCH], self.queries[start:start + EXACT_BATCH] @ block.T], 1)
            i = torch.cat([self.ids[start:start + EXACT_BATCH], block_ids.expand(len(s), -1)], 1)
            top = torch.topk(s, min(self.k, s.shape[1]), dim=1)
            scores.append(top.values)
            out_ids.append(torch.gather(i, 1, top.indices))
        self.scores, self.ids = torch.cat(scores), torch.cat(out_ids)

    def result(self) -> TopK:
        return TopK(self.scores.numpy(), self.ids.numpy())


def exact_neighbours(store, index, vectors: np.ndarray, k: int) -> TopK:
    """Exact top-``k`` of ``vectors`` over the partition's stored vectors (streamed from the store)."""
    from gradindex.index.topk import exact_topk
    from gradindex.weights.group_weights import stored_vector_blocks

    return exact_topk(vectors, stored_vector_blocks(store, index.weights), k)


@dataclass
class CalibrationPlan:
    """Calibration prepared during a build: queries from the training sample (and the task),
    their exact top-k filled by :meth:`observe` from the build's add batches."""

    queries: CalibrationQueries
    exact: ExactNeighbours

    @classmethod
    def prepare(cls, store, config: IndexConfig, weights, transform, sample: np.ndarray, k: int = 10,
                seed: int = 0, device: str = "cpu") -> "CalibrationPlan":
        """``sample [m, D]``: the training sample as stored (``√w ⊙ φ``, balanced by ``transform``)."""
        side = QuerySide(config, weights, transform)
        rows = np.random.default_rng([seed, 7213]).permutation(len(sample))[:2 * PER_FAMILY]
        scaled = side.to_search(sample[rows]) if transform is not None else sample[rows]  # H^½ undoes H^-½
        queries = calibration_queries(store, side, scaled, seed=seed, device=device)
        return cls(queries, ExactNeighbours(side.to_search(queries.vectors), k))

    def observe(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.exact.observe(ids, vectors)


# -- recall ---------------------------------------------------------------------------------------
def search_batched(index, search: SearchConfig, vectors: np.ndarray, k: int) -> TopK:
    """``index`` searched at ``search`` in batches of :data:`SEARCH_BATCH` queries (evidence kept)."""
    from gradindex.index.topk import concat_topk

    searcher = index.with_search(search)
    return concat_topk([searcher.search(vectors[i:i + SEARCH_BATCH], k) for i in range(0, len(vectors), SEARCH_BATCH)])


def measure(index, search: SearchConfig, vectors: np.ndarray, exact: TopK, k: int) -> np.ndarray:
    """Per-query recall@k of ``index`` at ``search`` with the adaptive continuation off: the knobs'
    own recall (what calibration fits; the adaptive default only adds to it)."""
    from gradindex.index.topk import per_query_recall

    return per_query_recall(search_batched(index, replace(search, adaptive=False, certified=False), vectors, k), exact)


def rerank_recalls(index, search: SearchConfig, vectors: np.ndarray, exact: TopK, k: int,
                   reranks: Sequence[int]) -> dict[int, np.ndarray]:
    """ivfpq: per-query recall@k at ``search``'s nprobe for every re-rank depth in ``reranks``, from
    one search at the deepest (each part's candidates in PQ order with exact scores)."""
    from gradindex.index.topk import per_query_recall

    deepest = max(reranks)
    ranked = []
    for part in index.parts:
        searcher = part.with_search(replace(search, rerank=deepest))
        chunks = [searcher.ranked_candidates(vectors[i:i + SEARCH_BATCH], k)
                  for i in range(0, len(vectors), SEARCH_BATCH)]
        ranked.append((np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])))
    out = {}
    for r in reranks:
        scores = np.concatenate([s[:, :max(k, r)] for s, _ in ranked], axis=1)
        ids = np.concatenate([i[:, :max(k, r)] for _, i in ranked], axis=1)
        out[r] = per_query_recall(canonical_order(scores, ids, k), exact)
    return out


# -- choosing knobs -----------------------------------------------------------------------------
class _Sweep:
    """Recall of the kind's knob settings on some queries, measured on demand and cached."""

    def __init__(self, index, queries: CalibrationQueries, exact: TopK, k: int, fixed: SearchConfig | None):
        self.index, self.queries, self.exact, self.k = index, queries, exact, k
        self.fixed = fixed or SearchConfig()
        self.kind = IndexKind(index.kind)
        if self.kind is IndexKind.HNSW:
            self.probes = [self.fixed.ef_search] if self.fixed.ef_search else list(EF_GRID)
            self.reranks = [0]
        else:
            nlist = int(index.entry["layout"]["nlist"])
            self.probes = [self.fixed.nprobe] if self.fixed.nprobe else sorted({min(p, nlist) for p in NPROBE_GRID})
            self.reranks = [0]
            if self.kind is IndexKind.IVFPQ:
                self.reranks = [self.fixed.rerank] if self.fixed.rerank else [r * k for r in RERANK_PER_K]
            self.per_probe = index.ntotal / nlist
        self.cache: dict[int, dict[int, np.ndarray]] = {}

    def setting(self, probe: int, rerank: int) -> SearchConfig:
        if self.kind is IndexKind.HNSW:
            return replace(self.fixed, ef_search=probe)
        return replace(self.fixed, nprobe=probe, rerank=rerank)

    def cost(self, probe: int, rerank: int) -> float:
        return float(probe) if self.kind is IndexKind.HNSW else probe * self.per_probe + RERANK_COST * rerank

    def recalls(self, probe: int) -> dict[int, np.ndarray]:
        """``{rerank: per-query recall}`` at one probe value (hnsw, ivf: rerank 0)."""
        if probe not in self.cache:
            setting = self.setting(probe, max(self.reranks))
            if self.kind is IndexKind.IVFPQ and self.index.parts and self.index.parts[0].vectors is not None:
                self.cache[probe] = rerank_recalls(self.index, setting, self.queries.vectors, self.exact, self.k,
                                                   self.reranks)
            else:
                recall = measure(self.index, setting, self.queries.vectors, self.exact, self.k)
                self.cache[probe] = {r: recall for r in self.reranks}
        return self.cache[probe]

    def shallowest(self, probe: int, target: float) -> int | None:
        """The smallest re-rank depth whose every family reaches ``target`` at ``probe``, if any."""
        for r in self.reranks:
            if min(self.queries.family_means(self.recalls(probe)[r]).values()) >= target:
                return r
        return None


def cheapest_reaching(index, queries: CalibrationQueries, exact: TopK, target: float, k: int,
                      fixed: SearchConfig | None = None) -> tuple[SearchConfig, np.ndarray, bool]:
    """The cheapest setting whose every family reaches ``target`` on ``queries``: ``(setting,
    per-query recall there, reached)``; the most expensive setting tried when none reaches.

    A binary search finds the smallest probe value (``nprobe`` / ``ef_search``) reaching at the
    deepest re-rank; the next two probe values, which may need a shallower re-rank, compete on cost.
    """
    sweep = _Sweep(index, queries, exact, k, fixed)
    probes = sweep.probes
    if sweep.shallowest(probes[-1], target) is None:
        return sweep.setting(probes[-1], sweep.reranks[-1]), sweep.recalls(probes[-1])[sweep.reranks[-1]], False
    lo, hi = 0, len(probes) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if sweep.shallowest(probes[mid], target) is not None:
            hi = mid
        else:
            lo = mid + 1
    options = []
    for probe in probes[lo:lo + 3]:
        rerank = sweep.shallowest(probe, target)
        if rerank is not None:
            options.append((sweep.cost(probe, rerank), probe, rerank))
    _, probe, rerank = min(options)
    return sweep.setting(probe, rerank), sweep.recalls(probe)[rerank], True


def calibrate(store, index, target: float, k: int = 10, queries: CalibrationQueries | None = None,
              exact: TopK | None = None, fixed: SearchConfig | None = None, seed: int = 0,
              device: str = "cpu") -> Calibration:
    """Choose ``index``'s default knobs for recall@k ≥ ``target`` (see the module docstring);
    ``queries`` and their ``exact`` top-k are computed here unless given (a build's plan)."""
    start = time.perf_counter()
    if queries is None:
        queries = calibration_queries(store, QuerySide.of(index), seed=seed, device=device)
    if exact is None:
        exact = exact_neighbours(store, index, queries.vectors, k)
    first = queries.first_half()
    fit, held = queries.subset(first), queries.subset(~first)
    exact_held = TopK(exact.scores[~first], exact.sample_ids[~first])
    goal = min(1.0, target + MARGIN * (1 - target))
    setting, _, reached = cheapest_reaching(index, fit, TopK(exact.scores[first], exact.sample_ids[first]), goal, k,
                                            fixed)
    sweep = _Sweep(index, held, exact_held, k, fixed)
    probe = setting.ef_search if sweep.kind is IndexKind.HNSW else setting.nprobe
    position = sweep.probes.index(probe)
    held_recall = measure(index, setting, held.vectors, exact_held, k)
    while min(held.family_means(held_recall).values()) < target and position + 1 < len(sweep.probes):
        position += 1  # raise the probe value, keeping the re-rank depth
        setting = sweep.setting(sweep.probes[position], setting.rerank)
        held_recall = measure(index, setting, held.vectors, exact_held, k)
    families = held.family_means(held_recall)
    worst = min(families.values())
    adaptive = {}
    if sweep.kind is not IndexKind.HNSW:  # what the default (adaptive) search gives on the held-out queries
        from gradindex.index.topk import recall_distribution

        adaptive = recall_distribution(search_batched(index, replace(setting, adaptive=True, certified=False),
                                                      held.vectors, k), exact_held)
    return Calibration(setting, float(target), int(k), float(held_recall.mean()), float(worst), families,
                       len(queries.vectors), bool(reached and worst >= target), time.perf_counter() - start, adaptive)


def describe(calibration: Calibration | dict[str, Any], kind: str) -> str:
    """One line: the knobs and the recall they measured."""
    data = calibration.to_dict() if isinstance(calibration, Calibration) else calibration
    knobs = knob_text(data["search"], kind)
    families = ", ".join(f"{n} {v:.3f}" for n, v in data.get("families", {}).items())
    status = "" if data.get("reached", True) else f" (target {data['target']} NOT reached)"
    adaptive = f"; adaptive default: {distribution_text(data['adaptive'])}" if data.get("adaptive") else ""
    return (f"{knobs}: recall@{data['k']} {data['recall']:.3f} on {data['queries'] // 2} held-out queries, "
            f"worst family {data['worst']:.3f} (target {data['target']}){status}; {families}{adaptive}")


def distribution_text(summary: dict[str, Any]) -> str:
    """``recall mean 0.991, p5 0.9, worst 0.6, certified 87%`` from :func:`recall_distribution`'s dict."""
    return (f"recall mean {summary['mean']:.3f}, p5 {summary['p5']:.3g}, worst {summary['worst']:.3g}, "
            f"certified {100 * summary['certified']:.0f}%")


def knob_text(search: dict[str, Any], kind: str) -> str:
    names = {"hnsw": ("ef_search",), "ivf": ("nprobe",), "ivfpq": ("nprobe", "rerank")}.get(kind, ())
    return ", ".join(f"{n} {search.get(n, 0)}" for n in names) or "exact"
