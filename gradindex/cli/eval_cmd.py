"""``gradindex eval lds``, ``eval recall`` and ``eval precision``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gradindex.config import DEFAULT_DAMPING, LDSConfig
from gradindex.cli.app import main
from gradindex.cli.options import (
    DAMPING,
    LDS_DEFAULTS,
    STORE_LOCATION,
    apply_options,
    concept_option,
    device_option,
    echo_table,
    inputs_option,
    progress_enabled,
    query_set,
    search_config,
    search_options,
    shared_option,
    split_option,
    trust_options,
)


@main.group("eval")
def eval_group() -> None:
    """Attribution quality: LDS, concept precision@k; index recall@k."""


@eval_group.command("lds")
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of retrained models and measurements (default: STORE/lds); reruns reuse it.")
@click.option("--models", "num_models", type=int, default=LDS_DEFAULTS.num_models, show_default=True,
              help="Subset masks M (each trained --runs-per-subset times).")
@click.option("--runs-per-subset", "runs", type=int, default=LDS_DEFAULTS.runs_per_subset, show_default=True,
              help="Training runs R per subset (training seeds); their measurements are averaged, and with R >= 2 "
                   "the ceiling this ground truth allows is printed beside the LDS.")
@click.option("--bootstrap", "replicates", type=click.IntRange(min=0), default=200, show_default=True,
              help="Bootstrap replicates over models and queries for the SE column (0 or 1: none).")
@click.option("--fraction", type=float, default=LDS_DEFAULTS.fraction, show_default=True, help="Subset fraction alpha.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subsets (and training seeds).")
@click.option("--training-seed", type=int, default=None,
              help="Train every model with this seed (default: a seed per model).")
@click.option("--workers", type=int, default=2, show_default=True, help="Training processes.")
@inputs_option
@split_option
@concept_option
@click.option("--damping", type=DAMPING, default=DEFAULT_DAMPING, show_default=True,
              help="Gram damping of the uniform and single-group rows (a number or 'auto').")
@click.option("--preconditioner", "factor_settings", type=click.Choice(["kfac", "ekfac"]), multiple=True,
              help="Also the rows of K-FAC / EK-FAC at --damping (repeatable; factors fitted on first use).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@device_option
@apply_options(trust_options)
@click.pass_context
def eval_lds(ctx, store_path, cache, num_models, runs, replicates, fraction, seed, training_seed, workers, inputs, split,
             concept, damping, factor_settings, as_json, device, trust_task, task_spec) -> None:
    """LDS of STORE's attributions (uniform, each group alone, learned) against retrained models."""
    from gradindex.config import MAX_WORKERS, parse_damping, require_positive
    from gradindex.devices import resolve_device
    from gradindex.eval.lds import lds_report, retrain
    from gradindex.features.query import check_concept, load_store_task
    from gradindex.store.feature_store import FeatureStore
    from gradindex.task import require_training_routine

    config = LDSConfig(num_models=num_models, fraction=fraction, seed=seed, training_seed=training_seed,
                       runs_per_subset=runs)
    damping = parse_damping(damping, "--damping")
    require_positive(workers, "--workers", maximum=MAX_WORKERS)
    resolve_device(device, "--device")
    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    task = load_store_task(store)
    check_concept(task, concept)
    require_training_routine(task, "eval lds")  # up front: before any model is trained
    queries, measured, positions, where = query_set(task, inputs, split, "eval")
    retrained = retrain(task, cache or store.local_dir("lds"), config, queries_file=inputs, workers=workers,
                        show_progress=progress_enabled(ctx), queries=measured)
    if positions is not None:  # the cache measures every default query; keep the split's
        retrained = retrained.queries(positions)
    rows = lds_report(store, retrained, queries, concept=concept, damping=damping, device=device,
                      replicates=replicates, factor_settings=factor_settings)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    echo_table([_table_row(row) for row in rows])
    ceiling = retrained.ceiling(concept)
    click.echo(f"LDS over {where} and {num_models} subsets x {runs} run(s) trained on {fraction:g} of the data "
               f"(concept {concept!r}); se = bootstrap over models and queries ({replicates} replicates), "
               "sem_q = over queries alone")
    click.echo(f"ceiling {ceiling[1]:.3f} (split-half reliability of the {runs}-run average "
               f"{ceiling[0]:.3f}, Spearman-Brown corrected; no estimator is expected above it)" if ceiling else
               "ceiling: unknown with one run per subset (--runs-per-subset 2 or more measures it)")


