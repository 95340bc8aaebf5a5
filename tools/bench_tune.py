"""`gradindex tune`'s default budget against the full sweep on a larger, de-noised ground truth; and the
label-free dampings (issue 21).

    nice -n 10 flock /tmp/gradindex-bench.lock python tools/bench_tune.py --tasks tabular-cancer --models 64 --runs 2

For each task: featurize the default checkpoint (default config) into ``OUT/<task>/store`` and retrain
``--models`` subsets × ``--runs`` runs into ``OUT/<task>/store/lds`` (the cache `gradindex tune` uses, so
tune's 16 × 2 models are the first of these and are trained once). Then

1. **tune**: the grid (every preconditioner × damping × uniform/snr/ssl) scored on the *fit* queries against
   the first ``--tune-models`` subsets × ``--tune-runs`` runs: what `gradindex tune` does with its default
   budget; its pick;
2. **full sweep**: the same grid scored on the *eval* queries against all models (weights still learned
   on the fit queries): every cell's eval LDS ± the two-way bootstrap SE; the best cell; tune's pick's
   eval LDS − the best cell's, paired (bootstrap); the cell the fit queries pick with all models;
3. **label-free dampings**: uniform and snr-learned Gram at the named dampings (auto, mp, schedule, pinv)
   and at 0.1, and uniform grad-dot, on the eval queries, each − the better of uniform grad-dot and
   uniform Gram 0.1 (paired).

Prints markdown tables and the trainings' share (tune's trainings / the full sweep's).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradindex.config import LDSConfig, LearnConfig, Preconditioner, TuneConfig  # noqa: E402
from gradindex.errors import GradIndexError  # noqa: E402
from gradindex.eval.lds import RetrainedModels, group_predictions, retrain, subset_sums, weighted_predictions  # noqa: E402
from gradindex.eval.reliability import bootstrap_lds, bootstrap_se, paired_se  # noqa: E402
from gradindex.eval.tune import score_grid  # noqa: E402
from gradindex.features.query import QueryFeaturizer, precondition_features  # noqa: E402
from gradindex.features.run import featurize  # noqa: E402
from gradindex.store.feature_store import FeatureStore  # noqa: E402
from gradindex.task import load_task, query_split_positions  # noqa: E402
from gradindex.weights.damping import resolve_damping  # noqa: E402
from gradindex.weights.learn import learn_from_features  # noqa: E402

NAMED = ("auto", "mp", "schedule", "pinv", 0.1)


def first(retrained: RetrainedModels, models: int, runs: int) -> RetrainedModels:
    """The first ``models`` subsets × ``runs`` runs of a larger retraining."""
    sub = {c: r[:runs, :models] for c, r in retrained.runs.items()}
    return RetrainedModels(retrained.masks[:models], retrained.sample_ids, {c: r.mean(0) for c, r in sub.items()}, sub)


def label(row) -> str:
    return f"{row.preconditioner}" + ("" if row.damping is None else f" {row.damping:g}") + f" {row.method}"


def damping_table(store: FeatureStore, retrained: RetrainedModels, fit_queries, eval_queries) -> list[str]:
    """Section 3: named dampings on the eval queries, paired against the better baseline."""
    featurizer = QueryFeaturizer.open(store, "all", Preconditioner.IDENTITY)
    try:
        raw_eval, raw_fit = featurizer.group_features(eval_queries), featurizer.group_features(fit_queries)
    finally:
        featurizer.close()
    sums = subset_sums(store, retrained.masks, retrained.sample_ids)
    uniform = {g: 1.0 for g in store.groups}
    names, predictions, resolved = ["grad-dot uniform"], [], {}
    predictions.append(weighted_predictions(group_predictions(raw_eval, sums), uniform))
    for name in NAMED:
        try:
            damping = resolve_damping(store, name)
        except GradIndexError as err:
            print(f"  {name}: {err}")
            continue
        values = list(damping.values()) if isinstance(damping, dict) else [damping]
        resolved[str(name)] = f"{np.median(values):.3g}"
        per_group = group_predictions(precondition_features(store, raw_eval, Preconditioner.GRAM, damping), sums)
        weights = learn_from_features(store, raw_fit, LearnConfig(damping=name, method="snr",
                                                                  reference_size=min(2048, store.num_samples)))
        names += [f"gram {name} uniform", f"gram {name} snr"]
        predictions += [weighted_predictions(per_group, uniform), weighted_predictions(per_group, weights.weights)]
    boot = bootstrap_lds(predictions, retrained.measurements["all"])
    se = bootstrap_se(boot)
    means = [float(retrained.lds(p).mean()) for p in predictions]
    base = max((0, names.index("gram 0.1 uniform")), key=lambda i: means[i])
    lines = ["| attribution | median relative damping | eval LDS ± SE | − better baseline (paired) |", "|---|---|---|---|"]
    for e, name in enumerate(names):
        key = name.split(" ")[1] if name.startswith("gram") else None
        lines.append(f"| {name} | {resolved.get(key, '')} | {means[e]:.3f} ± {se[e]:.3f} | "
                     f"{means[e] - means[base]:+.3f} ± {paired_se(boot, e, base):.3f} |")
    return lines


def run_task(name: str, args) -> None:
    task = load_task(name)
    task.load_model(None)
    folder = args.out / name
    try:
        store = FeatureStore.open(folder / "store")
    except Exception:
        store = featurize(task, folder / "store", overwrite=True, show_progress=False)
    dataset = task.query_dataset()
    splits = query_split_positions(task, len(dataset))
    fit_queries = torch.utils.data.Subset(dataset, splits["fit"].tolist())
    eval_queries = torch.utils.data.Subset(dataset, splits["eval"].tolist())
    started = time.perf_counter()
    retrained = retrain(task, store.local_dir("lds"), LDSConfig(num_models=args.models, runs_per_subset=args.runs),
                        workers=args.workers, show_progress=False, queries=dataset)
    trained = time.perf_counter() - started
    config = TuneConfig(budget=args.tune_models * args.tune_runs, runs_per_subset=args.tune_runs)
    started = time.perf_counter()
    tuned = score_grid(store, first(retrained, args.tune_models, args.tune_runs).queries(splits["fit"]), fit_queries,
                       config)
    tune_scoring = time.perf_counter() - started
    full_fit = score_grid(store, retrained.queries(splits["fit"]), fit_queries, config)
    full = score_grid(store, retrained.queries(splits["eval"]), eval_queries, config, learn_queries=fit_queries)
    rows = {label(r): r for r in full.rows}
    pick, fit_pick = rows[label(tuned.best)], rows[label(full_fit.best)]
    ceiling = retrained.queries(splits["eval"]).ceiling()
    print(f"\n## {name}: {args.models} subsets × {args.runs} runs (ceiling on eval "
          f"{'—' if ceiling is None else f'{ceiling[1]:.3f}'}); tune: {args.tune_models} × {args.tune_runs}; "
          f"{len(splits['fit'])} fit / {len(splits['eval'])} eval queries\n")
    print("| cell | eval LDS ± SE | − best (paired) |\n|---|---|---|")
    for row in full.rows:
        if row.lds is not None:
            marks = " ← tune" * (row is pick) + " ← fit, all models" * (row is fit_pick) + " ← best" * (row is full.best)
            print(f"| {label(row)}{marks} | {row.lds:.3f} ± {row.se:.3f} | {row.minus_best:+.3f} ± {row.minus_best_se:.3f} |")
    print(f"\ntune picks {label(tuned.best)} (fit LDS {tuned.best.lds:.3f} ± {tuned.best.se:.3f}); on eval against "
          f"all models: {pick.lds:.3f}, best cell {label(full.best)} {full.best.lds:.3f}: tune − best = "
          f"{pick.minus_best:+.3f} ± {pick.minus_best_se:.3f}. trainings: tune {config.budget}, full "
          f"{args.models * args.runs} ({config.budget / (args.models * args.runs):.0%}); grid scoring {tune_scoring:.0f} s; "
          f"retraining this run {trained:.0f} s (cached models not counted)")
    print("\nLabel-free dampings (eval queries, all models):\n")
    print("\n".join(damping_table(store, retrained.queries(splits["eval"]), fit_queries, eval_queries)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/work/runs/tune"))
    parser.add_argument("--tasks", nargs="+", default=["tabular-cancer"])
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--tune-models", type=int, default=16)
    parser.add_argument("--tune-runs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.tasks:
        run_task(name, args)


if __name__ == "__main__":
    main()
