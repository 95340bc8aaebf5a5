"""``gradindex tune``: choose STORE's default attribution setting by LDS on a small retraining budget."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gradindex.cli.app import main
from gradindex.cli.options import (
    STORE_LOCATION,
    apply_options,
    device_option,
    echo_table,
    progress_enabled,
    query_set,
    trust_options,
)
from gradindex.config import TuneConfig

TUNE_DEFAULTS = TuneConfig()


@main.command("tune")
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--budget", type=int, default=TUNE_DEFAULTS.budget, show_default=True,
              help="Trainings to spend: BUDGET // --runs-per-subset subsets x --runs-per-subset runs. More buys "
                   "smaller error bars (cached: a larger budget later reuses these).")
@click.option("--runs-per-subset", "runs", type=int, default=TUNE_DEFAULTS.runs_per_subset, show_default=True,
              help="Training runs (seeds) per subset, averaged.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of retrained models (default: STORE/lds, shared with `eval lds`).")
@click.option("--workers", type=int, default=2, show_default=True, help="Training processes.")
@click.option("--dry-run", is_flag=True, help="Score and print the grid; record nothing in the manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@device_option
@apply_options(trust_options)
@click.pass_context
def tune_command(ctx, store_path, budget, runs, cache, workers, dry_run, as_json, device, trust_task,
                 task_spec) -> None:
    """Score every preconditioner x damping x weighting (uniform, snr, ssl) of STORE by LDS against
    models retrained on subsets (the task's fit queries), print the table with bootstrap errors, and
    record the best as STORE's default setting: build-index without --preconditioner/--damping then
    uses it (and its learned weights); explicit flags override it. Needs a task with train()."""
    from gradindex.config import MAX_WORKERS, LDSConfig, require_positive
    from gradindex.devices import resolve_device
    from gradindex.eval.lds import retrain, time_one_training
    from gradindex.eval.tune import record_tuned, score_grid, tune_grid
    from gradindex.features.query import load_store_task
    from gradindex.store.feature_store import FeatureStore
    from gradindex.task import require_training_routine

    config = TuneConfig(budget=budget, runs_per_subset=runs)
    require_positive(workers, "--workers", maximum=MAX_WORKERS)
    resolve_device(device, "--device")
    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    task = load_store_task(store)
    require_training_routine(task, "tune")  # one line, before anything is trained
    queries, measured, positions, where = query_set(task, None, "fit", "fit")
    lds_config = LDSConfig(num_models=config.num_models, runs_per_subset=config.runs_per_subset, seed=config.seed)
    cache = cache or store.local_dir("lds")
    cells = len(tune_grid(config)) * len(config.methods)
    click.echo(f"tune: {config.num_models} subsets x {config.runs_per_subset} runs = "
               f"{config.num_models * config.runs_per_subset} trainings (cached in {cache}); {cells} cells scored "
               f"on {where}", err=True)
    pending, seconds = time_one_training(task, cache, lds_config, measured)
    if pending:
        rest = (pending - 1) * seconds / min(workers, max(1, pending - 1))
        click.echo(f"tune: one training took {seconds:.1f} s; about {rest / 60:.1f} min for the other {pending - 1} "
                   f"({workers} workers), then the grid", err=True)
    retrained = retrain(task, cache, lds_config, workers=workers, show_progress=progress_enabled(ctx),
                        queries=measured).queries(positions)
    result = score_grid(store, retrained, queries, config, device=device, show_progress=progress_enabled(ctx))
    entry = None if dry_run else record_tuned(store, result)
    if as_json:
        click.echo(json.dumps({"rows": [r.to_dict() for r in result.rows], "best": result.best.to_dict(),
                               "ceiling": result.ceiling, "recorded": entry is not None}))
        return
    echo_table([_table_row(row) for row in result.rows])
    ceiling = f"; ceiling {result.ceiling[1]:.3f}" if result.ceiling else ""
    click.echo(f"LDS on {where} against {result.models} subsets x {result.runs_per_subset} runs{ceiling}; "
               "se = bootstrap over models and queries; '- best' paired")
    best = result.best
    what = f"{best.preconditioner}" + ("" if best.damping is None else f", damping {best.damping:g}")
    click.echo(f"best: {what}, {best.method} weights (LDS {best.lds:.4f} ± {best.se:.4f})"
               + (" -- not recorded (--dry-run)" if dry_run else
                  f"; recorded as {store.path}'s default setting (build-index uses it unless given "
                  "--preconditioner/--damping; `info` shows it)"))


def _table_row(row) -> dict:
    scored = row.lds is not None
    return {"preconditioner": row.preconditioner, "damping": "" if row.damping is None else row.damping,
            "weights": row.method, "lds": row.lds if scored else "-", "se": row.se if scored else "-",
            "- best (paired)": f"{row.minus_best:+.4f} ± {row.minus_best_se:.4f}" if scored else row.error}