def _table_row(row: dict) -> dict:
    out = {"attribution": row["attribution"], "preconditioner": row["preconditioner"],
           "damping": "" if row["damping"] is None else row["damping"], "lds": row["lds"], "se": row["se"],
           "sem_q": row["sem_queries"], "- uniform (paired)": ""}
    if "minus_uniform" in row:
        out["- uniform (paired)"] = f"{row['minus_uniform']:+.4f} ± {row['minus_uniform_se']:.4f}"
    return out


@eval_group.command("recall")
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--concept", default="all", show_default=True, help="Concept partition to evaluate.")
@click.option("-k", type=click.IntRange(min=1), default=10, show_default=True, help="Top-k depth.")
@click.option("--inputs", type=click.Path(path_type=Path), default=None,
              help="Query inputs file (default: the task's own held-out queries).")
@click.option("--queries", "num_queries", type=click.IntRange(min=1), default=None,
              help="Use only the first N queries.")
@click.option("--target-recall", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Also print the cheapest knobs reaching this recall@k on these queries (0 = don't).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@apply_options(search_options)
@shared_option
@device_option
@apply_options(trust_options)
def eval_recall(store_path, concept, k, inputs, num_queries, target_recall, as_json, nprobe, ef_search, rerank,
                no_prune, max_probe, no_adaptive, exact_certified, shared, device, trust_task, task_spec) -> None:
    """recall@k of an index partition against exact search over the same store: the mean, the
    5th-percentile and worst query, the share of queries the search certified exact, and the mean
    rows scored exactly per query (--json: also cells scanned and the share of queries under 0.8)."""
    from gradindex.eval.evaluate import index_recall
    from gradindex.features.query import load_store_task
    from gradindex.store.feature_store import FeatureStore

    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    queries = load_store_task(store).load_queries(inputs) if inputs is not None else None
    search = search_config(nprobe, ef_search, rerank, no_prune, max_probe, no_adaptive, exact_certified)
    result = index_recall(store, concept, queries=queries, k=k, device=device, num_queries=num_queries,
                          search=search if search.to_dict() != type(search)().to_dict() else None, shared=shared,
                          target=target_recall or None)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    from gradindex.index.calibrate import knob_text

    echo_table([{"concept": result.concept, "kind": result.kind, "vectors": result.ntotal,
                  "queries": result.queries, "knobs": knob_text(result.search, result.kind),
                  f"recall@{k}": result.recall, "p5": result.p5, "worst": result.worst, "certified": f"{100 * result.certified:.0f}%",
                  "rows reranked": round(result.rows_reranked)}])
    if result.knobs is not None:
        verdict = "reach" if result.reached else "do NOT reach (the largest setting tried)"
        click.echo(f"knobs that {verdict} recall@{k} {result.target} on these queries: "
                   f"{knob_text(result.knobs, result.kind)} (recall {result.knobs_recall:.4g})")


@eval_group.command("precision")
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--inputs", type=click.Path(path_type=Path), default=None,
              help="Query inputs file carrying the concepts' values (default: the task's own queries).")
@click.option("--concept", "concepts", multiple=True,
              help="Concept partition to evaluate; repeatable (default: every built concept partition).")
@click.option("-k", type=click.IntRange(min=1), default=10, show_default=True, help="Top-k depth.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per concept.")
@device_option
@apply_options(trust_options)
def eval_precision(store_path, inputs, concepts, k, as_json, device, trust_task, task_spec) -> None:
    """Concept precision@k: the fraction of a query's top-k training examples that share its
    value of the concept (DESIGN §4), with the chance level of a random top-k beside; and
    recall@k: those hits over min(k, training examples sharing the value)."""
    from gradindex.eval.evaluate import evaluate_precision
    from gradindex.features.query import load_store_task
    from gradindex.store.feature_store import FeatureStore

    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    queries = load_store_task(store).load_queries(inputs) if inputs is not None else None
    rows = [result.to_dict() for result in evaluate_precision(store, queries, concepts, k=k, device=device)]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    echo_table([{"concept": r["concept"], "queries": r["queries"], f"precision@{k}": r["precision"],
                  "std": r["std"], f"recall@{k}": r["recall"], "chance": r["chance"]} for r in rows])
