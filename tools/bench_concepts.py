"""Concept precision@10 and recall@10 on held-out-combination generations, per task, per weighting.

Tasks (``--tasks``): ``diffusion`` with its conditioning-embedding groups excluded (the
group rules ``subject.*=-``, ``style.*=-``, ``background.*=-``: no group whose gradient
only training images carrying one token reach), ``diffusion-text`` (frozen prompt
encoder, cross-attention) and ``diffusion-text-lora`` (LoRA fine-tuning set, LoRA groups
only). For each seed s (model training, projection, query generations):

1. train the task's default model with seed s (cached under $GRADINDEX_HOME) and
   featurize its training set (projection seed s);
2. per concept c, generate --learn-queries images of prompts that specify **only c**
   (the other factors null / neutral words; seeded) — the queries c's weights are
   learned from, unlabeled: the agreement objective uses the prompts, never a training label
   (--learn-prompts random: one set of random full prompts for every concept, as the first
   version of this bench did);
3. generate the evaluation queries: every withheld subject × style combination × every
   background, --eval-repeats times, i.e. combinations the model never saw;
4. per concept c, one partition per weighting, queried with m_c: uniform weights, and
   weights learned by each of --methods (``snr``, ``ssl`` where learn.py has it,
   ``agreement``). precision@k = the fraction of a query's top-k training images whose
   factor c equals the query's prompt value; recall@k = those hits over min(k, training
   images with that value); chance = the training frequency of the value.

--keep-embeddings keeps the diffusion task's embedding groups (the first version's setting).

Prints per task the mean ± std over seeds of the per-seed mean precision (then recall),
writes every number as JSON (--json) and, with --plot, each task's first-seed agreement
weights; --diagnostic adds each group's own precision@k per concept (labels: a diagnostic).

    python tools/bench_concepts.py [--tasks diffusion diffusion-text diffusion-text-lora] [--seeds 0 1 2]

--ranking: the sparse-caption benchmark instead (tools/concept_ranking.py): average precision and
recall@k over the whole training set, also over the training images whose caption does not name
the query's value, for caption search, image-similarity baselines and the gradient partitions,
on prompted and image-only queries:

    python tools/bench_concepts.py --ranking [--tasks diffusion-text-sparse diffusion-text-sparse-lora]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from gradindex.config import FeaturizeConfig, GroupRule, IndexConfig, LearnConfig, LearnMethod, ProjectionConfig
from gradindex.eval.evaluate import concept_precision, concept_recall
from gradindex.features.run import featurize
from gradindex.index import build_index
from gradindex.weights.learn import learn_weights
from gradindex.query.attributor import Attributor
from gradindex.eval.report import write_weights_chart
from gradindex.task import load_task
from gradindex.weights.group_weights import GroupWeights

TASKS = ("diffusion", "diffusion-text", "diffusion-text-lora")
RANKING_TASKS = ("diffusion-text-sparse", "diffusion-text-sparse-lora")
#: the diffusion task's per-factor embedding rows: excluded so that no group belongs to one concept value
EMBEDDING_RULES = {"diffusion": ("subject.*=-", "style.*=-", "background.*=-")}
METHODS = tuple(m.value for m in LearnMethod if m is not LearnMethod.AUTO)


def run_seed(task_name: str, seed: int, root: Path, args) -> tuple[dict, dict, dict]:
    started = time.perf_counter()
    task = load_task(task_name, {**args.task_option, "seed": seed})
    model = task.load_model(None)
    rules = () if args.keep_embeddings else tuple(GroupRule.parse(r) for r in EMBEDDING_RULES.get(task_name, ()))
    config = FeaturizeConfig(projection=ProjectionConfig(seed=seed), group_rules=rules)
    store = featurize(task, root / f"{task_name}-{seed}", config, overwrite=True, show_progress=False)
    eval_queries = task.generate(model, task.heldout_prompts() * args.eval_repeats, seed=seed)
    train_ids, train_meta = store.read_metadata()
    query_meta = task.metadata(eval_queries)
    results, weights, diagnostic = {}, {}, {}
    random_queries = None
    if args.learn_prompts == "random":
        random_queries = task.sample_queries(model, args.learn_queries, seed=1000 + seed)
    for concept in task.concepts:
        learn_queries = random_queries
        if learn_queries is None:
            prompts = task.concept_prompts(concept, args.learn_queries, seed=1000 + seed)
            learn_queries = task.generate(model, prompts, seed=1000 + seed)
        for variant in ("uniform", *args.methods):
            if variant == "uniform":
                w = GroupWeights.uniform(concept, store.groups)
            else:
                w = learn_weights(store, LearnConfig(method=LearnMethod(variant), seed=seed), queries=learn_queries,
                                  concept=concept, save=False, show_progress=False)
            weights[(concept, variant)] = w
            build_index(store, IndexConfig(concept=concept), weights=w, show_progress=False)
            attributor = Attributor.open(store, concept=concept)
            top = attributor.attribute(eval_queries, k=args.k)
            attributor.close()
            precision, chance = concept_precision(top, train_ids, train_meta[concept], query_meta[concept], args.k)
            recall = concept_recall(top, train_ids, train_meta[concept], query_meta[concept], args.k)
            results[(concept, variant)] = float(precision.mean())
            results[(concept, variant, "recall")] = float(recall.mean())
            results[(concept, "chance")] = float(chance.mean())
    if args.diagnostic:
        from concept_groups import group_precision

        diagnostic = group_precision(store, eval_queries, args.k)
    variants = ("uniform", *args.methods)
    print(f"{task_name} seed {seed}: " + ", ".join(f"{c}/{v} {results[(c, v)]:.2f}" for c in task.concepts
                                                  for v in variants)
          + f" ({time.perf_counter() - started:.0f}s)", flush=True)
    return results, weights, diagnostic


def table(per_seed: list[dict], concepts, variants, k: int, what: str = "") -> list[str]:
    lines = [f"| concept | chance | {' | '.join(variants)} |", "|" + "---|" * (2 + len(variants))]
    for concept in concepts:
        cells = [f"{np.mean([r[(concept, 'chance')] for r in per_seed]):.2f}"]
        for variant in variants:
            values = np.array([r[(concept, variant, what) if what else (concept, variant)] for r in per_seed])
            cells.append(f"{values.mean():.2f} ± {values.std():.2f}")
        lines.append(f"| {concept} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=None, choices=TASKS + RANKING_TASKS,
                        help=f"default: {' '.join(TASKS)} (--ranking: {' '.join(RANKING_TASKS)})")
    parser.add_argument("--ranking", action="store_true",
                        help="rank the whole training set, with baselines (sparse-caption tasks)")
    parser.add_argument("--measures", nargs="+", default=["contrast", "denoise"], choices=("contrast", "denoise"),
                        help="--ranking: the concept measurements to featurize the queries with")
    parser.add_argument("--image-queries", type=int, default=40, help="--ranking: held-out image-only queries")
    parser.add_argument("--tables", nargs="+", default=None, metavar="JSON",
                        help="--ranking: print the tables of earlier runs' --json files (their seeds pooled) and exit")
    parser.add_argument("--learn-captions", choices=("named", "none"), default="named",
                        help="--ranking: learn from the generations with their prompts (default) or captions naming "
                             "nothing")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=[m for m in ("snr", "ssl", "agreement") if m in METHODS],
                        choices=METHODS)
    parser.add_argument("--learn-queries", type=int, default=120, help="generations per concept to learn from")
    parser.add_argument("--learn-prompts", choices=("concept", "random"), default="concept",
                        help="learn from prompts naming only the concept (default) or random full prompts")
    parser.add_argument("--keep-embeddings", action="store_true", help="keep the diffusion task's embedding groups")
    parser.add_argument("--eval-repeats", type=int, default=2, help="generations per held-out prompt")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--out", default=None, help="keep the stores here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write every per-seed number here")
    parser.add_argument("--plot", default=None,
                        help="PNG of the first seed's agreement weights (several tasks: NAME-TASK.png)")
    parser.add_argument("--diagnostic", action="store_true", help="each group's own precision@k (uses labels)")
    parser.add_argument("--task-option", nargs="*", default=[], metavar="KEY=VALUE",
                        help="options for every task (a smoke run: num_train=64 steps=20 width=16 depth=1)")
    args = parser.parse_args()
    args.task_option = {key: json.loads(value) for key, _, value in (o.partition("=") for o in args.task_option)}
    if args.tasks is None:
        args.tasks = list(RANKING_TASKS if args.ranking else TASKS)
    if args.ranking:
        return ranking_main(args)
    # each partition is built from weights passed in, never saved to the store: not a stale index
    logging.getLogger("gradindex.query.attributor").setLevel(logging.ERROR)

    report, dump = [], {}
    with work_root(args) as root:
        for task_name in args.tasks:
            per_seed, diagnostics = [], []
            concepts = load_task(task_name, args.task_option).concepts
            for seed in args.seeds:
                results, weights, diagnostic = run_seed(task_name, seed, root, args)
                per_seed.append(results)
                diagnostics.append(diagnostic)
                if args.plot and seed == args.seeds[0] and "agreement" in args.methods:
                    groups = list(weights[(concepts[0], "agreement")].weights)
                    path = Path(args.plot)
                    if len(args.tasks) > 1:
                        path = path.with_name(f"{path.stem}-{task_name}{path.suffix}")
                    write_weights_chart(path, [weights[(c, "agreement")] for c in concepts], groups)
                    print(f"wrote {path}")
                dump.setdefault(task_name, []).append({
                    "seed": seed, "results": {"/".join(key): value for key, value in results.items()},
                    "weights": {f"{c}/{v}": w.weights for (c, v), w in weights.items()},
                    "diagnostic": diagnostic})
            variants = ("uniform", *args.methods)
            report += [f"\n{task_name}: precision@{args.k} on held-out-combination generations, "
                       f"mean ± std over seeds {args.seeds}", *table(per_seed, concepts, variants, args.k),
                       f"\n{task_name}: recall@{args.k}", *table(per_seed, concepts, variants, args.k, "recall")]
            if args.diagnostic:
                report += [f"\n{task_name}: each group alone, precision@{args.k} (mean over seeds)",
                           "| group | " + " | ".join(concepts) + " |", "|---|" + "---|" * len(concepts)]
                for group in diagnostics[0][concepts[0]]:
                    report.append(f"| {group} | " + " | ".join(
                        f"{np.mean([d[c][group] for d in diagnostics]):.2f}" for c in concepts) + " |")
    finish(report, dump, args)


@contextlib.contextmanager
def work_root(args):
    """The folder the runs write to: ``--out`` (kept) or a temporary one (removed after)."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out) if args.out else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        yield root


