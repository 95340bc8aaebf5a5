"""Which parameter groups carry which concept: precision@10 of each group alone, per concept.

Uses factor labels, so it is a diagnostic (the ceiling a one-group weighting could reach),
not a way to learn weights. For each concept c, queries are featurized with the concept
measurement m_c (Gram-preconditioned, as in the store's partitions); each group's
scores s_g(q, x) alone rank the training set. Prints the table and writes a heat map.

Queries: --inputs FILE (a task query file), --heldout (generations of the withheld
combinations × every background, twice; diffusion tasks), else the task's default queries.

    python tools/concept_groups.py STORE [--heldout | --inputs FILE] [--out concept-groups.png] [-k 10]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gradindex.config import IndexConfig
from gradindex.index import build_index
from gradindex.query.attributor import Attributor
from gradindex.features.query import load_store_task
from gradindex.store.feature_store import FeatureStore
from gradindex.weights.group_weights import GroupWeights


def group_precision(store: FeatureStore, queries: Sequence | None, k: int) -> dict[str, dict[str, float]]:
    """``{concept: {group: precision@k of that group's scores alone}}`` over ``queries`` (default: the task's)."""
    ids, feats = store.read()
    train_ids, meta = store.read_metadata()
    assert np.array_equal(np.asarray(ids), np.asarray(train_ids))
    out = {}
    for concept in load_store_task(store).concepts:
        build_index(store, IndexConfig(concept=concept), GroupWeights.uniform(concept, store.groups),
                    show_progress=False)
        attributor = Attributor.open(store, concept=concept)
        dataset = attributor.task.query_dataset() if queries is None else queries
        values = attributor.task.metadata(dataset)[concept]
        vectors = attributor.query_vectors(dataset)
        attributor.close()
        start, out[concept] = 0, {}
        for group in store.groups:
            stop = start + store.group_dims[group]
            top = np.argsort(-(vectors[:, start:stop] @ feats[group].T), axis=1)[:, :k]
            out[concept][group] = float(np.mean(meta[concept][top] == values[:, None]))
            start = stop
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--inputs", default=None, help="a query file of the store's task")
    parser.add_argument("--heldout", action="store_true", help="generations of the withheld combinations")
    parser.add_argument("--seed", type=int, default=0, help="generation seed of --heldout")
    parser.add_argument("--out", default="concept-groups.png")
    args = parser.parse_args()
    store = FeatureStore.open(args.store)
    queries = None
    if args.inputs:
        queries = load_store_task(store).load_queries(args.inputs)
    elif args.heldout:
        task = load_store_task(store)
        queries = task.generate(task.load_model(store.manifest.get("checkpoint")), task.heldout_prompts() * 2,
                                seed=args.seed)
    table = group_precision(store, queries, args.k)
    concepts = list(table)
    width = max(len(g) for g in store.groups)
    print(f"{'group':>{width}}  " + "  ".join(f"{c:>10}" for c in concepts))
    for group in store.groups:
        print(f"{group:>{width}}  " + "  ".join(f"{table[c][group]:>10.2f}" for c in concepts))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array([[table[c][g] for g in store.groups] for c in concepts])
    fig, ax = plt.subplots(figsize=(0.42 * len(store.groups) + 2, 2.6))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(store.groups)), store.groups, rotation=70, fontsize=7, ha="right")
    ax.set_yticks(range(len(concepts)), concepts, fontsize=8)
    fig.colorbar(image, ax=ax, label=f"precision@{args.k}")
    ax.set_title(f"each group alone: concept precision@{args.k} on held-out generations", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {Path(args.out)}")


if __name__ == "__main__":
    main()
