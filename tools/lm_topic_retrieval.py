"""Topic retrieval on the built-in ``lm-deep`` task: do a held-out span's top attributions come from its topic?

Natural text plants no facts, so the retrieval check that applies is the source: each
default query is a held-out span of one ``pydoc_data`` topic, and the fraction of its
top-k training sequences from that topic (topic precision@k) measures whether the
attribution finds the text the span came from. Chance is the fraction of training
sequences in the query's topic. Prints precision@k for uniform weights under grad-dot
and Gram preconditioning, the store's learned weights when it has them, and chance,
over the queries of ``--split`` (default: eval).

    gradindex featurize lm-deep --out runs/lm-deep
    python tools/lm_topic_retrieval.py runs/lm-deep [-k 10] [--split eval] [--damping 0.1]
"""

from __future__ import annotations

import argparse

import numpy as np

from gradindex.config import Preconditioner
from gradindex.eval.evaluate import concept_precision
from gradindex.index import TopK
from gradindex.features.query import load_store_task, query_group_features
from gradindex.store.feature_store import FeatureStore
from gradindex.task import dataset_metadata, task_queries
from gradindex.weights.group_weights import GroupWeights


def topic_precision(store: FeatureStore, queries, weights: dict[str, float], preconditioner: Preconditioner,
                    damping: float, k: int, column: str = "topic") -> tuple[np.ndarray, np.ndarray]:
    """Per-query ``(precision@k [Q], chance [Q])`` of exact top-k under ``Σ_g w_g s_g``."""
    task = load_store_task(store)
    features = query_group_features(store, queries, preconditioner=preconditioner, damping=damping)
    ids, stored = store.read()
    scores = sum(weights[g] * (features[g] @ stored[g].T) for g in store.groups)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = TopK(np.take_along_axis(scores, order, axis=1), ids[order])
    train_ids, train_meta = store.read_metadata()
    return concept_precision(top, train_ids, train_meta[column], dataset_metadata(task, queries)[column], k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="a feature store of the lm-deep task (or any task with a 'topic' column)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--split", choices=["fit", "eval", "all"], default="eval")
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--column", default="topic", help="metadata column shared by queries and training items")
    args = parser.parse_args()

    store = FeatureStore.open(args.store)
    queries = task_queries(load_store_task(store), args.split)
    uniform = {g: 1.0 for g in store.groups}
    rows = [("uniform", uniform, Preconditioner.IDENTITY, 0.0), ("uniform", uniform, Preconditioner.GRAM, args.damping)]
    learned = GroupWeights.from_manifest(store.manifest, "all", store.groups)
    setting = learned.info.get("config")
    if setting:
        rows.append(("learned", learned.weights, Preconditioner(setting["preconditioner"]),
                     float(setting.get("damping", args.damping))))
    print(f"{args.column} precision@{args.k} over {len(queries)} queries ({args.split} split)")
    print("| weights | preconditioner | precision@k (± sem) | chance |\n|---|---|---|---|")
    for name, weights, preconditioner, damping in rows:
        precision, chance = topic_precision(store, queries, weights, preconditioner, damping, args.k, args.column)
        label = "grad-dot" if preconditioner is Preconditioner.IDENTITY else f"Gram (damping {damping:g})"
        sem = precision.std(ddof=1) / np.sqrt(len(precision))
        print(f"| {name} | {label} | {precision.mean():.3f} ± {sem:.3f} | {chance.mean():.3f} |")


if __name__ == "__main__":
    main()
