"""How many fixed (t, ε) draws per example the diffusion task's attribution loss needs: variance vs cost.

For each R, featurize the first --train training images and --queries generated held-out
queries with R draws per example, score every (query, train) pair (uniform weights, no
preconditioner, the default projection) and compare with a reference of --reference draws:
Pearson correlation of the score matrices, mean overlap of the top-10 sets, and the
featurization throughput (training examples per second). Then featurize the whole training
set with R draws and report concept precision@10 of uniform-weight, Gram-preconditioned
concept partitions on the task's held-out-combination generations. All numbers come from one run.

    flock /tmp/gradindex-bench.lock python tools/diffusion_draws.py [--draws 1 2 4 8] [--reference 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gradindex.config import FeaturizeConfig, IndexConfig, ProjectionConfig
from gradindex.eval.evaluate import evaluate_precision
from gradindex.features.run import featurize
from gradindex.index import build_index
from gradindex.features.run import featurize_rows, resolve_groups
from gradindex.features.gradients import GradientProjector
from gradindex.task import load_task


def scores_and_speed(draws: int, train_rows: int, queries, proj_dim: int, batch_size: int):
    task = load_task("diffusion", {"draws": draws})
    model = task.load_model(None)
    config = FeaturizeConfig(projection=ProjectionConfig(proj_dim=proj_dim))
    groups = resolve_groups(task, model, config)
    device = torch.device("cpu")
    with GradientProjector(model, groups, config.projection) as projector:
        started = time.perf_counter()
        train = featurize_rows(task, model, task.train_dataset(), range(train_rows), projector, batch_size, device)
        seconds = time.perf_counter() - started
        query = featurize_rows(task, model, queries, range(len(queries)), projector, batch_size, device,
                               measurement=task.compute_measurement)
    scores = sum(query[g].astype(np.float64) @ train[g].astype(np.float64).T for g in train)
    return scores, train_rows / seconds, sum(train[g].shape[1] for g in train)


def concept_precision_at(draws: int, root: Path) -> dict[str, float]:
    task = load_task("diffusion", {"draws": draws})
    store = featurize(task, root / f"store-{draws}", show_progress=False)
    for concept in task.concepts:
        build_index(store, IndexConfig(concept=concept), show_progress=False)
    return {r.concept: float(r.precision.mean()) for r in evaluate_precision(store, k=10)}


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    top_a, top_b = np.argsort(-a, axis=1)[:, :k], np.argsort(-b, axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--reference", type=int, default=32)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--proj-dim", type=int, default=256)
    parser.add_argument("--proj-dims", type=int, nargs="*", default=[64, 128, 256],
                        help="also time featurization at these dims (with --speed-draws draws)")
    parser.add_argument("--speed-draws", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-precision", dest="precision", action="store_false",
                        help="skip the whole-training-set precision column")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    task = load_task("diffusion")
    queries = task.sample_queries(task.load_model(None), args.queries, seed=1)
    reference, ref_speed, _ = scores_and_speed(args.reference, args.train, queries, args.proj_dim, args.batch_size)
    print(f"torch threads {torch.get_num_threads()}; {args.train} training images, {len(queries)} held-out "
          f"generations; reference: {args.reference} draws ({ref_speed:.1f} ex/s)")
    print(f"{'draws':>5}  {'ex/s':>7}  {'corr vs ref':>11}  {'top-10 overlap':>14}  "
          "precision@10 subject / style / background (uniform weights, whole training set)")
    with tempfile.TemporaryDirectory() as root:
        for draws in args.draws:
            scores, speed, _ = scores_and_speed(draws, args.train, queries, args.proj_dim, args.batch_size)
            corr = np.corrcoef(scores.ravel(), reference.ravel())[0, 1]
            precision = concept_precision_at(draws, Path(root)) if args.precision else {}
            print(f"{draws:>5}  {speed:>7.1f}  {corr:>11.3f}  {topk_overlap(scores, reference):>14.2f}  "
                  + " / ".join(f"{p:.2f}" for p in precision.values()), flush=True)
    print(f"\nfeaturization speed at {args.speed_draws} draws by projected dimension per module")
    print(f"{'proj_dim':>8}  {'total dim':>9}  {'ex/s':>7}")
    for dim in args.proj_dims:
        _, speed, total = scores_and_speed(args.speed_draws, args.train, queries, dim, args.batch_size)
        print(f"{dim:>8}  {total:>9}  {speed:>7.1f}")


if __name__ == "__main__":
    main()
