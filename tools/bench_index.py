"""Index kinds at scale: build + calibration time, bytes per vector, latency, QPS and recall@10
vs exact search, on queries like the stored data and on queries unlike it; shared vs per-concept.

    flock /tmp/gradindex-bench.lock python tools/bench_index.py --store STORE [--kinds ivfpq,hnsw] [--shared]

The store is real featurized data: the digits MLP's projected gradients (3 groups × 256 = 768 dims,
float16) of a procedurally enlarged digits training set (tools/enlarged_digits.py). Build one with::

    python -m gradindex featurize tools/enlarged_digits.py:EnlargedDigits --task-option size=1000000 \\
        --out STORE --dtype float16 --shard-size 100000

Three query sets, Gram-preconditioned (``u(q) = −H⁻¹φ(q)``) as ``gradindex query`` computes them:

* ``task`` — the task's own queries: held-out digits under the same jitter as the stored ones
  (*like* the stored data);
* ``unlike`` — tools/unlike_digits.py's ``mixed`` set (seed 7): equal shares of noise-free,
  strongly warped (25–50°, scale 0.6–0.75 / 1.3–1.6), inverted, two-class blends, uniform noise,
  wrong-label and half-occluded held-out digits. None of them is in the stored distribution
  (jitter ±15°, scale 0.85–1.15, pixel noise σ 0.05, own label), so their gradients point where
  few stored gradients do. Latency and QPS are measured on this set.
* ``noisy`` — tools/unlike_digits.py's ``noisy`` set (seed 7): real held-out digits plus Gaussian
  pixel noise σ 0.25, no jitter — unlike every calibration family (task queries, stored rows,
  negated, blended, rescaled, noisy *rows*) and unlike ``unlike``'s sets. Its per-query recall
  distribution (mean, 5th percentile, worst, share certified) is what the adaptive default is
  judged on; batch-1 latency p50 / p95 / p99 is measured on ``unlike`` then ``noisy`` queries.

Rows per ivf / ivfpq kind: the calibrated knobs with the adaptive default (each query checks its own
evidence and scans on, up to ``max_probe``, where it is not certified), the same knobs with
``adaptive`` off, and certified search (``--exact-certified``); then the fixed sweeps (adaptive on).

Baseline, measured in the same run: brute force — the float32 matrix [N, D] in RAM, ``q @ Xᵀ``
(torch matmul) then top-k; it is also the exact reference for recall.

Per kind: ``build_index`` with ``target_recall`` (0.95 unless ``--target-recall``): build and
calibration seconds, the calibrated knobs and their held-out calibration recall, then the
partition searched at those knobs ("calibrated") and at a few fixed ones. Index bytes per vector
are the part files in RAM plus the calibration's cell statistics; the memory-mapped files (ivfpq's float16 re-rank copy, every
part's row → sample id map) are listed apart.

``--shared``: three concept weightings of the groups (uniform, early ×4 / late ×¼, the reverse):
one calibrated ivfpq partition per weighting against one shared calibrated ivfpq index of φ
queried with each weighting on the query side (``u = w ⊙ ψ``): recall on both query sets,
latency and memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradindex.config import IndexConfig, SearchConfig  # noqa: E402
from gradindex.index.topk import concat_topk, recall_at_k, recall_distribution  # noqa: E402
from gradindex.index import ShardedIndex, build_index, list_parts  # noqa: E402
from gradindex.index.calibrate import knob_text  # noqa: E402
from gradindex.index.shared import SHARED, query_weights  # noqa: E402
from gradindex.features.query import QueryFeaturizer, load_store_task  # noqa: E402
from gradindex.store.feature_store import FeatureStore  # noqa: E402
from gradindex.index.topk import TopK  # noqa: E402
from gradindex.weights.group_weights import GroupWeights, scaled_vectors  # noqa: E402
from unlike_digits import make_set  # noqa: E402

SWEEPS = {
    "flat": [],
    "ivf": [SearchConfig(nprobe=p) for p in (8, 16)],
    "ivfpq": [SearchConfig(nprobe=p, rerank=r) for p, r in ((8, 200), (16, 400))],
    "hnsw": [SearchConfig(ef_search=e) for e in (256, 1024, 4096)],
}
CONCEPT_WEIGHTS = {"uniform": (1.0, 1.0, 1.0), "early": (4.0, 1.0, 0.25), "late": (0.25, 1.0, 4.0)}


def load_matrix(store: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
    """Sample ids ``[N]`` and the unscaled stored features ``φ [N, D]`` float32."""
    weights = GroupWeights.uniform("all", store.groups)
    ids, blocks = [], []
    for shard_ids, feats, _ in store.iter_shards(store.groups):
        ids.append(shard_ids)
        blocks.append(scaled_vectors(feats, weights, store.groups))
    return np.concatenate(ids), np.concatenate(blocks)


class BruteForce:
    """``q @ Xᵀ`` + top-k over the float32 matrix (torch; chunks of queries bound the score buffer)."""

    def __init__(self, ids: np.ndarray, matrix: np.ndarray):
        self.ids = torch.from_numpy(ids)
        self.matrix = torch.from_numpy(matrix)

    def search(self, q: np.ndarray, k: int, chunk: int = 64) -> TopK:
        scores, ids = [], []
        for start in range(0, len(q), chunk):
            s = torch.from_numpy(np.ascontiguousarray(q[start:start + chunk])) @ self.matrix.T
            top = torch.topk(s, k, dim=1)
            scores.append(top.values.numpy())
            ids.append(self.ids[top.indices].numpy())
        return TopK(np.concatenate(scores), np.concatenate(ids))


def batched(search, q: np.ndarray, k: int, chunk: int = 250) -> TopK:
    return concat_topk([search(q[i:i + chunk], k) for i in range(0, len(q), chunk)])


def time_queries(search, q1: np.ndarray, qb: np.ndarray, k: int) -> tuple[float, float, float, float]:
    """(p50, p95, p99 ms) of batch-1 calls over ``q1``, QPS of ``qb`` searched in one call."""
    search(q1[:2], k)  # warm-up
    lat = []
    for i in range(len(q1)):
        t = time.perf_counter()
        search(q1[i:i + 1], k)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    search(qb, k)
    qps = len(qb) / (time.perf_counter() - t)
    p50, p95, p99 = (float(np.percentile(lat, p) * 1e3) for p in (50, 95, 99))
    return p50, p95, p99, qps


def query_features(store: FeatureStore, count: int) -> dict[str, dict[str, np.ndarray]]:
    """``{set: {group: −ψ_g(q) [count, k_g]}}`` for the ``task`` and ``unlike`` query sets."""
    task = load_store_task(store)
    model = task.load_model(store.manifest.get("checkpoint")).eval()
    featurizer = QueryFeaturizer(store, task, model, torch.device("cpu"))
    sets = {"task": torch.utils.data.Subset(task.query_dataset(), range(count))}
    for name, source in (("unlike", "mixed"), ("noisy", "noisy")):
        x, y = make_set(source, count, seed=7)
        sets[name] = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    out = {name: featurizer.group_features(data, batch_size=256) for name, data in sets.items()}
    featurizer.close()
    return out


def partition_bytes(store: FeatureStore, concept: str, entry: dict) -> tuple[float, float]:
    """(bytes held in RAM: FAISS part files + cell statistics, bytes memory-mapped from disk: the
    float16 re-rank copy and the row → sample id maps) of a partition."""
    parts = list_parts(store, concept)
    ram = sum(os.path.getsize(store.path / p.file) for p in parts)
    if entry.get("cells"):
        ram += os.path.getsize(store.path / entry["cells"]["file"])
    disk = sum(os.path.getsize(store.path / p.ids_file) for p in parts)
    disk += sum(os.path.getsize(store.path / p.vectors_file) for p in parts if p.vectors_file)
    return float(ram), float(disk)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--kinds", default="flat,ivf,ivfpq,hnsw")
    parser.add_argument("--queries", type=int, default=1000, help="Queries per set (recall, and the QPS batch).")
    parser.add_argument("--latency-queries", type=int, default=200, help="Batch-1 calls timed.")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--shared", action="store_true", help="Also compare a shared index with per-concept ones.")
    parser.add_argument("--json", default=None, help="Also write the rows here.")
    parser.add_argument("--reuse", action="store_true",
                        help="Measure the store's existing partition 'all' when it is of the kind asked (no rebuild).")
    parser.add_argument("--no-sweeps", action="store_true", help="Only the calibrated rows (and certified).")
    parser.add_argument("--no-certified", action="store_true", help="Skip the certified-search row.")
    args = parser.parse_args()

    store = FeatureStore.open(args.store, trust_task=True)  # the benchmark's own store: its task is our tool
    n, dim = store.num_samples, store.dim
    print(f"store {store.path}: N={n:,} D={dim} ({store.manifest['dtype']}), task {store.manifest['task']}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, faiss threads "
          f"{__import__('faiss').omp_get_max_threads()}, cpus {os.cpu_count()}", flush=True)
    psi = query_features(store, args.queries)
    uniform = GroupWeights.uniform("all", store.groups)
    queries = {name: scaled_vectors(feats, uniform, store.groups) for name, feats in psi.items()}
    half = args.latency_queries // 2  # batch-1 latency: unlike then noisy queries
    q1 = np.concatenate([queries["unlike"][:half], queries["noisy"][:args.latency_queries - half]])

    t = time.perf_counter()
    ids, matrix = load_matrix(store)
    print(f"loaded the float32 matrix [{n:,}, {dim}] in {time.perf_counter() - t:.1f}s", flush=True)
    norms = np.linalg.norm(matrix, axis=1)
    print("vector norm quantiles 50/90/99/99.9/100%: "
          + " / ".join(f"{v:.3g}" for v in np.quantile(norms, [0.5, 0.9, 0.99, 0.999, 1.0])))
    brute = BruteForce(ids, matrix)
    p50, p95, p99, qps = time_queries(brute.search, q1, queries["unlike"], args.k)
    bf_qps1 = 1e3 / p50
    exact = {name: batched(brute.search, q, args.k) for name, q in queries.items()}
    concept_queries, concept_exact = {}, {}
    if args.shared:  # exact top-k of τ_w = (w ⊙ ψ)·φ for each weighting, from the unscaled matrix
        for concept, values in CONCEPT_WEIGHTS.items():
            weights = GroupWeights(concept, dict(zip(store.groups, values)))
            for name, feats in psi.items():
                concept_queries[concept, name] = (scaled_vectors(feats, weights, store.groups),
                                                  scaled_vectors(feats, query_weights(weights), store.groups))
                concept_exact[concept, name] = (exact[name] if set(values) == {1.0} else
                                                batched(brute.search, concept_queries[concept, name][1], args.k))
    perfect = {"mean": 1.0, "p5": 1.0, "worst": 1.0, "below_0_8": 0.0, "certified": 1.0}
    rows = [{"kind": "brute force (torch matmul)", "knobs": "", "build_s": 0.0, "calibration_s": 0.0, "build_cpu_s": 0.0,
             "calibrated_recall": None, "bytes_per_vector": 4.0 * dim, "rerank_bytes": 0.0, "p50_ms": p50,
             "p95_ms": p95, "p99_ms": p99, "qps_1000": qps, "recall_task": 1.0, "recall_unlike": 1.0,
             "noisy": perfect, "unlike": perfect, "rows_reranked": float(n), "speedup_b1": 1.0, "p99_vs_brute": 1.0}]
    print_row(rows[-1], header=True)
    del brute, matrix
    gc.collect()

    def measure(index, search: SearchConfig | None, label: str, total_s: float, entry: dict, concept: str,
                sets: dict[str, np.ndarray] | None = None, exacts: dict[str, TopK] | None = None,
                cpu_s: float = 0.0) -> dict:
        """One row: ``index`` at ``search`` (None: its recorded knobs); ``total_s`` = build + calibration
        wall seconds, ``cpu_s`` their CPU seconds."""
        searcher = index.with_search(search) if search is not None else index
        sets, exacts = sets or queries, exacts or exact
        latency_set = np.concatenate([sets["unlike"][:half], sets["noisy"][:args.latency_queries - half]])
        p50, p95, p99, qps = time_queries(searcher.search, latency_set, sets["unlike"], args.k)
        ram, disk = partition_bytes(store, concept, entry)
        calibration = entry.get("calibration") or {}
        knobs = search.to_dict() if search is not None else entry.get("search", {})
        found = {name: batched(searcher.search, sets[name], args.k) for name in ("task", "unlike", "noisy")}
        reranked = found["noisy"].rows_reranked
        row = {"kind": label, "knobs": knob_text(knobs, entry["kind"]),
               "build_s": total_s - calibration.get("seconds", 0.0), "calibration_s": calibration.get("seconds", 0.0),
               "build_cpu_s": cpu_s, "calibrated_recall": calibration.get("worst"),
               "bytes_per_vector": ram / n, "rerank_bytes": disk / n, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
               "qps_1000": qps, "recall_task": recall_at_k(found["task"], exacts["task"]),
               "recall_unlike": recall_at_k(found["unlike"], exacts["unlike"]),
               "unlike": recall_distribution(found["unlike"], exacts["unlike"]),
               "noisy": recall_distribution(found["noisy"], exacts["noisy"]),
               "rows_reranked": float(np.mean(reranked)) if reranked is not None else float("nan"),
               "speedup_b1": (1e3 / p50) / bf_qps1, "p99_vs_brute": p99 / rows[0]["p99_ms"]}
        rows.append(row)
        print_row(row)
        return row

    for kind in filter(None, args.kinds.split(",")):  # --kinds "": only the --shared comparison
        config = IndexConfig(concept="all", kind=kind, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
        t, cpu = time.perf_counter(), cpu_seconds()
        if args.reuse and store.manifest.get("indexes", {}).get("all", {}).get("kind") == kind:
            index = ShardedIndex.open(store, "all")  # build time not measured again
            total = cpu = 0.0
        else:
            index = build_index(store, config, show_progress=False, target_recall=args.target_recall)
            total, cpu = time.perf_counter() - t, cpu_seconds() - cpu
        measure(index, None, f"{kind} (calibrated, adaptive default)" if kind != "flat" else kind, total,
                index.entry, "all", cpu_s=cpu)
        if kind in ("ivf", "ivfpq"):
            recorded = SearchConfig.from_dict(index.entry.get("search", {}))
            measure(index, replace(recorded, adaptive=False), f"{kind} (calibrated, adaptive off)", total,
                    index.entry, "all", cpu_s=cpu)
            if not args.no_certified:
                measure(index, replace(recorded, certified=True), f"{kind} (certified)", total, index.entry, "all",
                        cpu_s=cpu)
        for search in [] if args.no_sweeps else SWEEPS[kind]:
            measure(index, search, kind, total, index.entry, "all", cpu_s=cpu)
        del index
        gc.collect()

    if args.shared:
        print("\nshared index of φ vs one partition per concept weighting (ivfpq, calibrated):")
        t, cpu = time.perf_counter(), cpu_seconds()
        shared = build_index(store, IndexConfig(concept=SHARED, kind="ivfpq"), GroupWeights.uniform(SHARED, store.groups),
                             show_progress=False, target_recall=args.target_recall)
        shared_s, shared_cpu = time.perf_counter() - t, cpu_seconds() - cpu
        for concept, values in CONCEPT_WEIGHTS.items():
            weights = GroupWeights(f"bench-{concept}", dict(zip(store.groups, values)))
            t, cpu = time.perf_counter(), cpu_seconds()
            own = build_index(store, IndexConfig(concept=f"bench-{concept}", kind="ivfpq"), weights,
                              show_progress=False, target_recall=args.target_recall)
            own_s, own_cpu = time.perf_counter() - t, cpu_seconds() - cpu
            exacts = {name: concept_exact[concept, name] for name in ("task", "unlike")}
            measure(own, None, f"partition '{concept}'", own_s, own.entry, f"bench-{concept}",
                    {name: concept_queries[concept, name][0] for name in ("task", "unlike")}, exacts, own_cpu)
            measure(shared, None, f"shared, '{concept}' weights", shared_s, shared.entry, SHARED,
                    {name: concept_queries[concept, name][1] for name in ("task", "unlike")}, exacts, shared_cpu)
            del own
            gc.collect()

    good = [r for r in rows[1:] if min(r["recall_task"], r["recall_unlike"]) >= 0.95]
    if good:
        best = max(good, key=lambda r: r["speedup_b1"])
        print(f"\nfastest batch-1 setting with recall@{args.k} ≥ 0.95 on both query sets: {best['kind']} "
              f"{best['knobs']}: {best['speedup_b1']:.1f}× brute force batch-1 QPS, "
              f"{best['bytes_per_vector']:.0f} B/vector, build + calibration "
              f"{(best['build_s'] + best['calibration_s']) / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def print_row(row: dict, header: bool = False) -> None:
    if header:
        print("\n| kind | knobs | build + calibration s (held-out worst family) | index B/vec (RAM) "
              "| memory-mapped B/vec (disk) | p50 / p95 / p99 ms (b=1) | QPS (b=1000) | recall@10 task "
              "| unlike: mean / p5 / worst / certified | noisy: mean / p5 / worst / certified "
              "| rows reranked (noisy, mean) | b=1 p50 speed-up vs brute | p99 / brute p99 |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    calibrated = f" ({row['calibrated_recall']:.3f})" if row["calibrated_recall"] is not None else ""
    spread = {name: f"{d['mean']:.3f} / {d['p5']:.2f} / {d['worst']:.1f} / {100 * d['certified']:.0f}%"
              for name, d in ((name, row[name]) for name in ("unlike", "noisy"))}
    print(f"| {row['kind']} | {row['knobs']} | {row['build_s'] + row['calibration_s']:.0f}{calibrated} "
          f"| {row['bytes_per_vector']:.0f} | {row['rerank_bytes']:.0f} "
          f"| {row['p50_ms']:.2f} / {row['p95_ms']:.2f} / {row['p99_ms']:.2f} "
          f"| {row['qps_1000']:.0f} | {row['recall_task']:.3f} | {spread['unlike']} | {spread['noisy']} "
          f"| {row['rows_reranked']:.0f} | {row['speedup_b1']:.1f}× | {row['p99_vs_brute']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
