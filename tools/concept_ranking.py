"""``bench_concepts.py --ranking``: concept attribution ranked over the whole training set, against baselines.

For the sparse-caption tasks (``diffusion-text-sparse``, ``diffusion-text-sparse-lora``: the
training captions name the style in 30 % and the background in 20 % of the images), per seed s:

1. train the task's model with seed s (cached) and featurize its training set once per concept
   measurement in --measures (``contrast``: today's m_c; ``denoise``: the loss under the full
   and the concept-neutral prompt, see gradindex/tasks/diffusion_text.py), projection seed s;
2. two query sets: **prompted** — generations of the withheld subject × style combinations ×
   every background (--eval-repeats times, seed s; the prompt names all three) — and
   **image-only** — --image-queries held-out images with a caption that names nothing;
3. every scorer ranks the whole training set for every query and concept: caption keyword
   match (the training captions naming the query prompt's value first, ties at random, seed s),
   pixel-space and random-conv-feature nearest neighbours, and per measurement the gradient
   partition with uniform weights and with weights learned by each of --methods (from
   --learn-queries generations of prompts naming only the concept, seed 1000 + s, unlabeled;
   --learn-captions none: the same generations with a caption that names nothing);
4. per query and concept: average precision, precision@10, recall@10 / 100 / |G| of the
   training images sharing the query's value (:mod:`gradindex.eval.ranking`), over all training
   images and over those whose caption does not name the value (``unnamed``: what caption search
   cannot find; empty for the subject, which every caption names).

Tables: mean ± std over seeds of the per-seed means.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from gradindex.config import FeaturizeConfig, IndexConfig, LearnConfig, LearnMethod, ProjectionConfig
from gradindex.eval.baselines import caption_scores, pixel_scores, random_feature_scores
from gradindex.eval.ranking import concept_relevance, dense_scores, mean_metrics, ranking_metrics
from gradindex.features.run import featurize
from gradindex.index import build_index
from gradindex.query.attributor import Attributor
from gradindex.task import load_task
from gradindex.weights.group_weights import GroupWeights
from gradindex.weights.learn import learn_weights

RANKING_TASKS = ("diffusion-text-sparse", "diffusion-text-sparse-lora")
MEASURES = ("contrast", "denoise")
BASELINES = ("caption", "pixels", "random-conv")
KS = (10, 100)
SUBSETS = ("all", "unnamed")


def run_ranking_seed(task_name: str, seed: int, root: Path, args) -> dict:
    """``{(query set, concept, scorer, subset): {metric: mean}}`` of one task and seed."""
    started = time.perf_counter()
    task = load_task(task_name, {**args.task_option, "seed": seed})
    model = task.load_model(None)
    dataset = task.train_dataset()
    train_meta = task.metadata(dataset)
    query_sets = {"prompted": task.generate(model, task.heldout_prompts() * args.eval_repeats, seed=seed),
                  "image-only": task.image_queries(args.image_queries, seed=seed)}
    scores = {}  # (query set, concept, scorer) -> [n, N] in training order
    for name, queries in query_sets.items():
        pixels = pixel_scores(queries.images, dataset.images)
        features = random_feature_scores(queries.images, dataset.images, seed=seed)
        query_meta = task.metadata(queries)
        for column, concept in enumerate(task.concepts):
            asked = np.where(queries.named[:, column], query_meta[concept], "")
            scores[(name, concept, "caption")] = caption_scores(train_meta[concept], dataset.named[:, column], asked,
                                                                seed)
            scores[(name, concept, "pixels")] = pixels
            scores[(name, concept, "random-conv")] = features
    diagnostic = {}
    for measure in args.measures:
        scores.update(gradient_scores(task_name, seed, measure, root, query_sets, args, diagnostic))
    results = {}
    for (name, concept, scorer), block in scores.items():
        column = task.concepts.index(concept)
        relevant = concept_relevance(train_meta[concept], task.metadata(query_sets[name])[concept])
        for subset in SUBSETS:
            candidates = None if subset == "all" else ~dataset.named[:, column]
            metrics = ranking_metrics(block, relevant, candidates, KS)
            summary = mean_metrics(metrics)
            keep = np.ones(len(dataset), bool) if candidates is None else candidates
            summary["chance"] = float(np.mean((relevant & keep).sum(1) / max(1, keep.sum())))
            results[(name, concept, scorer, subset)] = summary
    print(f"{task_name} seed {seed}: " + ", ".join(
        f"{c}/{s} {results[('image-only', c, s, 'unnamed')]['ap']:.2f}" for c in task.concepts[1:]
        for s in ("caption", "pixels", "random-conv", *scorer_names(args)))
        + f" (image-only mAP, unnamed; {time.perf_counter() - started:.0f}s)", flush=True)
    results["diagnostic"] = diagnostic
    return results


def gradient_scores(task_name: str, seed: int, measure: str, root: Path, query_sets: dict, args,
                    diagnostic: dict) -> dict:
    """Dense gradient scores per (query set, concept, scorer) of one concept measurement's store;
    with ``args.diagnostic``, ``diagnostic[(measure, query set, concept, group)]`` = mAP over the unnamed
    training images (all of them for the subject) of each group's uniform-partition scores alone."""
    task = load_task(task_name, {**args.task_option, "seed": seed, "concept_measure": measure})
    model = task.load_model(None)
    store = featurize(task, root / f"{task_name}-{seed}-{measure}", FeaturizeConfig(projection=ProjectionConfig(
        seed=seed)), overwrite=True, show_progress=False)
    train_ids, _ = store.read_metadata()
    order = np.argsort(train_ids)  # ids are training positions: dense columns in training order
    out = {}
    for concept in task.concepts:
        learn_queries = None
        for variant in ("uniform", *args.methods):
            if variant == "uniform":
                weights = GroupWeights.uniform(concept, store.groups)
            else:
                if learn_queries is None:
                    prompts = task.concept_prompts(concept, args.learn_queries, seed=1000 + seed)
                    learn_queries = task.generate(model, prompts, seed=1000 + seed)
                    if args.learn_captions == "none":  # the same generations, their captions naming nothing
                        learn_queries = type(learn_queries)(
                            learn_queries.images, learn_queries.labels, learn_queries.templates, learn_queries.keys,
                            task.prompter, np.zeros(learn_queries.labels.shape, dtype=bool))
                weights = learn_weights(store, LearnConfig(method=LearnMethod(variant), seed=seed),
                                        queries=learn_queries, concept=concept, save=False, show_progress=False)
            build_index(store, IndexConfig(concept=concept), weights=weights, show_progress=False)
            attributor = Attributor.open(store, concept=concept)
            if variant == "uniform" and args.diagnostic:
                diagnostic.update(group_ranking(store, attributor, query_sets, task, concept, measure))
            for name, queries in query_sets.items():
                top = attributor.attribute(queries, k=store.num_samples)
                block = dense_scores(top, train_ids)[:, order]
                out[(name, concept, scorer_name(variant, measure))] = np.nan_to_num(block, neginf=-1e30)
            attributor.close()
    return out


