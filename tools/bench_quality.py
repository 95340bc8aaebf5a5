"""The attribution-quality suite: every built-in task × preconditioner setting × group weighting × seed.

    nice -n 10 flock /tmp/gradindex-bench.lock python tools/bench_quality.py --out /work/runs/quality

For each task (default: every built-in task with a training routine and LDS queries; ``--tasks``)
and each seed (projection seed = weight-learning seed):

1. retrain ``--models`` models on random halves (cached in ``OUT/<task>/lds``, resumable; 32 for
   the language models, 64 otherwise) and measure every query of the task;
2. featurize the task's default checkpoint with the default configuration and the seed
   (``OUT/<task>/seed<s>/store``) and cache the queries' raw features and the subset sums;
3. for each setting {grad-dot, Gram damping 0.1, Gram damping auto} and weighting
   {uniform, snr, ssl, oracle}: weights are learned on the task's *fit* queries (no retrained
   model is looked at), LDS is measured on its *eval* queries; the oracle is a head-room
   diagnostic fitted to the retrained models on the fit queries (best of uniform, each group
   alone and a Pearson fit of the shares), scored on the eval queries;
4. the row **default**: exactly what ``learn-weights`` then ``build-index`` do with no flags
   (``LearnConfig()`` on the fit queries, ``IndexConfig()``'s preconditioner and damping);
5. diagnostics: uniform Gram LDS over a damping sweep, and each label-free damping criterion.

Every cell's per-query LDS is cached in ``OUT/<task>/seed<s>/cells.json`` (keyed by its settings), so a
rerun computes only what is missing. Prints markdown tables — the seed mean ± its standard error from a
two-way bootstrap over the retrained models and the eval queries (gradindex.eval.reliability; the same
resampled models and queries for every seed and cell, so differences are paired), the ceiling of the
ground truth when ``--runs`` ≥ 2 — and writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lds_workbench import Workbench, best_oracle, open_or_featurize  # noqa: E402

from gradindex.config import (  # noqa: E402
    AUTO_DAMPING, DampingCriterion, ExampleNorm, IndexConfig, LDSConfig, LearnConfig, Preconditioner,
)
from gradindex.weights.damping import FoldStatistics, choose_damping, resolve_damping  # noqa: E402
from gradindex.eval.lds import retrain  # noqa: E402
from gradindex.eval.reliability import REPLICATES, bootstrap_lds  # noqa: E402
from gradindex.weights.learn import (  # noqa: E402
    example_normed, learn_from_features, query_sample, reference_sample, score_matrices, snr, ssl_loss,
)
from gradindex.tasks import BUILTIN_TASKS  # noqa: E402
from gradindex.task import load_task  # noqa: E402

SETTINGS = {"grad-dot": (Preconditioner.IDENTITY, 0.0), "gram 0.1": (Preconditioner.GRAM, 0.1),
            "gram auto": (Preconditioner.GRAM, AUTO_DAMPING)}
#: learned weightings: LearnConfig fields (``ssl``: the paper's recipe exactly; ``ssl+guards``: its loss with
#: the example norm and per-group normalisation of ``snr``)
LEARNED = {"snr": {"method": "snr"}, "ssl": {"method": "ssl"},
           "ssl+guards": {"method": "ssl", "example_norm": "standardize", "group_norm": "rms"}}
METHODS = ("uniform", *LEARNED, "oracle")
SWEEP = (0.0, 1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
#: tasks without LDS in the suite (no retrainable measurement worth the time on 2 cores; the diffusion
#: tasks' quality is concept precision, tools/bench_concepts.py)
SKIP = {"diffusion", "diffusion-text", "diffusion-text-lora", "digits-mlp"}
LANGUAGE_MODELS = {"lm", "lm-deep"}
#: bump when a cell's computation changes, so cached cells are recomputed
VERSION = 1


def default_tasks() -> list[str]:
    return [name for name in BUILTIN_TASKS if name not in SKIP]


def query_split(task, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(fit, eval)`` in ``task.query_dataset()``: the task's own split (``Task.query_splits``)."""
    try:
        from gradindex.task import query_split_positions
    except ImportError:  # before the fit/eval split existed: halves
        half = count // 2
        return np.arange(half), np.arange(half, count)
    splits = query_split_positions(task, count)
    return splits["fit"], splits["eval"]


