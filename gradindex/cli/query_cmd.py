"""``gradindex query`` and ``gradindex serve``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from gradindex.errors import ConfigError
from gradindex.cli.app import main
from gradindex.cli.options import (
    STORE_LOCATION,
    apply_options,
    checkpoint_option,
    connect_ray,
    device_option,
    echo_table,
    ray_option,
    ray_timeout_option,
    search_config,
    search_options,
    shared_option,
    trust_options,
)


@main.command()
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--inputs", required=True, type=click.Path(path_type=Path), help="Query inputs file (format: the task's).")
@click.option("--concept", default="all", show_default=True, help="Concept partition to search.")
@click.option("-k", type=int, default=10, show_default=True, help="Training examples per query.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per query on stdout.")
@click.option("--opponents", is_flag=True,
              help="Also the k most negative scores (training examples that pushed the model away from the "
                   "query), searched with the negated query on the same index; --json adds \"opponents\".")
@checkpoint_option
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Queries per backward pass.")
@apply_options(search_options)
@shared_option
@click.option("--all", "all_scores", is_flag=True,
              help="Every score, not the top-k: the full [queries, training examples] matrix, computed exactly "
                   "from the store (no index needed) and written to --out.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --all: scores.npy ([queries, N] float32; sample ids in scores.sample_ids.npy) or "
                   "scores.parquet (a row per training example: sample_id, scores[queries]).")
@ray_option
@ray_timeout_option
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="With --ray: at most this many actors holding the index parts (default: one per part, "
                   "at most one per GPU or CPU slot).")
@click.option("--tokens", "with_tokens", is_flag=True,
              help="Token scores inside each retrieved training document (they add up to its score): "
                   "'tokens' [{pos, token, score}] and 'top_span' per result in --json, the top span marked in "
                   "the table. Recomputes the k documents (tasks with a token axis, e.g. language models).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --tokens: also write a page with each document's tokens shaded by score.")
@apply_options(trust_options)
def query(store_path, inputs, concept, k, as_json, opponents, checkpoint, device, batch_size, nprobe, ef_search, rerank,
          no_prune, max_probe, no_adaptive, exact_certified, shared, all_scores, out, with_tokens, html_path,
          ray_address, ray_timeout, actors, trust_task, task_spec) -> None:
    """Top-k training examples of STORE for every query in --inputs.

    With --all, every score instead (--out scores.npy|scores.parquet), under the concept's
    index setting (or its weights' setting when no index is built).
    With --ray the parts of the concept's index (IndexConfig.shards_per_part) are held by Ray actors,
    each query fans out to them and their top-k are merged: the same results as without.
    """
    from gradindex.query.attributor import Attributor, MetadataTable, result_records
    from gradindex.store.feature_store import FeatureStore

    if all_scores or out is not None:
        _query_all(store_path, inputs, concept, checkpoint, device, batch_size, out, all_scores, ray_address,
                   trust_task, task_spec)
        return
    if k < 1:
        raise ConfigError(f"-k: expected a positive integer, got {k}")
    if html_path is not None and not with_tokens:
        raise ConfigError("--html writes the token page: add --tokens")
    if with_tokens and ray_address is not None:
        raise ConfigError("--tokens recomputes the retrieved documents here; drop --ray")
    search = search_config(nprobe, ef_search, rerank, no_prune, max_probe, no_adaptive, exact_certified)
    search = search if search.to_dict() != type(search)().to_dict() else None
    if ray_address is not None:
        connect_ray(ray_address, ray_timeout)  # the install hint and an unreachable address before any work
    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    if ray_address is None:
        attributor = Attributor.open(store, concept=concept, checkpoint=checkpoint, device=device, search=search,
                                     shared=shared)
    else:
        from gradindex.query.ray import open_ray_attributor

        attributor = open_ray_attributor(store, concept=concept, checkpoint=checkpoint, device=device,
                                         address=ray_address, actors=actors, search=search, shared=shared)
    queries = attributor.task.load_queries(inputs)
    if with_tokens:
        from gradindex.query.tokens import add_tokens, attribute_tokens

        top, tokens = attribute_tokens(attributor, queries, k=k, batch_size=batch_size)
    else:
        top = attributor.attribute(queries, k=k, batch_size=batch_size)
    table = MetadataTable.read(attributor.store)
    table.require_known(top.sample_ids)
    if opponents:  # token scores are for the proponents only
        bottom = attributor.opponents(queries, k=k, batch_size=batch_size)
        table.require_known(bottom.sample_ids)
        records = result_records(top, table.lookup(top.sample_ids), bottom, table.lookup(bottom.sample_ids))
    else:
        records = result_records(top, table.lookup(top.sample_ids))
    if with_tokens:
        add_tokens(records, tokens)
    captions = [attributor.task.describe(item) for item in queries]
    for q, record in enumerate(records):
        if as_json:
            click.echo(json.dumps(record))
        else:
            click.echo(f"query {q}: {captions[q]}" if captions[q] else f"query {q}")
            echo_table([_table_row(result) for result in record["results"]])
            if opponents:
                click.echo("opponents (most negative first):")
                echo_table(record["opponents"])
            click.echo("")
    if html_path is not None:
        from gradindex.query.tokens import write_token_page

        write_token_page(html_path, captions, records)
        if not as_json:
            click.echo(f"token page: {html_path}")
    attributor.close()


def _table_row(result: dict) -> dict:
    """A result for the readable table: the token list becomes the document's top span, marked [[ ]]."""
    if "tokens" not in result:
        return result
    from gradindex.query.tokens import marked_text

    row = {key: value for key, value in result.items() if key not in ("tokens", "top_span")}
    row["top span"] = marked_text(result)
    return row


def _query_all(store_path, inputs, concept, checkpoint, device, batch_size, out, all_scores, ray_address, trust_task,
               task_spec) -> None:
    from gradindex.query.attributor import all_scores as compute_all
    from gradindex.store.feature_store import FeatureStore
    from gradindex.store.scores import check_score_path, score_ids_path, write_score_matrix

    if not all_scores or out is None:
        raise ConfigError("--all and --out go together: query STORE --inputs FILE --all --out scores.npy")
    if ray_address is not None:
        raise ConfigError("--all computes the scores here from the store; drop --ray")
    check_score_path(out)
    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    count, blocks = compute_all(store, inputs, concept, checkpoint=checkpoint, device=device, batch_size=batch_size)
    path = write_score_matrix(out, count, store.num_samples, blocks)
    where = f"; sample ids in {score_ids_path(path)}" if path.suffix == ".npy" else ""
    click.echo(f"{path}: scores of {count} queries x {store.num_samples} training examples (float32){where}")


@main.command()
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--concept", "concepts", multiple=True,
              help="Concept partition to serve; repeatable (default: all).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default is loopback: only this machine can connect. The API has no "
                   "authentication; bind another address (0.0.0.0: every interface) only behind a firewall or proxy.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free port; the URL is printed).")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Queries of concurrent requests featurized and searched together.")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="How long a request waits for others to batch with (0: only those already queued).")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=16.0, show_default=True,
              help="Request body limit in MiB (larger: 413).")
