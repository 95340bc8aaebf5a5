"""LDS and fact retrieval on the built-in ``lm`` task: learned vs uniform group weights, each group alone.

    flock /tmp/gradindex-bench.lock python tools/bench_lm_lds.py --out runs/bench-lm-lds

1. Retrain ``--models`` models (the task's own ``train`` hook: the full-data model's
   schedule, seeded per model) on random halves of the 589 training sequences, cached
   under ``OUT/lds`` (a rerun reuses them), and measure the 256 default fact queries on
   each (log-probability of the object word).
2. For each seed (projection seed = weight-learning seed): featurize the default
   checkpoint (one group per module: 22 groups), learn weights on the first half of
   the queries (unlabeled: no retrained model and no fact-to-sequence link is looked
   at), and measure, under grad-dot and Gram (TRAK-style) preconditioning,
   * LDS on the second half of the queries for uniform weights, learned weights,
     the best single group (picked by LDS on the first half) and, as a diagnostic of
     what any group weighting can reach, "oracle" weights fitted to the retrained
     models' measurements of the first half; also the LDS of the same scores truncated
     to each query's ``--top-k`` largest (what a top-k lookup returns; the bulk of small
     scores is noise that swamps the subset sums);
   * fact retrieval: for every fact stated in exactly one training sequence, the
     query asking it ("lovu lives in" → object) and the reciprocal rank of that
     sequence among all training sequences; mean reciprocal rank (MRR).

Prints markdown tables (mean ± std over seeds; paired learned − uniform differences;
per-group LDS and learned shares) and writes ``OUT/results.json``.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lds import PRECONDITIONERS  # noqa: E402
from lds_workbench import best_single, halves, mean_std, open_or_featurize, oracle_weights  # noqa: E402
from lm_fact_retrieval import reciprocal_ranks  # noqa: E402

from gradindex.config import LDSConfig, LearnConfig, Preconditioner  # noqa: E402
from gradindex.eval.lds import (  # noqa: E402
    group_predictions, precondition_features, predictions_from_scores, retrain, subset_sums, weighted_predictions,
)
from gradindex.weights.learn import learn_weights  # noqa: E402
from gradindex.features.query import QueryFeaturizer  # noqa: E402
from gradindex.task import load_task  # noqa: E402

DAMPINGS = (1e-3, 1e-2, 0.1, 1.0)
ROWS = ("uniform", "learned", "best group", "oracle")
METRICS = ("lds", "mrr", "top-k lds")


def learn_options(pairs: list[str]) -> dict:
    """``key=value`` pairs -> LearnConfig fields (numbers parsed, the rest kept as strings)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--learn-option: expected key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def fact_queries(task) -> tuple[list, np.ndarray]:
    """Items of the queries asking each fact stated in exactly one training sequence, and the
    position (in the task's training order) of that sequence ``[F]``."""
    facts = [f for f in task.corpus.facts if len(f.sequences) == 1]
    position = {int(sid): p for p, sid in enumerate(task.sample_ids(task.train_dataset()))}
    return [task.query_item(task.corpus.query(f)) for f in facts], np.array([position[f.sequences[0]] for f in facts])


def group_scores(store, raw: dict, preconditioner: Preconditioner, damping: float,
                 position: dict[int, int]) -> dict[str, np.ndarray]:
    """Per-group scores ``[Q, N]`` of queries (unpreconditioned features ``raw``) against every
    stored sequence, columns in the task's training order."""
    ids, feats = store.read()
    order = np.argsort([position[int(i)] for i in ids])
    query = precondition_features(store, raw, preconditioner, damping)
    return {g: (query[g].astype(np.float64) @ feats[g].astype(np.float64).T)[:, order] for g in store.groups}


def truncated(scores: np.ndarray, k: int) -> np.ndarray:
    """``scores [Q, N]`` with all but each row's ``k`` largest set to 0 (ties at the k-th kept)."""
    if k >= scores.shape[1]:
        return scores
    threshold = np.sort(scores, axis=1)[:, -k][:, None]
    return np.where(scores >= threshold, scores, 0.0)


