"""The demo: train (or reuse) a built-in task's model, featurize, index, query, report.

In: a task spec and an output folder. Out: ``OUT/checkpoint.pt``, ``OUT/store``
(feature store with its ``all`` index), ``OUT/topk.png`` and a
:class:`DemoResult` the CLI prints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.config import IndexConfig
from gradindex.featurize import featurize, training_table
from gradindex.index import build_index
from gradindex.query import Attributor
from gradindex.report import write_topk_grid
from gradindex.task import load_task


@dataclass
class DemoResult:
    out: Path
    store: Path
    png: Path | None
    queries: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(task_spec: str = "digits", out: str | Path = "gradindex-demo", k: int = 5, num_queries: int = 6,
             device: str = "cpu", show_progress: bool = True) -> DemoResult:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(task_spec)
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
    build_index(store, IndexConfig(), show_progress=show_progress)
    seconds["index"] = time.perf_counter() - started

    queries = task.query_dataset()
    chosen = _spread(queries, num_queries)
    subset = torch.utils.data.Subset(queries, chosen)
    started = time.perf_counter()
    attributor = Attributor.open(store, device=device)
    top = attributor.attribute(subset, k=k)
    attributor.close()
    seconds["query"] = time.perf_counter() - started

    train, ids, _ = training_table(task)
    position = {int(i): p for p, i in enumerate(ids)}
    result_rows, png_rows = [], []
    for q, item in enumerate(subset):
        hits = []
        for rank, (sid, score) in enumerate(zip(top.sample_ids[q], top.scores[q]), start=1):
            example = train[position[int(sid)]]
            hits.append({"rank": rank, "sample_id": int(sid), "score": float(score), "caption": task.describe(example),
                         "image": task.render(example)})
        result_rows.append({"query": int(chosen[q]), "caption": task.describe(item),
                            "results": [{k_: v for k_, v in h.items() if k_ != "image"} for h in hits]})
        image = task.render(item)
        if image is not None:
            png_rows.append((image, task.describe(item), [(h["image"], h["caption"]) for h in hits]))
    png = None
    if png_rows:
        png = write_topk_grid(out / "topk.png", png_rows, title=f"{task_spec}: queries and their top-{k} proponents")
    return DemoResult(out, store.path, png, result_rows, seconds)


def _spread(dataset, count: int) -> list[int]:
    """``count`` query positions spread over the dataset (deterministic)."""
    count = min(count, len(dataset))
    return [int(i) for i in np.linspace(0, len(dataset) - 1, count).round()]
