"""``gradindex learn-weights`` and ``gradindex weights plot``."""

from __future__ import annotations

from pathlib import Path

import click

from gradindex.config import ExampleNorm, GroupNorm, LearnConfig, LearnMethod
from gradindex.errors import ConfigError
from gradindex.cli.app import main
from gradindex.cli.options import (
    LEARN_DEFAULTS,
    STORE_LOCATION,
    apply_options,
    concept_option,
    damping_text,
    device_option,
    echo_table,
    inputs_option,
    objective_text,
    preconditioner_options,
    progress_enabled,
    query_set,
    split_option,
    trust_options,
)


@main.command("learn-weights")
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@concept_option
@inputs_option
@split_option
@apply_options(preconditioner_options)
@click.option("--queries", "num_queries", type=int, default=LEARN_DEFAULTS.num_queries, show_default=True,
              help="Queries used (a seeded sample of the inputs).")
@click.option("--reference-size", type=int, default=LEARN_DEFAULTS.reference_size, show_default=True,
              help="Training examples scored per query (a seeded sample of the store).")
@click.option("--top-k", type=int, default=LEARN_DEFAULTS.top_k, show_default=True, help="k of the SNR's top-k signal.")
@click.option("--example-norm", type=click.Choice([n.value for n in ExampleNorm]), default=LEARN_DEFAULTS.example_norm.value,
              show_default=True, help="What is done to each training example's scores across the queries "
                                      "(auto: none for --method ssl, as in the paper; standardize otherwise).")
@click.option("--group-norm", type=click.Choice([n.value for n in GroupNorm]), default=LEARN_DEFAULTS.group_norm.value,
              show_default=True, help="rms: groups scaled to unit rms, shares pulled (KL) to equal shares; none: raw "
                                      "scores, weights pulled by λ‖w‖² to uniform (auto: none for --method ssl, as in "
                                      "the paper; rms otherwise).")
@click.option("--regularization", type=float, default=LEARN_DEFAULTS.regularization, show_default=True,
              help="Strength of the pull: KL to equal shares (--group-norm rms) or λ‖w‖² (none).")
@click.option("--steps", type=int, default=LEARN_DEFAULTS.steps, show_default=True, help="Adam steps.")
@click.option("--lr", type=float, default=LEARN_DEFAULTS.lr, show_default=True, help="Adam learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the query and reference samples.")
@click.option("--method", type=click.Choice([m.value for m in LearnMethod]), default=LEARN_DEFAULTS.method.value,
              show_default=True,
              help="Objective: snr (each query's top-k stands out of its scores), ssl (the paper's normalised "
                   "top-k mean with weights on the query side), agreement (queries sharing the concept's value "
                   "share their top-k; needs the queries' values); auto: agreement for a concept when possible, "
                   "else snr.")
@click.option("--reset", is_flag=True,
              help="Forget the concept's learned weights (every setting): it is uniform again; then build-index.")
@device_option
@apply_options(trust_options)
@click.pass_context
def learn_weights_command(ctx, store_path, concept, inputs, split, preconditioner, damping, num_queries,
                          reference_size, top_k, example_norm, group_norm, regularization, steps, lr, seed, method, reset, device,
                          trust_task, task_spec) -> None:
    """Learn STORE's per-group weights for a concept from unlabeled queries (kept per preconditioner
    and damping; the concept 'uniform' is reserved for uniform weights)."""
    from gradindex.config import UNIFORM_CONCEPT
    from gradindex.weights.learn import learn_weights
    from gradindex.features.query import load_store_task
    from gradindex.store.feature_store import FeatureStore
    from gradindex.weights.group_weights import reset_weights

    if concept == UNIFORM_CONCEPT:
        raise ConfigError(f"concept {UNIFORM_CONCEPT!r} is reserved: its weights are always uniform; learn weights for "
                          "'all' or one of the task's concepts")
    config = LearnConfig(preconditioner=preconditioner, damping=damping, num_queries=num_queries,
                         reference_size=reference_size, top_k=top_k, example_norm=example_norm, group_norm=group_norm,
                         regularization=regularization, steps=steps, lr=lr, seed=seed, method=method)
    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    if reset:
        removed = reset_weights(store, concept)
        click.echo(f"concept {concept!r}: " + (f"learned weights removed ({', '.join(removed)}); " if removed else
                                              "no learned weights; ") +
                   "it uses uniform weights now (run build-index again for its index)")
        return
    queries, _, _, where = query_set(load_store_task(store), inputs, split, "fit")
    weights = learn_weights(store, config, queries=queries, concept=concept, device=device,
                            show_progress=progress_enabled(ctx), query_source=str(inputs) if inputs else split or "fit")
    info = weights.info
    resolved = info["config"]["damping"]
    click.echo(f"queries: {where}" + (f", {info['num_queries']} sampled" if info["num_queries"] < len(queries) else ""))
    echo_table([{"group": g, "weight": weights.weights[g], "share": info["shares"][g],
                  "uniform share": info["uniform_shares"][g],
                  **({"damping": resolved[g]} if isinstance(resolved, dict) else {})} for g in store.groups])
    click.echo(f"concept {concept!r} ({preconditioner}, damping {damping_text(resolved)}): {objective_text(info)} "
               f"over {info['num_queries']} queries x {info['reference_size']} training examples, "
               f"{info['seconds']:.1f}s; saved in {store.path}/manifest.json")


@main.group("weights")
def weights_group() -> None:
    """Inspect learned group weights."""


@weights_group.command("plot")
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG file to write.")
@click.option("--concept", "concepts", multiple=True,
              help="Concepts to draw (default: every concept with weights, and 'all'); repeatable.")
def weights_plot(store_path, out, concepts) -> None:
    """Draw STORE's group weights as a bar chart, one panel per concept (and learned setting)."""
    from dataclasses import replace

    from gradindex.eval.report import write_weights_chart
    from gradindex.store.feature_store import FeatureStore
    from gradindex.eval.summary import weight_panels

    store = FeatureStore.open(store_path, verify=False)
    panels = [replace(weights, concept=label)
              for label, weights in weight_panels(store.manifest, store.groups, concepts)]
    click.echo(f"wrote {write_weights_chart(out, panels, store.groups)}")