def run_seed(task, seed: int, retrained, queries, facts, targets, args: argparse.Namespace) -> dict:
    measured = retrained.measurements["all"]
    fit, dev, evaluation, lds = halves(queries, measured)

    def mrr(scores: np.ndarray) -> float:
        return float(reciprocal_ranks(scores, targets).mean())

    store = open_or_featurize(task, args.out / f"module-seed{seed}", seed, "module", args.proj_dim)
    featurizer = QueryFeaturizer.open(store, preconditioner=Preconditioner.IDENTITY)
    raw = featurizer.group_features(queries)
    raw_facts = featurizer.group_features(facts)
    featurizer.close()
    sums = subset_sums(store, retrained.masks, retrained.sample_ids)
    position = {int(i): p for p, i in enumerate(retrained.sample_ids)}
    run: dict = {"seed": seed, "dim": store.dim, "groups": store.groups}
    for name, preconditioner in PRECONDITIONERS.items():
        damping = args.damping if preconditioner is Preconditioner.GRAM else 0.0
        predictions = group_predictions(precondition_features(store, raw, preconditioner, damping), sums)
        scores = group_scores(store, raw_facts, preconditioner, damping, position)
        query_scores = group_scores(store, raw, preconditioner, damping, position)
        uniform = {g: 1.0 for g in store.groups}
        learned = learn_weights(store, LearnConfig(preconditioner=preconditioner, damping=args.damping, seed=seed,
                                                   **learn_options(args.learn_option)),
                                queries=fit, save=False, show_progress=False)
        best, singles = best_single(predictions, lds, dev, evaluation)
        oracle = oracle_weights(predictions, measured, dev)
        for row, weights in (("uniform", uniform), ("learned", learned.weights),
                             ("best group", {g: float(g == best) for g in store.groups}), ("oracle", oracle)):
            run[f"{row} {name} lds"] = lds(weighted_predictions(predictions, weights), evaluation)
            run[f"{row} {name} mrr"] = mrr(sum(float(w) * scores[g] for g, w in weights.items()))
            top = truncated(sum(float(w) * query_scores[g] for g, w in weights.items()), args.top_k)
            run[f"{row} {name} top-k lds"] = lds(predictions_from_scores(top, retrained.masks), evaluation)
        run[f"uniform {name} lds (fit half)"] = lds(weighted_predictions(predictions, uniform), dev)
        run[f"learned {name} lds (fit half)"] = lds(weighted_predictions(predictions, learned.weights), dev)
        run[f"oracle {name} lds (fit half)"] = lds(weighted_predictions(predictions, oracle), dev)
        run[f"best group {name} name"] = best
        run[f"weights {name}"] = learned.weights
        run[f"shares {name}"] = learned.info["shares"]
        run[f"uniform shares {name}"] = learned.info["uniform_shares"]
        run[f"groups {name} lds"] = {g: v[1] for g, v in singles.items()}
        run[f"groups {name} mrr"] = {g: mrr(scores[g]) for g in store.groups}
    if seed == args.seeds[0]:
        for damping in DAMPINGS:
            predictions = group_predictions(precondition_features(store, raw, Preconditioner.GRAM, damping), sums)
            scores = group_scores(store, raw_facts, Preconditioner.GRAM, damping, position)
            uniform = weighted_predictions(predictions, {g: 1.0 for g in store.groups})
            run[f"damping {damping:g}"] = (lds(uniform, dev), lds(uniform, evaluation), mrr(sum(scores.values())))
    return run


