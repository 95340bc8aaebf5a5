"""``gradindex report``: a self-contained HTML view of a batch of queries (:mod:`gradindex.eval.html_report`)."""

from __future__ import annotations

from pathlib import Path

import click

from gradindex.cli.app import main
from gradindex.cli.options import STORE_LOCATION, apply_options, checkpoint_option, device_option, trust_options
from gradindex.errors import ConfigError


@main.command()
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--inputs", required=True, type=click.Path(path_type=Path), help="Query inputs file (format: the task's).")
@click.option("--html", "html_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The HTML file to write (one file: images inline, no external resource).")
@click.option("--concept", "concepts", multiple=True, help="Concept partition to show; repeatable (default: all).")
@click.option("-k", type=click.IntRange(min=1), default=10, show_default=True, help="Proponents (and opponents) per query.")
@click.option("--no-opponents", is_flag=True, help="Leave out the k most negative scores.")
@click.option("--title", default=None, help="The page's title (default: the task).")
@checkpoint_option
@device_option
@apply_options(trust_options)
def report(store_path, inputs, html_path, concepts, k, no_opponents, title, checkpoint, device, trust_task,
           task_spec) -> None:
    """Write one HTML file showing each query in --inputs beside its top-k proponents and opponents.

    The same view as `gradindex serve`'s page: the task's renderings and captions, metadata,
    signed scores, each concept's group weights and the store's summary. It opens offline in
    any browser and can be attached to a pull request or a paper's appendix.
    """
    from gradindex.eval.html_report import write_html_report
    from gradindex.store.feature_store import FeatureStore

    if html_path.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--html {html_path}: expected a file name ending in .html")
    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    path = write_html_report(store, inputs, html_path, concepts or ("all",), k=k, opponents=not no_opponents,
                             checkpoint=checkpoint, device=device, title=title)
    click.echo(f"{path}: {', '.join(concepts or ('all',))}, k = {k}")