def finish(report: list[str], dump: dict, args) -> None:
    """Print the tables; with ``--json`` also write the raw results."""
    print("\n".join(report))
    if args.json:
        Path(args.json).write_text(json.dumps(dump, indent=1))
        print(f"wrote {args.json}")


def ranking_main(args) -> None:
    from concept_ranking import diagnostic_table, load_results, ranking_tables, run_ranking_seed

    if args.tables:
        for task_name, per_seed in load_results(args.tables).items():
            concepts = load_task(task_name, args.task_option).concepts
            args.seeds = list(range(len(per_seed)))
            print("\n".join([f"{task_name}: {len(per_seed)} seeds from {' '.join(args.tables)}",
                             *ranking_tables(task_name, per_seed, concepts, args)]))
        return

    logging.getLogger("gradindex.query.attributor").setLevel(logging.ERROR)
    report, dump = [], {}
    with work_root(args) as root:
        for task_name in args.tasks:
            per_seed = [run_ranking_seed(task_name, seed, root, args) for seed in args.seeds]
            dump[task_name] = [{"seed": seed, "results": {"/".join(key): value for key, value in results.items()
                                                          if key != "diagnostic"},
                                "diagnostic": {"/".join(key): value for key, value in results["diagnostic"].items()}}
                               for seed, results in zip(args.seeds, per_seed)]
            concepts = load_task(task_name, args.task_option).concepts
            report += ranking_tables(task_name, per_seed, concepts, args)
            if args.diagnostic:
                report += [f"\n{task_name}: each group alone (uniform partition), mAP over the unnamed training "
                           "images (subject: all), mean over seeds", *diagnostic_table(per_seed, concepts, args)]
    finish(report, dump, args)


if __name__ == "__main__":
    main()