def tables(runs: list[dict], args: argparse.Namespace) -> str:
    k = args.top_k
    lines = ["| weights | LDS grad-dot | LDS TRAK-precond. (Gram) | MRR grad-dot | MRR TRAK-precond. (Gram) "
             f"| top-{k} LDS grad-dot | top-{k} LDS Gram |", "|---|---|---|---|---|---|---|"]
    for row in ROWS:
        cells = [mean_std([r[f"{row} {p} {m}"] for r in runs]) for m in METRICS for p in PRECONDITIONERS]
        label = {"oracle": "oracle weights (fit to the retrained models on the fit half; diagnostic)"}.get(row, row)
        if row == "best group":
            label += " (" + "; ".join(f"{p}: {', '.join(sorted({r[f'best group {p} name'] for r in runs}))}"
                                      for p in PRECONDITIONERS) + ")"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Paired learned − uniform (same seed), mean ± std over seeds; wins = seeds where learned > uniform:",
              "", "| metric | grad-dot | wins | TRAK-precond. | wins |", "|---|---|---|---|---|"]
    for metric in METRICS:
        cells = []
        for p in PRECONDITIONERS:
            diff = [r[f"learned {p} {metric}"] - r[f"uniform {p} {metric}"] for r in runs]
            cells += [f"{np.mean(diff):+.4f} ± {np.std(diff):.4f}", f"{sum(d > 0 for d in diff)}/{len(diff)}"]
        label = {"lds": "LDS", "mrr": "MRR", "top-k lds": f"top-{k} LDS"}[metric]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    first = next(r for r in runs if r["seed"] == args.seeds[0])
    lines += ["", f"Uniform TRAK-precond. against the Gram damping (seed {args.seeds[0]}; LDS fit half / LDS evaluation "
              "half / MRR):", "", "| " + " | ".join(f"{d:g}" for d in DAMPINGS) + " |", "|" + "---|" * len(DAMPINGS),
              "| " + " | ".join("{:.3f} / {:.3f} / {:.3f}".format(*first[f"damping {d:g}"]) for d in DAMPINGS) + " |"]
    lines += ["", "Per group (mean over seeds): LDS alone (evaluation half), MRR alone, uniform share → learned share:",
              "", "| group | LDS grad-dot | LDS Gram | MRR grad-dot | MRR Gram | shares grad-dot | shares Gram |",
              "|---|---|---|---|---|---|---|"]
    for g in runs[0]["groups"]:
        cells = [f"{np.mean([r[f'groups {p} {m}'][g] for r in runs]):.3f}" for m in ("lds", "mrr")
                 for p in PRECONDITIONERS]
        cells += [f"{np.mean([r[f'uniform shares {p}'][g] for r in runs]):.3f} → "
                  f"{np.mean([r[f'shares {p}'][g] for r in runs]):.3f}" for p in PRECONDITIONERS]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-lm-lds"), help="work folder (cache, stores)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="projection / weight-learning seeds")
    parser.add_argument("--models", type=int, default=32, help="retrained models M (alpha = 0.5)")
    parser.add_argument("--workers", type=int, default=2, help="retraining processes")
    parser.add_argument("--proj-dim", type=int, default=256, help="per module block")
    parser.add_argument("--damping", type=float, default=0.1, help="Gram damping (relative)")
    parser.add_argument("--top-k", type=int, default=10,
                        help="k of the top-k LDS column (each query's scores truncated to its k largest)")
    parser.add_argument("--learn-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a LearnConfig field for the learned weights (repeatable), e.g. regularization=1.0")
    parser.add_argument("--results", type=Path, default=None, help="results JSON (default OUT/results.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    task = load_task("lm")
    task.load_model(None)  # the default checkpoint (trained on first use, cached under $GRADINDEX_HOME)
    retrained = retrain(task, args.out / "lds", LDSConfig(num_models=args.models, fraction=0.5),
                        workers=args.workers)
    retrain_seconds = time.perf_counter() - started
    queries = task.query_dataset()
    facts, targets = fact_queries(task)
    runs = []
    for seed in args.seeds:
        run = run_seed(task, seed, retrained, queries, facts, targets, args)
        runs.append(run)
        print(f"seed {seed}: " + ", ".join(f"{k} {run[k]:.3f}" for k in (
            "uniform grad-dot lds", "learned grad-dot lds", "uniform gram lds", "learned gram lds",
            "uniform grad-dot mrr", "learned grad-dot mrr", "uniform gram mrr", "learned gram mrr")), flush=True)
    print("\n" + tables(runs, args))
    half = len(queries) // 2
    print(f"\nlm task: {len(task.train_dataset())} training sequences, {runs[0]['dim']} projected dims "
          f"({len(runs[0]['groups'])} groups); M = {args.models} retrained models (alpha 0.5); weights fit on {half} "
          f"queries, LDS on {len(queries) - half}; MRR over {len(facts)} facts stated once; Gram damping "
          f"{args.damping:g}; learn options {learn_options(args.learn_option) or 'default'}; retraining (or cache) {retrain_seconds:.0f}s; total {time.perf_counter() - started:.0f}s")
    results = args.results or args.out / "results.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "retrain_seconds": retrain_seconds, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
