"""``gradindex fit-factors``: K-FAC / EK-FAC factors of a store (docs/estimators.md)."""

from __future__ import annotations

import click

from gradindex.cli.app import main
from gradindex.cli.options import STORE_LOCATION, apply_options, device_option, progress_enabled, trust_options


@main.command("fit-factors")
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--fisher", type=click.Choice(["true", "empirical"]), default="true", show_default=True,
              help="true: labels sampled from the model's predictive distribution (needs the task's "
                   "compute_sampled_loss; otherwise empirical is used and recorded); empirical: the training labels.")
@click.option("--max-examples", type=int, default=100_000, show_default=True,
              help="Training examples the factors are fitted on (a seeded sample; kronfluence's "
                   "covariance_max_examples).")
@click.option("--batch-size", type=int, default=0, help="Examples per batch (0: the store's featurize batch size).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample and the sampled labels.")
@device_option
@apply_options(trust_options)
@click.pass_context
def fit_factors_command(ctx, store_path, fisher, max_examples, batch_size, seed, device, trust_task, task_spec):
    """Fit STORE's K-FAC and EK-FAC factors (two passes over the training data) and list them in its
    manifest; `--preconditioner kfac|ekfac` then uses them. build-index, learn-weights, eval lds and query
    fit them with these defaults on first use when a store has none."""
    from gradindex.devices import resolve_device
    from gradindex.errors import ConfigError
    from gradindex.features.factor_fit import fit_store_factors
    from gradindex.features.query import load_store_task
    from gradindex.store.feature_store import FeatureStore
    from gradindex.task import model_fingerprint

    if max_examples <= 0 or batch_size < 0:
        raise ConfigError("fit-factors: --max-examples must be positive and --batch-size non-negative")
    store = FeatureStore.open(store_path)
    task = load_store_task(store, trust_task, task_spec)
    torch_device = resolve_device(device)
    model = task.load_model(store.manifest.get("checkpoint")).to(torch_device).eval()
    if model_fingerprint(model) != store.manifest["model_fingerprint"]:
        from gradindex.errors import StoreMismatchError

        raise StoreMismatchError(f"{store.path}: the task's checkpoint is not the one the store was featurized from")
    store = fit_store_factors(store, task, model, fisher, max_examples, batch_size, device, seed,
                              show_progress=progress_enabled(ctx))
    entry = store.manifest["factors"]
    click.echo(f"{store.path}: factors ({entry['fisher']} Fisher, {entry['count']} examples, "
               f"{len(entry['kronecker_blocks'])} Kronecker blocks, {len(entry['diagonal_blocks'])} diagonal) "
               f"in {entry['seconds']:.1f}s -> {entry['file']}")
