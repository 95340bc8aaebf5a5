"""``gradindex build-index``."""

from __future__ import annotations

import dataclasses

import click

from gradindex.errors import ConfigError
from gradindex.cli.app import main
from gradindex.cli.options import (
    STORE_LOCATION,
    apply_options,
    parse_shards,
    preconditioner_options,
    progress_enabled,
    search_config,
    search_options,
    trust_options,
    tuned_default,
)


@main.command("build-index")
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--concept", default="all", show_default=True, help="Concept partition (its weights are used).")
@click.option("--kind", type=click.Choice(["auto", "flat", "ivf", "ivfpq", "hnsw"]), default="auto", show_default=True,
              help="Index kind; auto = flat while N·D ≤ 1e8, else ivfpq.")
@apply_options(preconditioner_options)
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where FAISS searches (cuda needs a GPU build of FAISS; falls back to the CPU with a message).")
@click.option("--balance", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Store Gram-whitened blocks (G+λI)^-1/2 φ and map queries back (auto: on for approximate kinds).")
@click.option("--nlist", type=int, default=0, show_default=True,
              help="ivf/ivfpq: direction cells per norm band (0 = power of two nearest √N/2, 4..2048).")
@click.option("--bands", type=int, default=0, show_default=True,
              help="ivf/ivfpq: norm bands (0 = 8 from N ≥ 200k, else 4).")
@click.option("--pq-bytes", type=int, default=0, show_default=True,
              help="ivfpq: bytes per code, must divide D (0 = largest divisor of D ≤ min(96, D/8)).")
@click.option("--hnsw-m", type=int, default=32, show_default=True, help="hnsw: graph degree.")
@click.option("--ef-construction", type=int, default=80, show_default=True, help="hnsw: build beam width.")
@click.option("--train-size", type=int, default=0, show_default=True,
              help="Rows of the seeded training sample (0 = min(N, max(64·nlist, 20000))).")
@click.option("--index-seed", type=int, default=0, show_default=True, help="Seed of the training sample and k-means.")
@click.option("--shards-per-part", type=int, default=0, show_default=True,
              help="Store shards per index part (0 = one part for the whole store).")
@click.option("--keep-vectors/--no-keep-vectors", default=None,
              help="Keep float16 vectors beside each part for exact re-ranking (default: ivfpq only).")
@click.option("--shards", default=None, metavar="LIST",
              help="Build only the part of these store shards (e.g. 0-4), e.g. one machine each, after --train-only.")
@click.option("--update", is_flag=True, help="Add parts for store shards no part covers yet (after featurize --append).")
@click.option("--train-only", is_flag=True, help="Train a fresh partition and build no parts (then --shards per machine).")
@click.option("--shared", is_flag=True,
              help="Build the one index of φ serving every concept (its weights applied on the query side) "
                   "instead of --concept's own partition.")
@click.option("--target-recall", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Calibrate the approximate kinds' query knobs left at 0 to the cheapest setting reaching this "
                   "recall@10 on calibration queries (0 = no calibration).")
@apply_options(search_options)
@apply_options(trust_options)
@click.pass_context
def build_index_command(ctx, store_path, concept, kind, preconditioner, damping, device, balance, nlist, bands,
                        pq_bytes, hnsw_m, ef_construction, train_size, index_seed, shards_per_part, keep_vectors,
                        shards, update, train_only, shared, target_recall, nprobe, ef_search, rerank, no_prune,
                        max_probe, no_adaptive, exact_certified,
                        trust_task, task_spec) -> None:
    """Build the FAISS partition of a concept from STORE's features and weights.

    The query knobs given here (--nprobe, --ef-search, --rerank, --no-prune) become the
    partition's defaults; the ones left at 0 are calibrated (--target-recall) on stored rows made
    into queries and, when the store's task may run (built in, or --trust-task / --task), the
    task's own queries. `query` and `eval recall` can override them.
    """
    from gradindex.config import IndexConfig
    from gradindex.index import build_index
    from gradindex.index.shared import SHARED
    from gradindex.store.feature_store import FeatureStore
    from gradindex.weights.group_weights import GroupWeights

    if shared and concept != "all":
        raise ConfigError("--shared builds one index for every concept; drop --concept")
    config = IndexConfig(concept=SHARED if shared else concept, kind=kind, preconditioner=preconditioner,
                         damping=damping, device=device, balance=balance, nlist=nlist, bands=bands, pq_bytes=pq_bytes,
                         hnsw_m=hnsw_m, ef_construction=ef_construction, train_size=train_size, seed=index_seed,
                         shards_per_part=shards_per_part, keep_vectors=keep_vectors)
    if sum([update, train_only, shards is not None]) > 1:
        raise ConfigError("--update, --train-only and --shards exclude each other")
    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    weights = GroupWeights.uniform(SHARED, store.groups) if shared else None
    preconditioner, damping, tuned = tuned_default(ctx, store.manifest, config.concept, preconditioner, damping)
    if tuned is not None:  # the store's default setting, chosen by `gradindex tune`
        config = dataclasses.replace(config, preconditioner=preconditioner, damping=damping)
        click.echo(f"{store.path}: the setting `gradindex tune` chose: {preconditioner}"
                   + ("" if tuned.get("damping") is None else f", damping {damping:g}")
                   + f", {tuned['method']} weights (--preconditioner/--damping override it)", err=True)
        if tuned["method"] == "uniform":
            weights = GroupWeights.uniform(config.concept, store.groups)
    index = build_index(store, config, weights=weights,
                        show_progress=progress_enabled(ctx), shards=parse_shards(shards), update=update,
                        train_only=train_only, search=search_config(nprobe, ef_search, rerank, no_prune, max_probe,
                                                                    no_adaptive, exact_certified),
                        target_recall=target_recall or None)
    click.echo(f"{store.path}: index {config.concept!r} ({index.kind}, {preconditioner}) with {index.ntotal} vectors "
               f"of dimension {store.dim} in {len(index.parts)} part(s)")
    if "calibration" in index.entry:
        from gradindex.index.calibrate import describe

        click.echo(f"calibrated knobs: {describe(index.entry['calibration'], index.kind)}")