def group_ranking(store, attributor: Attributor, query_sets: dict, task, concept: str, measure: str) -> dict:
    """``{(measure, query set, concept, group): mAP}`` of each group's scores alone (uniform partition),
    over the training images whose caption does not name the concept (all of them where every caption does)."""
    ids, features = store.read()
    column = task.concepts.index(concept)
    dataset = task.train_dataset()
    train_values = task.metadata(dataset)[concept][np.asarray(ids)]
    unnamed = ~dataset.named[np.asarray(ids), column]
    candidates = unnamed if unnamed.any() else None
    out = {}
    for name, queries in query_sets.items():
        relevant = concept_relevance(train_values, task.metadata(queries)[concept])
        vectors = attributor.query_vectors(queries)
        start = 0
        for group in store.groups:
            stop = start + store.group_dims[group]
            block = vectors[:, start:stop] @ np.asarray(features[group], dtype=np.float32).T
            out[(measure, name, concept, group)] = mean_metrics(ranking_metrics(block, relevant, candidates, KS))["ap"]
            start = stop
    return out


def diagnostic_table(per_seed: list[dict], concepts, args) -> list[str]:
    """Per group: mAP of its scores alone (unnamed training images), mean over seeds, per measure and query set."""
    keys = [key for key in per_seed[0]["diagnostic"]]
    groups = list(dict.fromkeys(key[3] for key in keys))
    columns = [(m, q, c) for m in args.measures for q in ("prompted", "image-only") for c in concepts]
    lines = ["| group | " + " | ".join(f"{c} {q} {m}" for m, q, c in columns) + " |", "|---|" + "---|" * len(columns)]
    for group in groups:
        lines.append(f"| {group} | " + " | ".join(
            f"{np.mean([r['diagnostic'][(m, q, c, group)] for r in per_seed]):.2f}" for m, q, c in columns) + " |")
    return lines


def load_results(paths: list[str]) -> dict[str, list[dict]]:
    """``{task: [per-seed results]}`` from ``--json`` files of earlier ``--ranking`` runs (seeds concatenated)."""
    out: dict[str, list[dict]] = {}
    for path in paths:
        for task_name, seeds in json.loads(Path(path).read_text()).items():
            for entry in seeds:
                results = {}
                for key, value in entry["results"].items():
                    parts = key.split("/")  # query set / concept / scorer (may hold "/") / subset
                    results[(parts[0], parts[1], "/".join(parts[2:-1]), parts[-1])] = value
                results["diagnostic"] = {tuple(key.split("/")): value for key, value in entry["diagnostic"].items()}
                out.setdefault(task_name, []).append(results)
    return out


def scorer_name(variant: str, measure: str) -> str:
    return variant if measure == "contrast" else f"{variant}/{measure}"


def scorer_names(args) -> list[str]:
    return [scorer_name(v, m) for m in args.measures for v in ("uniform", *args.methods)]


def ranking_tables(task_name: str, per_seed: list[dict], concepts, args) -> list[str]:
    """Markdown tables (one per query set and metric) of mean ± std over seeds."""
    scorers = [*BASELINES, *scorer_names(args)]
    lines = []
    for name in ("prompted", "image-only"):
        for metric, title in (("ap", "mean average precision"), ("precision@10", "precision@10"),
                              ("recall@100", "recall@100"), ("recall@G", "recall@|G|")):
            lines += [f"\n{task_name}, {name} queries: {title}, mean ± std over seeds {args.seeds}",
                      f"| concept | training images | chance | {' | '.join(scorers)} |",
                      "|" + "---|" * (3 + len(scorers))]
            for concept in concepts:
                for subset in SUBSETS:
                    cells = [_cell([r[(name, concept, s, subset)][metric] for r in per_seed]) for s in scorers]
                    chance = _cell([r[(name, concept, "caption", subset)]["chance"] for r in per_seed], spread=False)
                    lines.append(f"| {concept} | {subset} | {chance} | " + " | ".join(cells) + " |")
    return lines


def _cell(values: list[float], spread: bool = True) -> str:
    values = np.array(values, dtype=np.float64)
    if np.isnan(values).all():
        return "–"
    return f"{np.nanmean(values):.2f}" + (f" ± {np.nanstd(values):.2f}" if spread else "")
