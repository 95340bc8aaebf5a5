"""``gradindex groups`` and ``gradindex featurize``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from gradindex.errors import ConfigError
from gradindex.cli.app import main
from gradindex.cli.options import (
    StoreLocation,
    apply_options,
    checkpoint_option,
    connect_ray,
    device_option,
    echo_table,
    featurize_config,
    group_rule_option,
    parse_task_options,
    progress_enabled,
    proj_options,
    ray_option,
    ray_timeout_option,
    task_option,
)


@main.command()
@click.argument("task_spec", metavar="TASK")
@task_option
@checkpoint_option
@group_rule_option
@apply_options(proj_options)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def groups(task_spec, task_options, checkpoint, group_rules, proj_dim, group_dims, proj_kind, seed, factor_dim,
           as_json) -> None:
    """List the parameter groups of TASK's model, with sizes and projected dims."""
    from gradindex.features.run import resolve_groups
    from gradindex.features.groups import unused_rules
    from gradindex.features.projection import make_block_projector
    from gradindex.task import load_task

    config = featurize_config(proj_dim, group_dims, proj_kind, seed, factor_dim, group_rules)
    task = load_task(task_spec, parse_task_options(task_options))
    model = task.load_model(checkpoint)
    resolved = resolve_groups(task, model, config)
    rows = []
    for group in resolved:
        projectors = [make_block_projector(group.name, block, config.projection) for block in group.blocks]
        rows.append({
            "group": group.name,
            "modules": ",".join(b.module or "(root)" for b in group.blocks),
            "kind": ",".join(sorted({b.kind for b in group.blocks})),
            "params": group.numel,
            "proj_dim": sum(p.out_dim for p in projectors),
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    echo_table(rows)
    click.echo(f"{len(rows)} groups, {sum(r['params'] for r in rows)} parameters, "
               f"{sum(r['proj_dim'] for r in rows)} projected dimensions")
    for rule in unused_rules(model, config.group_rules):
        click.echo(f"warning: group rule {rule.pattern}={rule.group or '-'} matches no trainable parameter", err=True)


@main.command()
@click.argument("task_spec", metavar="TASK")
@click.option("--out", required=True, type=StoreLocation(file_okay=False, path_type=Path),
              help="Store directory (or s3://BUCKET/PREFIX) to write.")
@task_option
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Model checkpoint (default: the task's own). Repeat it for TracIn over checkpoints: one "
                   "block per checkpoint, weighted on the query side (docs/estimators.md).")
@click.option("--checkpoint-weights", "checkpoint_weights", multiple=True, type=float,
              help="Query-side weight of each --checkpoint (their learning rates; default 1 each). Repeat it.")
@click.option("--checkpoints-from", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="RUN_DIR whose checkpoints.json lists checkpoints and learning rates (train(..., "
                   "keep_checkpoints=K) of the built-in tasks writes it).")
@click.option("--normalize", type=click.Choice(["none", "adam"]), default="none", show_default=True,
              help="adam: divide each gradient coordinate by √v̂ + ε of the checkpoint's Adam state before "
                   "projecting (LESS / TrackStar), on the stored and the query side.")
@group_rule_option
@apply_options(proj_options)
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage precision of the features.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Examples per backward pass.")
@click.option("--shard-size", type=int, default=100_000, show_default=True, help="Examples per Parquet shard.")
@device_option
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Featurize only the first N examples.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@click.option("--resume", is_flag=True, help="Keep shards a previous identical run completed.")
@click.option("--append", is_flag=True,
              help="Add TASK's training examples missing from the existing store at --out as new shards (store's "
                   "config and checkpoint; projection options are ignored); then `build-index --update`.")
@ray_option
@ray_timeout_option
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="With --ray: at most this many workers (default: one per GPU, or per --cpus-per-worker CPUs).")
@click.option("--cpus-per-worker", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: CPU slots (and torch threads) of each worker.")
@click.option("--max-retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="With --ray: times a shard is redone on a fresh worker after its worker died.")
@click.pass_context
def featurize(ctx, task_spec, out, task_options, checkpoints, checkpoint_weights, run_dir, normalize, group_rules, proj_dim, group_dims, proj_kind, seed,
              factor_dim, dtype, batch_size, shard_size, device, limit, overwrite, resume, append, ray_address,
              ray_timeout, workers, cpus_per_worker, max_retries) -> None:
    """Compute per-example projected gradients of TASK's training set into a store.

    With --ray the shards are computed by Ray workers (--device auto: one per GPU when
    the cluster has GPUs) and the store is identical to a single-process run's.
    """
    from gradindex.features.checkpoints import featurize_target

    task, checkpoint = featurize_target(task_spec, parse_task_options(task_options), checkpoints, checkpoint_weights,
                                        run_dir)
    if append:
        from gradindex.features.append import featurize_append

        if overwrite or resume or ray_address is not None:
            raise ConfigError("--append excludes --overwrite, --resume and --ray")
        store, added = featurize_append(task, out, checkpoint=checkpoint,
                                        device=device, limit=limit, show_progress=progress_enabled(ctx))
        click.echo(f"{store.path}: appended {added} examples, now {store.num_samples} in "
                   f"{len(store.manifest['shards'])} shard(s)")
        return

    config = featurize_config(proj_dim, group_dims, proj_kind, seed, factor_dim, group_rules, dtype=dtype,
                               batch_size=batch_size, shard_size=shard_size)
    config = dataclasses.replace(config, normalize=normalize)
    if ray_address is None:
        from gradindex.features.run import featurize as run_featurize

        store = run_featurize(task, out, config, checkpoint=checkpoint, device=device, overwrite=overwrite,
                              resume=resume, limit=limit, show_progress=progress_enabled(ctx))
    else:
        from gradindex.features.distributed import featurize_ray

        connect_ray(ray_address, ray_timeout)
        store = featurize_ray(task, out, config, checkpoint=checkpoint, device=device, overwrite=overwrite,
                              resume=resume, limit=limit, address=ray_address, workers=workers,
                              cpus_per_worker=cpus_per_worker, max_retries=max_retries,
                              show_progress=progress_enabled(ctx))
    click.echo(f"{store.path}: {store.num_samples} examples, {len(store.groups)} groups, dimension {store.dim}, "
               f"{len(store.manifest['shards'])} shard(s), {store.manifest['featurize_seconds']:.2f}s")