class Cells:
    """``folder/cells.json``: ``{name: {"key": settings, ...results}}``; a cell is recomputed when its key changes."""

    def __init__(self, path: Path, common: dict):
        self.path = path
        self.common = common
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, name: str, key: dict, compute) -> dict:
        key = json.loads(json.dumps(cell_safe({**key, **self.common, "version": VERSION})))
        cell = self.data.get(name)
        if cell is None or cell.get("key") != key:
            started = time.perf_counter()
            cell = {"key": key, **compute(), "seconds": round(time.perf_counter() - started, 3)}
            self.data[name] = cell
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cell_safe(self.data)))
            tmp.replace(self.path)
        return cell


def cell_safe(value):
    if isinstance(value, dict):
        return {str(k): cell_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [cell_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def learned_cell(bench: Workbench, config: LearnConfig, fit: np.ndarray, evaluation: np.ndarray,
                 preconditioner: Preconditioner | None = None) -> dict:
    """Weights learned by ``config`` on (a seeded sample of) the fit queries; LDS on the eval queries
    under ``preconditioner`` (default: the one they were learned for) and their resolved damping."""
    chosen = query_sample(np.arange(len(fit)), config.num_queries, config.seed)
    rows = fit[np.asarray(getattr(chosen, "indices", chosen))]
    weights = learn_from_features(bench.store, {g: v[rows] for g, v in bench.raw.items()}, config)
    damping = weights.info["config"]["damping"]
    preconditioner = preconditioner or config.preconditioner
    combined = bench.combined(preconditioner, damping, weights.weights)
    return {"eval": bench.lds(combined, evaluation), "fit": float(bench.lds(combined, fit).mean()),
            "weights": weights.weights, "damping": damping, "method": weights.info["method"],
            "shares": weights.info["shares"]}


def uniform_objectives(bench: Workbench, damping, rows: np.ndarray, reference: dict) -> dict[str, float]:
    """The label-free objectives of uniform Gram weights at ``damping`` on query ``rows`` (at most 256):
    mean SNR with and without the example norm, and the paper's ``−L_q`` (top-10)."""
    rows = rows[:LearnConfig().num_queries]
    scores = torch.as_tensor(score_matrices(bench.features(Preconditioner.GRAM, damping, rows), reference,
                                            bench.groups)).sum(0)
    return {"snr standardized": float(snr(example_normed(scores, ExampleNorm.STANDARDIZE), 10).mean()),
            "snr": float(snr(scores, 10).mean()), "ssl": float(-ssl_loss(scores, 10).mean())}


def label(name: str) -> str:
    """A task's folder and table name: the built-in name, or the class name of ``file.py:Class``."""
    return name.rpartition(":")[2]


def run_seed(name: str, task, seed: int, retrained, queries, fit, evaluation, args) -> dict:
    name = label(name)
    folder = args.out / name / f"seed{seed}"
    store = open_or_featurize(task, folder / "store", seed, proj_dim=args.proj_dim)
    bench = Workbench(store, retrained, queries, folder)
    split = hashlib.sha256(np.asarray(fit, np.int64).tobytes() + np.asarray(evaluation, np.int64).tobytes())
    measured = hashlib.sha256(np.ascontiguousarray(retrained.measurements["all"]).tobytes()).hexdigest()[:16]
    cells = Cells(folder / "cells.json", {"split": split.hexdigest()[:16], "models": len(retrained.masks),
                                          "measurements": measured})
    groups = store.groups
    out: dict = {"task": name, "seed": seed, "groups": groups, "dim": store.dim, "num_train": store.num_samples}
    auto = resolve_damping(store, AUTO_DAMPING)

    def uniform_cell(preconditioner, damping) -> dict:
        combined = bench.combined(preconditioner, damping, {g: 1.0 for g in groups})
        return {"eval": bench.lds(combined, evaluation), "fit": float(bench.lds(combined, fit).mean()),
                "damping": damping}

    for setting, (preconditioner, damping) in SETTINGS.items():
        resolved = auto if damping == AUTO_DAMPING else damping
        key = {"preconditioner": preconditioner.value, "damping": resolved}
        out[f"uniform|{setting}"] = cells.get(f"uniform|{setting}", key,
                                              lambda: uniform_cell(preconditioner, resolved))
        for method, fields in LEARNED.items():
            config = LearnConfig(preconditioner=preconditioner, damping=damping, seed=seed,
                                 **{**fields, **args.learn_options.get(method, {})})
            out[f"{method}|{setting}"] = cells.get(f"{method}|{setting}", {**config.to_dict(), "auto": auto},
                                                   lambda: learned_cell(bench, config, fit, evaluation))

        def oracle_cell() -> dict:
            weights = best_oracle(bench, preconditioner, resolved, fit)
            combined = bench.combined(preconditioner, resolved, weights)
            return {"eval": bench.lds(combined, evaluation), "fit": float(bench.lds(combined, fit).mean()),
                    "weights": weights}

        out[f"oracle|{setting}"] = cells.get(f"oracle|{setting}", key, oracle_cell)

    learn, index = LearnConfig(), IndexConfig()

    def default_cell() -> dict:
        cell = learned_cell(bench, learn, fit, evaluation, index.preconditioner)
        index_damping = resolve_damping(store, index.damping, index.preconditioner)
        if index.preconditioner is Preconditioner.GRAM and cell["damping"] != index_damping:
            raise SystemExit(f"{name}: the default weights' damping {cell['damping']} is not the default "
                             f"index's {index_damping}; build-index would refuse them")
        return cell

    out["default"] = cells.get("default", {"learn": learn.to_dict(), "index": index.to_dict(), "auto": auto},
                               default_cell)

    def sweep_cell() -> dict:
        rows, objectives = {}, {}
        _, reference = reference_sample(store, LearnConfig().reference_size, seed)
        for damping in SWEEP:
            combined = bench.combined(Preconditioner.GRAM, damping, {g: 1.0 for g in groups})
            rows[f"{damping:g}"] = (float(bench.lds(combined, fit).mean()), float(bench.lds(combined, evaluation).mean()))
            objectives[f"{damping:g}"] = uniform_objectives(bench, damping, fit, reference)
        return {"sweep": rows, "objectives": objectives}

    sweep = cells.get("sweep", {"grid": list(SWEEP), "objectives": 1}, sweep_cell)
    out["sweep"], out["sweep objectives"] = sweep["sweep"], sweep["objectives"]

    def criteria_cell() -> dict:
        stats = FoldStatistics.of_store(store)
        rows = {}
        for criterion in DampingCriterion:
            damping = choose_damping(stats, criterion)
            combined = bench.combined(Preconditioner.GRAM, damping, {g: 1.0 for g in groups})
            rows[criterion.value] = {"damping": damping, "eval": bench.lds(combined, evaluation),
                                     "fit": float(bench.lds(combined, fit).mean())}
        return {"criteria": rows}

    out["criteria"] = cells.get("criteria", {"criteria": [c.value for c in DampingCriterion]}, criteria_cell)["criteria"]
    out["_predictions"] = cell_predictions(bench, out, evaluation, auto)
    return out


def cell_predictions(bench: Workbench, out: dict, evaluation: np.ndarray, auto) -> dict[str, np.ndarray]:
    """``{cell: ŷ [M, Q_eval]}`` of every table cell (from its recorded weights and damping), for the bootstrap."""
    predictions = {}
    for setting, (preconditioner, damping) in SETTINGS.items():
        resolved = auto if damping == AUTO_DAMPING else damping
        for method in METHODS:
            cell = out[f"{method}|{setting}"]
            weights = cell.get("weights") or {g: 1.0 for g in bench.groups}
            predictions[f"{method}|{setting}"] = bench.combined(preconditioner, cell.get("damping", resolved),
                                                                weights)[:, evaluation]
    default = out["default"]
    predictions["default"] = bench.combined(IndexConfig().preconditioner, default["damping"],
                                            default["weights"])[:, evaluation]
    return predictions


def run_task(name: str, args) -> list[dict]:
    task = load_task(name)
    task.load_model(None)  # the default checkpoint (trained on first use, cached under $GRADINDEX_HOME)
    models = args.models or (32 if name in LANGUAGE_MODELS else 64)
    started = time.perf_counter()
    retrained = retrain(task, args.out / label(name) / "lds", LDSConfig(num_models=models, runs_per_subset=args.runs),
                        workers=args.workers, show_progress=False)
    queries = task.query_dataset()
    fit, evaluation = query_split(task, len(queries))
    runs = []
    for seed in args.seeds:
        run = run_seed(name, task, seed, retrained, queries, fit, evaluation, args)
        run.update(models=models, runs_per_subset=args.runs, num_fit=len(fit), num_eval=len(evaluation),
                   seconds=round(time.perf_counter() - started, 1), ceiling=retrained.queries(evaluation).ceiling(),
                   _measured=retrained.measurements["all"][:, evaluation])
        runs.append(run)
        print(f"{label(name)} seed {seed}: " + ", ".join(
            f"{cell} {np.mean(run[cell]['eval']):.3f}" for cell in
            ("uniform|grad-dot", "uniform|gram 0.1", "snr|gram 0.1", "ssl+guards|gram 0.1", "default")),
            flush=True)
    return runs


# -- tables ------------------------------------------------------------------------------------------
def _mean(run: dict, cell: str) -> float:
    return float(np.mean(run[cell]["eval"]))


def seed_bootstrap(runs: list[dict], replicates: int = REPLICATES) -> dict[str, np.ndarray]:
    """``{cell: [replicates]}``: the seed-mean eval LDS of every cell in each two-way bootstrap replicate
    (the same resampled models and queries for every seed and cell, as the seeds share the models)."""
    cells = list(runs[0]["_predictions"])
    per_seed = [bootstrap_lds([r["_predictions"][c] for c in cells], r["_measured"], replicates, seed=0) for r in runs]
    mean = np.mean(per_seed, axis=0)
    return {c: mean[:, e] for e, c in enumerate(cells)}


def _se(boot: dict[str, np.ndarray], a: str, b: str | None = None) -> float:
    """Bootstrap SE of the seed-mean LDS of cell ``a`` (or of ``a − b``, paired)."""
    return float((boot[a] - (boot[b] if b else 0)).std(ddof=1))


def _pooled(runs: list[dict], a: str, b: str, boot: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """Paired ``a − b``: seed-mean difference, its bootstrap SE over models and queries, std over seeds."""
    diffs = [_mean(r, a) - _mean(r, b) for r in runs]
    return float(np.mean(diffs)), _se(boot, a, b), float(np.std(diffs))


def tables(results: dict[str, list[dict]]) -> str:
    boots = {name: seed_bootstrap(runs) for name, runs in results.items()}
    lines = ["LDS on the eval queries, seed mean ± SE (bootstrap over retrained models and eval queries, "
             f"{REPLICATES} replicates); ceiling: split-half reliability of the run-averaged ground truth "
             "(docs/tune.md):", "",
             "| task | groups | models × runs | ceiling | setting | " + " | ".join(METHODS[:-1])
             + " | oracle (head-room) |", "|---|---|---|---|---|" + "---|" * len(METHODS)]
    for name, runs in results.items():
        ceiling = runs[0].get("ceiling")
        for setting in SETTINGS:
            cells = [f"{np.mean([_mean(r, f'{m}|{setting}') for r in runs]):.3f} ± {_se(boots[name], f'{m}|{setting}'):.3f}"
                     for m in METHODS]
            lines.append(f"| {name} | {len(runs[0]['groups'])} | {runs[0]['models']} × {runs[0].get('runs_per_subset', 1)} "
                         f"| {'—' if not ceiling else f'{ceiling[1]:.3f}'} | {setting} | " + " | ".join(cells) + " |")
    lines += ["", "The default configuration (`learn-weights` then `build-index`, no flags) against the baselines: "
              "paired differences, seed mean ± bootstrap SE over models and queries (std over seeds):", "",
              "| task | default | uniform grad-dot | uniform Gram 0.1 | default − grad-dot | default − Gram 0.1 "
              "| ≥ better baseline? |", "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        diffs = [_pooled(runs, "default", base, boots[name]) for base in ("uniform|grad-dot", "uniform|gram 0.1")]
        better = max(("uniform|grad-dot", "uniform|gram 0.1"), key=lambda c: np.mean([_mean(r, c) for r in runs]))
        worst = diffs[0] if better == "uniform|grad-dot" else diffs[1]
        verdict = "yes" if worst[0] >= 0 else ("within 2 SE" if worst[0] > -2 * worst[1] else "no")
        cells = [f"{np.mean([_mean(r, c) for r in runs]):.3f} ± {_se(boots[name], c):.3f}"
                 for c in ("default", "uniform|grad-dot", "uniform|gram 0.1")]
        cells += [f"{m:+.4f} ± {se:.4f} ({sd:.4f})" for m, se, sd in diffs]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", "Learned − uniform, same setting (paired, seed mean ± bootstrap SE; std over seeds):", "",
              "| task | setting | " + " | ".join(f"{m} − uniform" for m in METHODS[1:]) + " |",
              "|---|---|" + "---|" * (len(METHODS) - 1)]
    for name, runs in results.items():
        for setting in SETTINGS:
            cells = [_pooled(runs, f"{m}|{setting}", f"uniform|{setting}", boots[name]) for m in METHODS[1:]]
            lines.append(f"| {name} | {setting} | " + " | ".join(f"{m:+.4f} ± {se:.4f} ({sd:.4f})"
                                                                  for m, se, sd in cells) + " |")
    objectives = ("snr standardized", "snr", "ssl")
    lines += ["", "Gram damping, uniform weights (seed mean): eval LDS over the sweep; the best damping on the fit "
              "queries; the label-free criteria (median of their per-group choice → eval LDS); the damping that "
              "maximises each unsupervised objective of uniform weights on the fit queries (median → eval LDS):", "",
              "| task | " + " | ".join(f"{d:g}" for d in SWEEP) + " | best (fit) | "
              + " | ".join(c.value for c in DampingCriterion) + " | " + " | ".join(f"max {o}" for o in objectives) + " |",
              "|---|" + "---|" * (len(SWEEP) + 1 + len(DampingCriterion) + len(objectives))]
    for name, runs in results.items():
        sweep = {d: np.mean([r["sweep"][f"{d:g}"][1] for r in runs]) for d in SWEEP}
        fit = {d: np.mean([r["sweep"][f"{d:g}"][0] for r in runs]) for d in SWEEP}
        best = max(fit, key=fit.get)
        crit = []
        for c in DampingCriterion:
            med = np.median([np.median(list(r["criteria"][c.value]["damping"].values())) for r in runs])
            crit.append(f"{med:.3g} → {np.mean([np.mean(r['criteria'][c.value]['eval']) for r in runs]):.3f}")
        for objective in objectives:
            chosen = [max(SWEEP, key=lambda d: r["sweep objectives"][f"{d:g}"][objective]) for r in runs]
            crit.append(f"{np.median(chosen):g} → {np.mean([r['sweep'][f'{d:g}'][1] for r, d in zip(runs, chosen)]):.3f}")
        lines.append(f"| {name} | " + " | ".join(f"{sweep[d]:.3f}" for d in SWEEP) + f" | {best:g} ({sweep[best]:.3f}) | "
                     + " | ".join(crit) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/work/runs/quality"), help="work folder (caches, results)")
    parser.add_argument("--tasks", nargs="+", default=None, help="built-in task names (default: all with LDS)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--models", type=int, default=0, help="retrained models M (0: 32 for LMs, 64 otherwise)")
    parser.add_argument("--runs", type=int, default=1, help="training runs per subset R (averaged; R >= 2: ceiling)")
    parser.add_argument("--workers", type=int, default=1, help="retraining processes")
    parser.add_argument("--proj-dim", type=int, default=256, help="per module block (the featurize default)")
    parser.add_argument("--learn-option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="a LearnConfig field for one learned method (repeatable), e.g. ssl:regularization=1")
    parser.add_argument("--results", type=Path, default=None, help="results JSON (default OUT/results.json)")
    args = parser.parse_args()
    args.learn_options = {}
    for item in args.learn_option:
        method, _, pair = item.partition(":")
        key, _, value = pair.partition("=")
        try:
            value = json.loads(value)
        except ValueError:
            pass
        args.learn_options.setdefault(method, {})[key] = value
    torch.set_num_threads(1)
    started = time.perf_counter()
    names = args.tasks or default_tasks()
    results = {label(name): run_task(name, args) for name in names}
    text = tables(results)
    print("\n" + text)
    print(f"\ntasks {', '.join(names)}; seeds {args.seeds}; learn options {args.learn_options or 'default'}; "
          f"total {time.perf_counter() - started:.0f}s")
    path = args.results or args.out / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = {name: [{k: v for k, v in run.items() if not k.startswith("_")} for run in runs]
            for name, runs in results.items()}  # predictions and measurements stay out of the JSON
    path.write_text(json.dumps(cell_safe({"args": {k: str(v) for k, v in vars(args).items()}, "results": kept})))


if __name__ == "__main__":
    main()
