"""Index kinds at scale: build time, bytes per vector, latency, QPS and recall@10 vs exact search.

    flock /tmp/gradindex-bench.lock python tools/bench_index.py --store /tmp/index-scale-data/store

The store is real featurized data: the digits MLP's projected gradients (3 groups × 256 = 768 dims,
float16) of a procedurally enlarged digits training set (tools/enlarged_digits.py; 10⁶ augmented
copies). Queries: augmented held-out digits through the same model, Gram-preconditioned
(``u(q) = −H⁻¹φ(q)``, uniform weights), as ``gradindex query`` computes them. Build one with::

    python -m gradindex featurize tools/enlarged_digits.py:EnlargedDigits --task-option size=1000000 \\
        --out /tmp/index-scale-data/store --dtype float16 --shard-size 100000

Baseline, measured in the same run: brute force — the float32 matrix [N, D] in RAM, ``q @ Xᵀ``
(torch matmul) then top-k (``torch.topk``); it is also the exact reference for recall.
Per kind: build time (``build_index``: sampling, training, streaming adds, writes), index bytes
per vector (the FAISS part files; ivfpq's float16 re-rank copy is listed apart: it stays on disk
and is memory-mapped), p50/p99 latency at batch 1, QPS at batch 1000, recall@10, and the speed-up
of batch-1 QPS over brute force's batch-1 QPS.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradindex.config import IndexConfig, SearchConfig  # noqa: E402
from gradindex.evaluate import recall_at_k  # noqa: E402
from gradindex.index import build_index, list_parts  # noqa: E402
from gradindex.query_features import QueryFeaturizer, load_store_task  # noqa: E402
from gradindex.store import FeatureStore  # noqa: E402
from gradindex.topk import TopK  # noqa: E402
from gradindex.weights import GroupWeights, scaled_vectors  # noqa: E402

SWEEPS = {
    "flat": [SearchConfig()],
    "ivf": [SearchConfig(nprobe=p) for p in (4, 8, 16, 32)],
    "ivfpq": [SearchConfig(nprobe=p, rerank=r) for p, r in ((8, 100), (16, 100), (16, 200), (32, 200), (64, 400))],
    "hnsw": [SearchConfig(ef_search=e) for e in (32, 64, 128, 256, 512, 1024)],
}


def load_matrix(store: FeatureStore, weights: GroupWeights) -> tuple[np.ndarray, np.ndarray]:
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
            s = torch.from_numpy(q[start:start + chunk]) @ self.matrix.T
            top = torch.topk(s, k, dim=1)
            scores.append(top.values.numpy())
            ids.append(self.ids[top.indices].numpy())
        return TopK(np.concatenate(scores), np.concatenate(ids))


def time_queries(search, q1: np.ndarray, qb: np.ndarray, k: int) -> tuple[float, float, float, TopK]:
    """(p50 ms, p99 ms) of batch-1 calls over ``q1``, QPS of one call over ``qb``, and its result."""
    search(q1[:2], k)  # warm-up
    lat = []
    for i in range(len(q1)):
        t = time.perf_counter()
        search(q1[i:i + 1], k)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    result = search(qb, k)
    qps = len(qb) / (time.perf_counter() - t)
    return float(np.percentile(lat, 50) * 1e3), float(np.percentile(lat, 99) * 1e3), qps, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="/tmp/index-scale-data/store")
    parser.add_argument("--kinds", default="flat,ivf,ivfpq,hnsw")
    parser.add_argument("--queries", type=int, default=1000, help="Batch size of the QPS run (and recall queries).")
    parser.add_argument("--latency-queries", type=int, default=200, help="Batch-1 calls timed.")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=40)
    parser.add_argument("--json", default=None, help="Also write the rows here.")
    args = parser.parse_args()

    store = FeatureStore.open(args.store)
    weights = GroupWeights.uniform("all", store.groups)
    n, dim = store.num_samples, store.dim
    print(f"store {store.path}: N={n:,} D={dim} ({store.manifest['dtype']}), task {store.manifest['task']}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, faiss threads "
          f"{__import__('faiss').omp_get_max_threads()}, cpus {os.cpu_count()}", flush=True)

    task = load_store_task(store)
    model = task.load_model(store.manifest.get("checkpoint")).eval()
    featurizer = QueryFeaturizer(store, task, model, torch.device("cpu"))
    dataset = torch.utils.data.Subset(task.query_dataset(), range(args.queries))
    queries = scaled_vectors(featurizer.group_features(dataset, batch_size=256), weights, store.groups)
    featurizer.close()
    q1 = queries[: args.latency_queries]

    t = time.perf_counter()
    ids, matrix = load_matrix(store, weights)
    print(f"loaded the float32 matrix [{n:,}, {dim}] in {time.perf_counter() - t:.1f}s", flush=True)
    norms = np.linalg.norm(matrix, axis=1)
    print("vector norm quantiles 50/90/99/99.9/100%: "
          + " / ".join(f"{v:.3g}" for v in np.quantile(norms, [0.5, 0.9, 0.99, 0.999, 1.0])))
    brute = BruteForce(ids, matrix)
    p50, p99, qps, exact = time_queries(brute.search, q1, queries, args.k)
    bf_qps1 = 1e3 / p50
    rows = [{"kind": "brute force (torch matmul)", "knobs": "", "build_s": 0.0, "bytes_per_vector": 4.0 * dim,
             "rerank_bytes": 0.0, "p50_ms": p50, "p99_ms": p99, "qps_1000": qps, "recall": 1.0, "speedup_b1": 1.0}]
    print_row(rows[-1], header=True)
    top_rows = np.searchsorted(ids, exact.sample_ids)  # store ids are sorted row numbers here
    share = float(np.mean(norms[top_rows] >= np.quantile(norms, 0.99)))
    print(f"(exact top-{args.k}: {share:.1%} of entries lie in the 1% of vectors with the largest norms)", flush=True)
    del brute, matrix
    gc.collect()

    for kind in args.kinds.split(","):
        config = IndexConfig(concept=f"bench-{kind}", kind=kind, hnsw_m=args.hnsw_m,
                             ef_construction=args.ef_construction)
        t = time.perf_counter()
        index = build_index(store, config, show_progress=False)
        build = time.perf_counter() - t
        parts = list_parts(store, config.concept)
        index_bytes = sum(os.path.getsize(store.path / p.file) for p in parts)
        rerank_bytes = sum(os.path.getsize(store.path / p.vectors_file) for p in parts if p.vectors_file)
        for search in SWEEPS[kind]:
            searcher = index.with_search(search)
            p50, p99, qps, got = time_queries(searcher.search, q1, queries, args.k)
            knobs = ", ".join(f"{k}={v}" for k, v in search.to_dict().items() if v and k != "prune")
            rows.append({"kind": kind, "knobs": knobs, "build_s": build, "bytes_per_vector": index_bytes / n,
                         "rerank_bytes": rerank_bytes / n, "p50_ms": p50, "p99_ms": p99, "qps_1000": qps,
                         "recall": recall_at_k(got, exact), "speedup_b1": (1e3 / p50) / bf_qps1})
            print_row(rows[-1])
        del index, searcher
        gc.collect()
    good = [r for r in rows[1:] if r["recall"] >= 0.95]
    if good:
        best = max(good, key=lambda r: r["speedup_b1"])
        print(f"\nfastest batch-1 config with recall@{args.k} ≥ 0.95: {best['kind']} {best['knobs']}: "
              f"recall {best['recall']:.3f}, {best['speedup_b1']:.1f}× brute force batch-1 QPS, "
              f"{best['bytes_per_vector']:.0f} B/vector, build {best['build_s'] / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def print_row(row: dict, header: bool = False) -> None:
    if header:
        print("\n| kind | knobs | build s | index B/vec | re-rank B/vec (disk) | p50 ms (b=1) | p99 ms (b=1) "
              "| QPS (b=1000) | recall@10 | b=1 QPS vs brute |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {row['kind']} | {row['knobs']} | {row['build_s']:.0f} | {row['bytes_per_vector']:.0f} "
          f"| {row['rerank_bytes']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['qps_1000']:.0f} "
          f"| {row['recall']:.3f} | {row['speedup_b1']:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
