"""Which parameter groups carry which concept: precision@10 of each group alone, per concept.

Uses factor labels, so it is a diagnostic (the ceiling a one-group weighting could reach),
not a way to learn weights. For each concept c, queries are featurized with the concept
measurement m_c (Gram-preconditioned, as in the store's partitions); each group's
scores s_g(q, x) alone rank the training set. Prints the table and writes a heat map.

    python tools/concept_groups.py STORE [--out concept-groups.png] [-k 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gradindex.config import IndexConfig
from gradindex.index import build_index
from gradindex.query import Attributor
from gradindex.store import FeatureStore
from gradindex.weights import GroupWeights


def group_precision(store: FeatureStore, k: int) -> dict[str, dict[str, float]]:
    ids, feats = store.read()
    _, meta = store.read_metadata()
    out = {}
    for concept in Attributor.open(store, concept="all").task.concepts:
        build_index(store, IndexConfig(concept=concept), GroupWeights.uniform(concept, store.groups),
                    show_progress=False)
        attributor = Attributor.open(store, concept=concept)
        queries = attributor.task.query_dataset()
        values = attributor.task.metadata(queries)[concept]
        vectors = attributor.query_vectors(queries)
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
    parser.add_argument("--out", default="concept-groups.png")
    args = parser.parse_args()
    store = FeatureStore.open(args.store)
    table = group_precision(store, args.k)
    concepts = list(table)
    print(f"{'group':>16}  " + "  ".join(f"{c:>10}" for c in concepts))
    for group in store.groups:
        print(f"{group:>16}  " + "  ".join(f"{table[c][group]:>10.2f}" for c in concepts))

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
