"""LDS benchmark: learned vs uniform group weights, each group alone, and traker's TRAK, on digits.

    flock /tmp/gradindex-bench.lock python tools/bench_lds.py --out runs/bench-lds

For each model (the digits MLP and CNN, their default checkpoints):

1. retrain ``--models`` models on random halves of the training set (cached under
   ``OUT/<arch>/lds``: a rerun reuses them) and measure the 359 held-out queries;
2. for each grouping (``module``: weight and bias of a layer together, the
   default; ``bias``: every bias a group of its own, rule ``*.bias={param}``) and
   each seed (projection seed = weight-learning seed): featurize, learn weights
   on the first half of the held-out queries (unlabeled: no retrained model is
   looked at), and measure LDS on the second half for uniform and learned
   weights under grad-dot and Gram preconditioning, each group alone (the best
   one picked on the first half), and traker's TRAK (``TRAKer`` on the same
   checkpoint, the same total projection dimension and the projection seed).
3. head-room (not an attribution): the *oracle* non-negative weighting, picked by its LDS
   against the retrained models on the first half among uniform, each group alone and 500
   seeded Dirichlet draws, scored on the second half — how much any group weighting can gain.

Needs ``traker`` (``pip install traker``) for the TRAK columns.

Prints markdown tables (mean ± std over seeds; paired learned − uniform
differences) and writes ``OUT/results.json``. ``--variants`` adds the
objective variants' table.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lds_workbench import GROUPINGS, best_single, halves, mean_std, open_or_featurize  # noqa: E402

from gradindex.config import LDSConfig, LearnConfig, Preconditioner  # noqa: E402
from gradindex.eval.lds import (  # noqa: E402
    group_predictions, precondition_features, predictions_from_scores, retrain, subset_sums, weighted_predictions,
)
from gradindex.weights.learn import learn_weights  # noqa: E402
from gradindex.features.query import QueryFeaturizer  # noqa: E402
from gradindex.task import load_task  # noqa: E402

PRECONDITIONERS = {"grad-dot": Preconditioner.IDENTITY, "gram": Preconditioner.GRAM}
VARIANTS = {
    "naive SNR (no example norm, no pull)": dict(example_norm="none", regularization=0.0),
    "centre examples, pull 0.1": dict(example_norm="center", regularization=0.1),
    "standardise examples, no pull": dict(example_norm="standardize", regularization=0.0),
    "standardise examples, pull 0.1 (default)": dict(example_norm="standardize", regularization=0.1),
    "standardise examples, pull 1.0": dict(example_norm="standardize", regularization=1.0),
    "standardise examples, pull 0.1, top-50": dict(example_norm="standardize", regularization=0.1, top_k=50),
}
DAMPINGS = (1e-3, 1e-2, 0.1, 1.0)


def trak_scores(task, path: Path, proj_dim: int, seed: int, queries, damping: float = 0.0) -> np.ndarray:
    """traker's TRAK scores ``[Q, N]`` on the task's default checkpoint (cached in ``path``).

    ``damping`` > 0 sets traker's ridge ``lambda_reg`` to ``damping · trace(XᵀX) / proj_dim``
    (gradindex's relative damping); 0 is traker's default (no ridge).
    """
    if path.is_file():
        with np.load(path) as data:
            return data["scores"]
    try:
        from trak import TRAKer
    except ImportError as error:
        raise SystemExit("bench_lds.py needs traker for its TRAK columns: pip install traker") from error
    from trak.projectors import BasicProjector, ProjectionType

    model = task.load_model(None).eval()
    grad_dim = sum(p.numel() for p in model.parameters())
    projector = BasicProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=seed, proj_type=ProjectionType.rademacher,
                               device=torch.device("cpu"), dtype=torch.float32)
    train = task.train_dataset()
    save_dir = path.with_suffix(".traker")
    shutil.rmtree(save_dir, ignore_errors=True)
    traker = TRAKer(model=model, task="image_classification", train_set_size=len(train), save_dir=str(save_dir),
                    device="cpu", proj_dim=proj_dim, projector=projector, use_half_precision=False,
                    logging_level=logging.WARNING)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for start in range(0, len(train), 128):
        x, y = train[start : start + 128]
        traker.featurize(batch=(x, y), num_samples=len(x))
    if damping > 0:
        grads = np.asarray(traker.saver.current_store["grads"], dtype=np.float64)
        traker.score_computer.lambda_reg = float(damping * (grads**2).sum() / proj_dim)
    traker.finalize_features()
    x, y = queries.tensors
    traker.start_scoring_checkpoint("queries", model.state_dict(), model_id=0, num_targets=len(x))
    for start in range(0, len(x), 128):
        traker.score(batch=(x[start : start + 128], y[start : start + 128]), num_samples=len(x[start : start + 128]))
    scores = np.asarray(traker.finalize_scores("queries")).T.astype(np.float64)  # [Q, N]
    np.savez(path, scores=scores)
    shutil.rmtree(save_dir, ignore_errors=True)
    return scores


def oracle_lds(predictions: dict, groups: list[str], lds, dev: np.ndarray, evaluation: np.ndarray, seed: int,
               candidates: int = 500) -> float:
    """Head-room check, not an attribution: the non-negative weighting with the best LDS on the fit half
    (looked up in the retrained models: uniform, each group alone and ``candidates`` seeded Dirichlet
    draws of prediction-variance shares), scored on the evaluation half."""
    scale = np.array([predictions[g][:, dev].std(0).mean() for g in groups])
    scale[scale == 0] = 1.0
    rng = np.random.default_rng(seed)
    shares = [np.full(len(groups), 1.0 / len(groups)), *np.eye(len(groups)),
              *rng.dirichlet(np.full(len(groups), 0.7), size=candidates)]
    weightings = [np.ones(len(groups))] + [p / scale for p in shares]

    def combine(w: np.ndarray) -> np.ndarray:
        return sum(float(wg) * predictions[g] for wg, g in zip(w, groups))

    best = max(weightings, key=lambda w: lds(combine(w), dev))
    return lds(combine(best), evaluation)


def run_arch(arch: str, args: argparse.Namespace) -> dict:
    out = args.out / arch
    task = load_task(f"digits-{arch}")
    task.load_model(None)  # the default checkpoint (trained on first use, cached under $GRADINDEX_HOME)
    started = time.perf_counter()
    retrained = retrain(task, out / "lds", LDSConfig(num_models=args.models, fraction=0.5), workers=args.workers)
    retrain_seconds = time.perf_counter() - started
    queries = task.query_dataset()
    fit, dev, evaluation, lds = halves(queries, retrained.measurements["all"])
    results: dict = {"retrain_seconds": retrain_seconds, "num_queries_fit": len(dev),
                     "num_queries_eval": len(evaluation), "runs": []}
    for grouping in args.groupings:
        for seed in args.seeds:
            store = open_or_featurize(task, out / f"{grouping}-seed{seed}", seed, grouping, args.proj_dim)
            featurizer = QueryFeaturizer.open(store, preconditioner=Preconditioner.IDENTITY)
            raw = featurizer.group_features(queries)
            featurizer.close()
            sums = subset_sums(store, retrained.masks, retrained.sample_ids)
            run = {"arch": arch, "grouping": grouping, "seed": seed, "dim": store.dim, "groups": store.groups}
            for name, preconditioner in PRECONDITIONERS.items():
                predictions = group_predictions(precondition_features(store, raw, preconditioner, args.damping), sums)
                uniform = weighted_predictions(predictions, {g: 1.0 for g in store.groups})
                run[f"uniform {name}"] = lds(uniform, evaluation)
                run[f"uniform {name} (fit half)"] = lds(uniform, dev)
                config = LearnConfig(preconditioner=preconditioner, damping=args.damping, seed=seed)
                learned = learn_weights(store, config, queries=fit, save=False, show_progress=False)
                run[f"learned {name}"] = lds(weighted_predictions(predictions, learned.weights), evaluation)
                run[f"weights {name}"] = learned.weights
                run[f"shares {name}"] = learned.info["shares"]
                best, singles = best_single(predictions, lds, dev, evaluation)
                run[f"best group {name}"] = singles[best][1]
                run[f"best group {name} name"] = best
                run[f"groups {name}"] = {g: v[1] for g, v in singles.items()}
                run[f"oracle {name}"] = oracle_lds(predictions, store.groups, lds, dev, evaluation, seed)
                if args.variants:
                    for label, fields in VARIANTS.items():
                        variant = learn_weights(store, LearnConfig(preconditioner=preconditioner, damping=args.damping,
                                                                   seed=seed, **fields),
                                                queries=fit, save=False, show_progress=False)
                        run[f"variant {name} {label}"] = lds(weighted_predictions(predictions, variant.weights),
                                                             evaluation)
            if seed == args.seeds[0]:
                for damping in DAMPINGS:
                    predictions = group_predictions(precondition_features(store, raw, Preconditioner.GRAM, damping),
                                                    sums)
                    uniform = weighted_predictions(predictions, {g: 1.0 for g in store.groups})
                    run[f"damping {damping:g}"] = (lds(uniform, dev), lds(uniform, evaluation))
            trak = trak_scores(task, out / f"trak-seed{seed}-dim{store.dim}.npz", store.dim, seed, queries)
            run["traker TRAK"] = lds(predictions_from_scores(trak, retrained.masks), evaluation)
            trak = trak_scores(task, out / f"trak-seed{seed}-dim{store.dim}-damped.npz", store.dim, seed, queries,
                               damping=args.damping)
            run["traker TRAK damped"] = lds(predictions_from_scores(trak, retrained.masks), evaluation)
            results["runs"].append(run)
            print(f"{arch} {grouping} seed {seed}: " + ", ".join(
                f"{k} {run[k]:.3f}" for k in ("uniform grad-dot", "learned grad-dot", "uniform gram", "learned gram",
                                              "traker TRAK", "traker TRAK damped")), flush=True)
    return results


def tables(runs: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "| model | grouping | uniform grad-dot | learned grad-dot | uniform TRAK-precond. | learned TRAK-precond. "
        "| traker TRAK | traker TRAK, damped | best single group (Gram) | oracle grad-dot | oracle TRAK-precond. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch in args.archs:
        for grouping in args.groupings:
            sel = [r for r in runs if r["arch"] == arch and r["grouping"] == grouping]
            names = sorted({r["best group gram name"] for r in sel})
            cells = [mean_std([r[k] for r in sel]) for k in ("uniform grad-dot", "learned grad-dot", "uniform gram",
                                                            "learned gram", "traker TRAK", "traker TRAK damped",
                                                            "best group gram")]
            oracle = [mean_std([r[f"oracle {p}"] for r in sel]) for p in PRECONDITIONERS]
            lines.append(f"| digits {arch} | {grouping} | " + " | ".join(cells[:-1]) + f" | {cells[-1]} "
                         f"({', '.join(names)}) | " + " | ".join(oracle) + " |")
    lines += ["", "Paired learned − uniform (same seed, same queries), mean ± std over seeds; wins = seeds where "
              "learned > uniform:", "", "| model | grouping | grad-dot | wins | TRAK-precond. | wins |",
              "|---|---|---|---|---|---|"]
    for arch in args.archs:
        for grouping in args.groupings:
            sel = [r for r in runs if r["arch"] == arch and r["grouping"] == grouping]
            cells = []
            for name in PRECONDITIONERS:
                diff = [r[f"learned {name}"] - r[f"uniform {name}"] for r in sel]
                cells += [f"{np.mean(diff):+.4f} ± {np.std(diff):.4f}", f"{sum(d > 0 for d in diff)}/{len(diff)}"]
            lines.append(f"| digits {arch} | {grouping} | " + " | ".join(cells) + " |")
    lines += ["", f"Uniform TRAK-precond. LDS against the Gram damping (seed {args.seeds[0]}; fit half / evaluation "
              "half):", "", "| model | grouping | " + " | ".join(f"{d:g}" for d in DAMPINGS) + " |",
              "|---|---|" + "---|" * len(DAMPINGS)]
    for arch in args.archs:
        for grouping in args.groupings:
            run = next(r for r in runs if r["arch"] == arch and r["grouping"] == grouping and r["seed"] == args.seeds[0])
            lines.append(f"| digits {arch} | {grouping} | " + " | ".join(
                f"{run[f'damping {d:g}'][0]:.3f} / {run[f'damping {d:g}'][1]:.3f}" for d in DAMPINGS) + " |")
    if args.variants:
        lines += ["", "Objective variants: LDS of the learned weights (evaluation half), mean ± std over seeds:", "",
                  "| variant | " + " | ".join(f"{a} {g} {p}" for a in args.archs for g in args.groupings
                                            for p in PRECONDITIONERS) + " |",
                  "|---|" + "---|" * (len(args.archs) * len(args.groupings) * len(PRECONDITIONERS))]
        rows = [("uniform weights", lambda r, p: r[f"uniform {p}"])] + [
            (label, lambda r, p, label=label: r[f"variant {p} {label}"]) for label in VARIANTS]
        for label, get in rows:
            cells = [mean_std([get(r, p) for r in runs if r["arch"] == a and r["grouping"] == g])
                     for a in args.archs for g in args.groupings for p in PRECONDITIONERS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-lds"))
    parser.add_argument("--archs", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--groupings", nargs="+", default=["module", "bias"], choices=list(GROUPINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--models", type=int, default=64, help="retrained models M (alpha = 0.5)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--proj-dim", type=int, default=256, help="per module block")
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--variants", action="store_true", help="also learn and score the objective variants")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    runs, meta = [], {}
    for arch in args.archs:
        result = run_arch(arch, args)
        runs += result.pop("runs")
        meta[arch] = result
    text = tables(runs, args)
    print("\n" + text)
    print(f"\nM = {args.models} retrained models per architecture (alpha 0.5); "
          + "; ".join(f"{a}: weights fit on {m['num_queries_fit']} queries, LDS on {m['num_queries_eval']}, "
                      f"retraining {m['retrain_seconds']:.0f}s" for a, m in meta.items())
          + f"; total {time.perf_counter() - started:.0f}s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "meta": meta, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