@checkpoint_option
@device_option
@apply_options(search_options)
@ray_option
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="With --ray: deployments holding each concept's index parts (default: one per part, at most "
                   "one per GPU or CPU slot).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: replicas of the API (query featurization) and of each parts deployment.")
@apply_options(trust_options)
def serve(store_path, concepts, host, port, max_batch, max_wait_ms, max_body_mb, checkpoint, device, nprobe,
          ef_search, rerank, no_prune, max_probe, no_adaptive, exact_certified, ray_address, actors, replicas,
          trust_task, task_spec) -> None:
    """Answer attribution lookups over HTTP, with the model, projections and index kept warm.

    \b
    POST /v1/attribute  {"inputs": ..., "k": 10, "concept": "all"} -> {"results": [...]}:
                        the objects `query --json` prints; inputs are the task's query
                        fields as JSON (digits: {"x": [...], "y": [...]}, an .npz's arrays;
                        lm: a list of JSONL query records)
    GET  /v1/health     {"status": "ok", ...}
    GET  /v1/info       what `gradindex info` shows, plus batching counters
    GET  /             the explorer page: pick or upload a query, see its proponents
                        and opponents, the concept's weights (docs/serve.md; not with --ray)

    Listens on 127.0.0.1 (loopback) unless --host says otherwise. Concurrent requests are
    batched (--max-batch, --max-wait-ms). Needs `pip install 'gradindex[serve]'`. With --ray
    the same API runs on Ray Serve (`pip install 'ray[serve]'`), each concept's index parts
    (build-index --shards-per-part) held by deployments spread over the cluster's machines.
    """
    from gradindex.config import ServeConfig
    from gradindex.serve import import_serving
    from gradindex.store.feature_store import FeatureStore

    import_serving()  # the install hint before any work
    config = ServeConfig(host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_mb=max_body_mb)
    search = search_config(nprobe, ef_search, rerank, no_prune, max_probe, no_adaptive, exact_certified)
    search = search if search.to_dict() != type(search)().to_dict() else None
    concepts = concepts or ("all",)
    if ray_address is not None:
        _serve_on_ray(store_path, concepts, config, checkpoint, device, search, ray_address, actors, replicas,
                      trust_task, task_spec)
        return
    from gradindex.serve.app import create_app
    from gradindex.serve.engine import AttributionEngine
    from gradindex.serve.server import bind_socket, run_server, url_of

    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    engine = AttributionEngine.open(store, concepts, config, checkpoint=checkpoint, device=device, search=search)
    try:
        sock = bind_socket(config.host, config.port)
        click.echo(f"serving {engine.store.path} (concepts: {', '.join(engine.concepts)}) on {url_of(sock)}")
        sys.stdout.flush()
        verbose = logging.getLogger("gradindex").getEffectiveLevel() <= logging.DEBUG
        run_server(create_app(engine), sock, log_level="debug" if verbose else "warning")
    finally:
        engine.close()


def _serve_on_ray(store_path, concepts, config, checkpoint, device, search, ray_address, actors, replicas,
                  trust_task, task_spec) -> None:
    import signal
    import time

    from gradindex.features.distributed import import_ray, ray_session
    from gradindex.serve.ray_serve import deploy, import_serve
    from gradindex.store.feature_store import FeatureStore

    import_ray()
    serve_module = import_serve()  # the install hints before any work
    if config.port == 0:
        raise ConfigError("--port 0 is not supported with --ray (Serve's proxy needs a fixed port)")
    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    def stop(signum, frame):
        raise KeyboardInterrupt  # SIGTERM (a service manager's stop) cleans up like Ctrl-C

    with ray_session(ray_address):
        signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs its own handler
        try:
            url = deploy(store, concepts, config, checkpoint=checkpoint, device=device, search=search,
                         actors=actors, replicas_per_part=replicas, api_replicas=replicas)
            click.echo(f"serving {store_path} (concepts: {', '.join(concepts)}) on {url} (Ray Serve); Ctrl-C stops")
            sys.stdout.flush()
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve_module.shutdown()
