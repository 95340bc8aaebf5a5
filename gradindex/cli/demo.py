"""The demo: train (or reuse) a built-in task's model, featurize, index, query, report.

In: a task spec and an output folder. Out: ``OUT/checkpoint.pt``, ``OUT/store``
(feature store with its ``all`` index, plus one partition per concept the task
measures, with weights learned from generated queries by the default objective,
top-k agreement), ``OUT/topk.png``, for a task with concepts ``OUT/concepts.png`` (each query
beside its top-k per concept, captions green where the hit shares the query's value of
the concept), ``OUT/report.html`` (the explorer's view of the same queries: proponents and
opponents per concept, one self-contained file) and a :class:`DemoResult` the CLI prints.

Queries come from ``task.sample_queries(model, n)``: held-out examples for a
classifier, generated samples for a generator.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.config import IndexConfig, LearnConfig
from gradindex.features.run import featurize, training_table
from gradindex.index import TopK, build_index
from gradindex.weights.learn import learn_weights
from gradindex.query.attributor import Attributor
from gradindex.eval.html_report import write_html_report
from gradindex.eval.report import write_concept_grid, write_topk_grid
from gradindex.task import Task, load_task

#: generated queries the concept weights are learned from (another seed than the displayed ones)
LEARN_QUERIES = 60


@dataclass
class DemoResult:
    out: Path
    store: Path
    png: Path | None
    queries: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    concept_png: Path | None = None
    #: per concept: mean fraction of the top-k that share the query's value of the concept
    concept_precision: dict[str, float] = field(default_factory=dict)
    html: Path | None = None


def run_demo(task_spec: str = "digits", out: str | Path = "gradindex-demo", k: int = 5, num_queries: int = 6,
             device: str = "cpu", show_progress: bool = True, task_options: dict[str, Any] | None = None) -> DemoResult:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(task_spec, task_options)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    checkpoint = out / "checkpoint.pt"
    if not checkpoint.is_file():
        task.train(checkpoint)
    seconds["train"] = time.perf_counter() - started

    started = time.perf_counter()
    store = featurize(task, out / "store", checkpoint=checkpoint, device=device, overwrite=True,
                      show_progress=show_progress)
    seconds["featurize"] = time.perf_counter() - started

    started = time.perf_counter()
    model = task.load_model(checkpoint)
    queries = task.sample_queries(model, num_queries)
    seconds["queries"] = time.perf_counter() - started

    if task.concepts:
        started = time.perf_counter()
        learn_queries = task.sample_queries(model, LEARN_QUERIES, seed=1)
        for concept in task.concepts:
            learn_weights(store, LearnConfig(), queries=learn_queries, concept=concept, show_progress=show_progress)
        seconds["learn-weights"] = time.perf_counter() - started

    started = time.perf_counter()
    for concept in ("all", *task.concepts):
        build_index(store, IndexConfig(concept=concept), show_progress=show_progress)
    seconds["index"] = time.perf_counter() - started

    started = time.perf_counter()
    tops = {}
    for concept in ("all", *task.concepts):
        attributor = Attributor.open(store, concept=concept, device=device)
        tops[concept] = attributor.attribute(queries, k=k)
        attributor.close()
    seconds["query"] = time.perf_counter() - started

    train, ids, train_meta = training_table(task)
    position = {int(i): p for p, i in enumerate(ids)}
    query_meta = task.metadata(queries)
    result_rows, png_rows, concept_rows = [], [], []
    matches: dict[str, list[float]] = {concept: [] for concept in task.concepts}
    for q in range(len(queries)):
        item = queries[q]
        hits = _hits(task, train, position, tops["all"], q)
        row = {"query": q, "caption": task.describe(item), "results": [_plain(h) for h in hits]}
        image = task.render(item)
        if image is not None:
            png_rows.append((image, task.describe(item), [(h["image"], h["caption"]) for h in hits]))
        per_concept = {}
        for concept in task.concepts:
            concept_hits = _hits(task, train, position, tops[concept], q)
            value = query_meta.get(concept, [None] * len(queries))[q]
            for h in concept_hits:
                h["match"] = bool(value is not None and concept in train_meta
                                  and train_meta[concept][position[h["sample_id"]]] == value)
            matches[concept].append(float(np.mean([h["match"] for h in concept_hits])))
            row.setdefault("concepts", {})[concept] = [_plain(h) for h in concept_hits]
            per_concept[concept] = [(h["image"], h["caption"], h["match"]) for h in concept_hits]
        if image is not None and per_concept:
            concept_rows.append((image, task.describe(item), per_concept))
        result_rows.append(row)
    png = None
    if png_rows:
        png = write_topk_grid(out / "topk.png", png_rows, title=f"{task_spec}: queries and their top-{k} proponents")
    concept_png = None
    if concept_rows:
        concept_png = write_concept_grid(out / "concepts.png", concept_rows,
                                         title=f"{task_spec}: each query's top-{k} per concept (green: shares "
                                               "the query's value)")
    precision = {concept: float(np.mean(values)) for concept, values in matches.items() if values}
    html = write_html_report(store, queries, out / "report.html", ("all", *task.concepts), k=k, device=device,
                             title=f"{task_spec}: queries, their top-{k} proponents and opponents")
    return DemoResult(out, store.path, png, result_rows, seconds, concept_png, precision, html)


def _hits(task: Task, train: Sequence, position: dict[int, int], top: TopK, q: int) -> list[dict[str, Any]]:
    hits = []
    for rank, (sid, score) in enumerate(zip(top.sample_ids[q], top.scores[q]), start=1):
        example = train[position[int(sid)]]
        hits.append({"rank": rank, "sample_id": int(sid), "score": float(score), "caption": task.describe(example),
                     "image": task.render(example)})
    return hits


def _plain(hit: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in hit.items() if key != "image"}
