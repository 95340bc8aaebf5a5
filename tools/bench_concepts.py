"""Concept precision@10 on held-out-combination generations: uniform vs learned (SNR) vs agreement weights.

For each seed s (model training, projection, query generations):

1. train the default ``diffusion`` model with seed s (cached under $GRADINDEX_HOME) and featurize
   its training set (projection seed s);
2. generate --learn-queries images of random prompts (each factor drawn independently,
   seeded) to learn weights from — unlabeled: the agreement objective uses the prompts
   of the generations, never the training labels;
3. generate the evaluation queries: every withheld subject × style combination × every
   background, --eval-repeats times (other seeds), i.e. combinations the model never saw;
4. per concept c, three partitions of the same store, queried with m_c: uniform weights;
   weights learned with the SNR objective (DESIGN §1.3 on ∇m_c); weights learned with the
   top-k agreement objective (DESIGN §1.4). Precision@k = the fraction of a query's top-k
   training images whose factor c equals the query's prompt value; chance = the training
   frequency of that value.

Prints mean ± std over seeds of the per-seed mean precision, and writes the agreement
weights of the first seed as a bar chart (--plot).

    python tools/bench_concepts.py [--seeds 0 1 2] [--plot docs/concept-weights.png]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from gradindex.config import FeaturizeConfig, IndexConfig, LearnConfig, LearnMethod, ProjectionConfig
from gradindex.evaluate import concept_precision
from gradindex.featurize import featurize
from gradindex.index import build_index
from gradindex.learn import learn_weights
from gradindex.query import Attributor
from gradindex.report import write_weights_chart
from gradindex.task import load_task
from gradindex.weights import GroupWeights

VARIANTS = ("uniform", "snr", "agreement")


def run_seed(seed: int, root: Path, args) -> tuple[dict, dict]:
    started = time.perf_counter()
    task = load_task("diffusion", {"seed": seed})
    model = task.load_model(None)
    store = featurize(task, root / f"store-{seed}", FeaturizeConfig(projection=ProjectionConfig(seed=seed)),
                      show_progress=False)
    learn_queries = task.sample_queries(model, args.learn_queries, seed=1000 + seed)
    prompts = task.heldout_prompts() * args.eval_repeats
    eval_queries = task.generate(model, prompts, seed=seed)
    train_ids, train_meta = store.read_metadata()
    query_meta = task.metadata(eval_queries)
    results, weights = {}, {}
    for concept in task.concepts:
        for variant in VARIANTS:
            if variant == "uniform":
                w = GroupWeights.uniform(concept, store.groups)
            else:
                method = LearnMethod.SNR if variant == "snr" else LearnMethod.AGREEMENT
                w = learn_weights(store, LearnConfig(method=method, seed=seed), queries=learn_queries,
                                  concept=concept, save=False, show_progress=False)
            weights[(concept, variant)] = w
            build_index(store, IndexConfig(concept=concept), weights=w, show_progress=False)
            attributor = Attributor.open(store, concept=concept)
            top = attributor.attribute(eval_queries, k=args.k)
            attributor.close()
            precision, chance = concept_precision(top, train_ids, train_meta[concept], query_meta[concept], args.k)
            results[(concept, variant)] = float(precision.mean())
            results[(concept, "chance")] = float(chance.mean())
    print(f"seed {seed}: " + ", ".join(f"{c}/{v} {results[(c, v)]:.2f}" for c in task.concepts for v in VARIANTS)
          + f" ({time.perf_counter() - started:.0f}s)", flush=True)
    return results, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--learn-queries", type=int, default=120)
    parser.add_argument("--eval-repeats", type=int, default=2, help="generations per held-out prompt")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--plot", default=None, help="PNG of the first seed's agreement weights per concept")
    args = parser.parse_args()

    per_seed = []
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            results, weights = run_seed(seed, Path(root), args)
            per_seed.append(results)
            if args.plot and seed == args.seeds[0]:
                concepts = load_task("diffusion").concepts
                groups = list(weights[(concepts[0], "agreement")].weights)
                write_weights_chart(args.plot, [weights[(c, "agreement")] for c in concepts], groups)
                print(f"wrote {args.plot}")
    concepts = load_task("diffusion").concepts
    print(f"\nprecision@{args.k} on held-out-combination generations, mean ± std over seeds {args.seeds}")
    header = f"| concept | chance | {' | '.join(VARIANTS)} |"
    print(header)
    print("|" + "---|" * (2 + len(VARIANTS)))
    for concept in concepts:
        cells = []
        for variant in ("chance", *VARIANTS):
            values = np.array([r[(concept, variant)] for r in per_seed])
            cells.append(f"{values.mean():.2f}" if variant == "chance" else f"{values.mean():.2f} ± {values.std():.2f}")
        print(f"| {concept} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
