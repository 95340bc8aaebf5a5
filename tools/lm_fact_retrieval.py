"""Fact retrieval on the built-in ``lm`` task: is the one training sequence that states a fact
the top attribution of a query asking that fact?

For every fact stated in exactly one training sequence, the query is its relation's prompt
("lovu lives in") with the object as the scored span; the target is the stating sequence.
Prints the mean reciprocal rank of the target over all training sequences (mean ± std over
projection seeds) for uniform group weights with grad-dot and Gram (TRAK-style) preconditioning,
and for the best single group.

    python tools/lm_fact_retrieval.py --out /tmp/lm-facts [--proj-dim 256] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from gradindex.config import FeaturizeConfig, Preconditioner, ProjectionConfig
from gradindex.features.run import featurize, featurize_rows, resolve_groups
from gradindex.features.gradients import GradientProjector
from gradindex.features.precondition import QueryPreconditioner
from gradindex.task import load_task


def reciprocal_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``1 / rank`` of ``targets [Q]`` in ``scores [Q, N]`` (rank 1 = highest; ties count against)."""
    target_scores = scores[np.arange(len(scores)), targets]
    return 1.0 / ((scores >= target_scores[:, None]).sum(1))


def group_scores(store, task, model, items, preconditioner: Preconditioner, damping: float) -> dict[str, np.ndarray]:
    """Per-group scores ``[Q, N]``: ``−ψ_g(q)ᵀ φ_g(x)`` in the store's sample order."""
    config = FeaturizeConfig.from_dict(store.manifest["config"])
    groups = resolve_groups(task, model, config)
    with GradientProjector(model, groups, config.projection) as projector:
        queries = featurize_rows(task, model, items, range(len(items)), projector, 64, torch.device("cpu"),
                                 measurement=task.compute_measurement)
    names = store.groups
    grams = store.read_gram() if preconditioner is Preconditioner.GRAM else None
    psi = QueryPreconditioner(preconditioner, grams, damping, names)({g: torch.from_numpy(queries[g]) for g in names})
    _, feats = store.read()
    return {g: -(psi[g].numpy() @ feats[g].T) for g in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (stores per seed)")
    parser.add_argument("--proj-dim", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--damping", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    task = load_task("lm")
    model = task.load_model(None)
    facts = [f for f in task.corpus.facts if len(f.sequences) == 1]
    items = [task.query_item(task.corpus.query(f)) for f in facts]
    position = {int(sid): p for p, sid in enumerate(task.sample_ids(task.train_dataset()))}
    print(f"lm task: {len(task.train_dataset())} training sequences, {len(facts)} facts stated exactly once")

    results: dict[str, list[float]] = {}
    for seed in args.seeds:
        started = time.perf_counter()
        config = FeaturizeConfig(projection=ProjectionConfig(proj_dim=args.proj_dim, seed=seed))
        store = featurize(task, args.out / f"store-seed{seed}", config, overwrite=True, show_progress=False)
        ids, _ = store.read(groups=[])
        targets = np.array([np.flatnonzero(ids == f.sequences[0])[0] for f in facts])
        assert all(position[int(ids[t])] == f.sequences[0] for t, f in zip(targets, facts))
        for kind in (Preconditioner.IDENTITY, Preconditioner.GRAM):
            per_group = group_scores(store, task, model, items, kind, args.damping)
            label = "grad-dot" if kind is Preconditioner.IDENTITY else "Gram"
            results.setdefault(f"uniform {label}", []).append(reciprocal_ranks(sum(per_group.values()), targets).mean())
            best_group, best = max(((g, reciprocal_ranks(s, targets).mean()) for g, s in per_group.items()),
                                   key=lambda pair: pair[1])
            results.setdefault(f"best single group {label}", []).append(best)
            results.setdefault(f"best single group {label} (name)", []).append(best_group)
        print(f"seed {seed}: {time.perf_counter() - started:.1f}s")

    print(f"\nfact retrieval, proj_dim {args.proj_dim}, seeds {args.seeds}: MRR of the stating sequence")
    print("| weights | MRR (mean ± std) |\n|---|---|")
    for name, values in results.items():
        if name.endswith("(name)"):
            continue
        names = results.get(f"{name} (name)")
        suffix = f" ({', '.join(sorted(set(names)))})" if names else ""
        print(f"| {name}{suffix} | {np.mean(values):.3f} ± {np.std(values):.3f} |")


if __name__ == "__main__":
    main()
