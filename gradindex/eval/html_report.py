"""``gradindex report --html``: one self-contained HTML file with the explorer's view of a batch of queries.

In: a store with built indexes, a query inputs file (the task's format) and the concepts to show.
Out: an HTML file (images inline as data URIs, no script, no external resource) with, per query and
concept, the query beside its top-k proponents and opponents (``query --json --opponents``'s rows,
rendered by :mod:`gradindex.eval.view`, the template the ``serve`` page uses), each concept's group
weights as a chart and the store's summary. Written under a temporary name and renamed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from gradindex.eval.view import (
    ExampleRenderer,
    answer_html,
    answers_from_records,
    document,
    esc,
    summary_html,
    view_summary,
    weights_description,
    weights_panel,
)
from gradindex.features.run import training_table
from gradindex.query.attributor import Attributor, metadata_lookup, result_records
from gradindex.store.feature_store import FeatureStore, temporary_path


def write_html_report(store: str | Path | FeatureStore, inputs: str | Path | Sequence, path: str | Path,
                      concepts: Sequence[str] = ("all",), k: int = 10, opponents: bool = True,
                      checkpoint: str | Path | None = None, device: str = "cpu", trust_task: bool = False,
                      title: str | None = None) -> Path:
    """Write the report for the queries in ``inputs`` (a file, or the task's query items) to ``path``."""
    store = store if isinstance(store, FeatureStore) else FeatureStore.open(store, trust_task=trust_task)
    sections: dict[str, list] = {}
    panels = []
    renderer = None
    for concept in dict.fromkeys(concepts or ("all",)):
        attributor = Attributor.open(store, concept=concept, checkpoint=checkpoint, device=device,
                                     trust_task=trust_task)
        try:
            if renderer is None:
                train, ids, _ = training_table(attributor.task)
                renderer = ExampleRenderer(attributor.task, train, ids)
                items = attributor.task.load_queries(inputs) if isinstance(inputs, (str, Path)) else inputs
            if opponents:
                top, bottom = attributor.attribute_both(items, k=k)
                records = result_records(top, metadata_lookup(store, top.sample_ids), bottom,
                                         metadata_lookup(store, bottom.sample_ids))
            else:
                top = attributor.attribute(items, k=k)
                records = result_records(top, metadata_lookup(store, top.sample_ids))
            sections[concept] = answers_from_records(records, items, renderer, concept)
            panels.append((concept, attributor.weights.weights, weights_description(attributor.weights)))
        finally:
            attributor.close()
    title = title or f"gradindex report: {store.manifest['task']['task']}"
    body = "".join(answer_html(answer, renderer) for q in range(len(items))
                   for answers in sections.values() for answer in [answers[q]])
    header = (f"<h1>{esc(title)}</h1><span class='muted'>{len(items)} queries, k = {k}, "
              f"concepts: {esc(', '.join(sections))}</span>")
    page = document(title, header, body, weights_panel(panels) + summary_html(view_summary(store)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
