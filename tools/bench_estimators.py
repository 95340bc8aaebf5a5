"""Cost and LDS of the estimators behind the index: grad-dot, Gram, K-FAC, EK-FAC, TracIn over
checkpoints, Adam normalisation — one task, one run, ratios from the same run (docs/estimators.md).

    nice -n 10 flock /tmp/gradindex-bench.lock python tools/bench_estimators.py --task digits --models 16 \
        --out /tmp/bench-estimators

1. train the task's checkpoint (keeping ``--checkpoints`` intermediate ones with their learning
   rates and Adam state, where the task supports ``keep_checkpoints``); retrain ``--models`` models on
   random halves and measure the eval queries (LDS ground truth, cached in OUT/lds);
2. featurize it (timed: the reference pass), fit the K-FAC/EK-FAC factors (timed), and time the
   query features of every setting on the eval queries (the second of two runs: warm);
3. LDS (uniform and SNR-learned weights) of grad-dot and Gram, K-FAC, EK-FAC at relative damping 0.1, 0.01, 0.001;
   TracIn over the kept checkpoints (lr-weighted, uniform and learned); Adam-normalised grad-dot and Gram.
Prints markdown tables and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradindex.config import FeaturizeConfig, LDSConfig, LearnConfig, Normalize, Preconditioner  # noqa: E402
from gradindex.eval.lds import group_predictions, retrain, subset_sums, weighted_predictions  # noqa: E402
from gradindex.features.checkpoints import featurize_target  # noqa: E402
from gradindex.features.factor_fit import fit_store_factors  # noqa: E402
from gradindex.features.query import QueryFeaturizer  # noqa: E402
from gradindex.features.run import featurize  # noqa: E402
from gradindex.store.feature_store import FeatureStore  # noqa: E402
from gradindex.task import load_task, task_queries  # noqa: E402
from gradindex.weights.learn import learn_weights  # noqa: E402

#: name -> (preconditioner, relative damping): each at kronfluence's 0.1 and two smaller dampings
SETTINGS = {"grad-dot": (Preconditioner.IDENTITY, 0.1),
            **{f"{p.value} {d:g}": (p, d) for p in (Preconditioner.GRAM, Preconditioner.KFAC, Preconditioner.EKFAC)
               for d in (0.1, 0.01, 0.001)}}


def store_bytes(store: FeatureStore) -> dict[str, int]:
    root = Path(store.path)
    shards = sum(s["bytes"] for s in store.manifest["shards"])
    gram = (root / store.manifest["gram"]["file"]).stat().st_size if store.manifest.get("gram") else 0
    factors = (root / store.manifest["factors"]["file"]).stat().st_size if store.manifest.get("factors") else 0
    return {"shards": shards, "gram": gram, "factors": factors}


def query_features(store, preconditioner, queries, timed: bool = False, damping: float = 0.1) -> tuple[dict, float]:
    featurizer = QueryFeaturizer.open(store, preconditioner=preconditioner, damping=damping, trust_task=True)
    try:
        features = featurizer.group_features(queries)
        seconds = 0.0
        if timed:  # warm: the second run
            start = time.perf_counter()
            features = featurizer.group_features(queries)
            seconds = time.perf_counter() - start
    finally:
        featurizer.close()
    return features, seconds


def lds_cells(store, retrained, features, weights=None) -> dict[str, float]:
    sums = subset_sums(store, retrained.masks, retrained.sample_ids)
    predictions = group_predictions(features, sums)
    per_query = retrained.lds(weighted_predictions(predictions, weights or {g: 1.0 for g in features}))
    return {"lds": float(per_query.mean()), "sem": float(per_query.std(ddof=1) / np.sqrt(len(per_query)))}


def learned(store, preconditioner, damping: float = 0.1) -> dict[str, float]:
    config = LearnConfig(preconditioner=preconditioner, damping=damping, method="snr")
    return learn_weights(store, config, save=False, show_progress=False).weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    task = load_task(args.task)
    checkpoint = args.out / "model.pt"
    if not checkpoint.exists():
        try:
            task.train(checkpoint, keep_checkpoints=args.checkpoints)
        except TypeError:  # a task without keep_checkpoints: no TracIn rows
            task.train(checkpoint)
    queries = task_queries(task, "eval")
    retrained = retrain(task, args.out / "lds", LDSConfig(num_models=args.models), workers=2, show_progress=False,
                        queries=task_queries(task, "all")).queries(np.asarray(queries.indices))
    results = {"task": args.task, "models": args.models, "queries": len(queries)}

    start = time.perf_counter()
    store = featurize(task, args.out / "store", FeaturizeConfig(), checkpoint=checkpoint, overwrite=True,
                      show_progress=False)
    results["featurize_s"] = time.perf_counter() - start
    start = time.perf_counter()
    store = fit_store_factors(store, task, task.load_model(checkpoint))
    results["fit_factors_s"] = time.perf_counter() - start
    results["bytes"] = store_bytes(store)
    rows = []
    for name, (preconditioner, damping) in SETTINGS.items():
        features, seconds = query_features(store, preconditioner, queries, timed=True, damping=damping)
        row = {"setting": name, "query_ms": 1000 * seconds / len(queries),
               "uniform": lds_cells(store, retrained, features)}
        row["learned"] = lds_cells(store, retrained, features, learned(store, preconditioner, damping))
        rows.append(row)

    # the empirical Fisher (training labels), as the Gram preconditioner uses
    store = fit_store_factors(store, task, task.load_model(checkpoint), fisher="empirical")
    for damping in (0.1, 0.001):
        features, seconds = query_features(store, Preconditioner.EKFAC, queries, timed=True, damping=damping)
        rows.append({"setting": f"ekfac {damping:g} (empirical Fisher)", "query_ms": 1000 * seconds / len(queries),
                     "uniform": lds_cells(store, retrained, features),
                     "learned": lds_cells(store, retrained, features, learned(store, Preconditioner.EKFAC, damping))})

    run_dir = Path(f"{checkpoint}.run")
    if run_dir.is_dir():
        ensemble, _ = featurize_target(args.task, {}, run_dir=run_dir)
        start = time.perf_counter()
        multi = featurize(ensemble, args.out / "tracin", FeaturizeConfig(), overwrite=True, show_progress=False)
        results["tracin_featurize_s"] = time.perf_counter() - start
        features, seconds = query_features(multi, Preconditioner.IDENTITY, queries, timed=True)
        rows.append({"setting": f"TracIn {len(ensemble.checkpoints)} ckpts", "query_ms": 1000 * seconds / len(queries),
                     "uniform": lds_cells(multi, retrained, features),
                     "learned": lds_cells(multi, retrained, features, learned(multi, Preconditioner.IDENTITY))})
    adam = featurize(task, args.out / "adam", FeaturizeConfig(normalize=Normalize.ADAM), checkpoint=checkpoint,
                     overwrite=True, show_progress=False)
    for name in ("grad-dot", "gram 0.1"):
        preconditioner, damping = SETTINGS[name]
        features, seconds = query_features(adam, preconditioner, queries, timed=True, damping=damping)
        rows.append({"setting": f"adam-normalised {name}", "query_ms": 1000 * seconds / len(queries),
                     "uniform": lds_cells(adam, retrained, features),
                     "learned": lds_cells(adam, retrained, features, learned(adam, preconditioner, damping))})
    results["rows"] = rows
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"task {args.task}: {results['queries']} eval queries, {args.models} retrained models; featurize "
          f"{results['featurize_s']:.2f}s, fit-factors {results['fit_factors_s']:.2f}s "
          f"({results['fit_factors_s'] / results['featurize_s']:.2f}x); bytes {results['bytes']}")
    print("| setting | query ms/query | LDS uniform | LDS learned (snr) |\n|---|---|---|---|")
    for row in rows:
        u, w = row["uniform"], row["learned"]
        print(f"| {row['setting']} | {row['query_ms']:.2f} | {u['lds']:.3f} ± {u['sem']:.3f} | "
              f"{w['lds']:.3f} ± {w['sem']:.3f} |")


if __name__ == "__main__":
    main()
