"""Token heatmaps inside retrieved training documents, consistent with the ranking.

In: an :class:`~gradindex.query.attributor.Attributor`, query items and ``k``. Out: the
:class:`~gradindex.index.TopK` of a plain lookup and, for every result, the token scores
``[L]`` of the retrieved document, with

    Σ_t token_score[t] = u(q)ᵀ v(x)          (the sequence score the index ranked by)

The index stays sequence-level: only the ``k`` retrieved documents are featurized
again (documents of equal length together, so no padding enters), with their training loss, and their per-position
contributions (:func:`gradindex.features.positions.position_scores`) are dotted
with the same query vector ``u(q)`` — same groups, projections, preconditioner
and weights; the direction of group ``g`` is ``u_g(q)`` times the stored side's
``√w_g``. Each document is recomputed once for all queries that retrieved it.

A document's stored row is its training loss's gradient; recomputed alone, it is
the same gradient to float rounding (up to the store's dtype: a float16 store's
sequence scores differ from the token sums by that rounding).

:func:`top_span` is the contiguous run of tokens with the largest total score;
:func:`write_token_page` writes the HTML page of ``query --tokens --html``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.errors import ConfigError, TaskError
from gradindex.features.positions import position_scores
from gradindex.features.run import training_table
from gradindex.index import TopK


def attribute_tokens(attributor: Any, queries: Sequence, k: int = 10,
                     batch_size: int = 64) -> tuple[TopK, list[list[list[dict[str, Any]]]]]:
    """The top-``k`` of every query and, per query and rank, ``[{"pos", "token", "score"}]`` of the document.

    Retrieved documents of equal length are recomputed together, ``batch_size`` at a time."""
    task = attributor.task
    vectors = attributor.query_vectors(queries, batch_size)  # [n, D]
    top = attributor.index.search(vectors, k)
    dataset, ids, _ = training_table(task)
    where = {int(sid): row for row, sid in enumerate(ids)}
    directions = _group_directions(attributor, torch.from_numpy(np.ascontiguousarray(vectors)))
    tokens: list[list[list[dict[str, Any]]]] = [[[] for _ in range(top.k)] for _ in range(len(top))]
    by_length: dict[int, list[tuple[int, Any, list[str]]]] = {}
    for sid in sorted({int(s) for s in top.sample_ids.reshape(-1) if s >= 0}):
        if sid not in where:
            raise TaskError(f"sample id {sid} is in the index but not in the task's training data; "
                            "token scores need the training documents the store was built from")
        item = dataset[where[sid]]
        text = task.tokens(item)
        if text is None:
            raise ConfigError(f"--tokens: task {type(task).__name__} has no token axis (define tokens(item))")
        by_length.setdefault(len(text), []).append((sid, item, text))
    for length, documents in by_length.items():
        for start in range(0, len(documents), batch_size):
            chunk = documents[start : start + batch_size]
            wanted = np.isin(top.sample_ids, [sid for sid, _, _ in chunk])
            asking = np.nonzero(wanted.any(1))[0]  # the queries that retrieved any of them
            scores = document_token_scores(attributor, [item for _, item, _ in chunk],
                                           {g: d[asking] for g, d in directions.items()}, length)
            column = {int(q): c for c, q in enumerate(asking)}
            for row, (sid, _, text) in enumerate(chunk):
                for q, rank in zip(*np.nonzero(top.sample_ids == sid)):
                    tokens[q][rank] = [{"pos": t, "token": text[t], "score": float(scores[row, t, column[int(q)]])}
                                       for t in range(length)]
    return top, tokens


def document_token_scores(attributor: Any, items: Sequence, directions: dict[str, torch.Tensor],
                          length: int) -> np.ndarray:
    """``[B, L, Q]``: the training documents ``items`` (``L`` tokens each) scored by each direction
    ``{group: [Q, k_g]}``, split over their positions (their training loss, recomputed together)."""
    featurizer = attributor.featurizer
    task, model = featurizer.task, featurizer.model
    batch = task.to_device(task.collate(list(items)), featurizer.device)
    split = position_scores(featurizer.projector, lambda: task.compute_train_loss(batch, model), directions, length)
    return split.detach().cpu().numpy().astype(np.float64)


def _group_directions(attributor: Any, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{group: u_g · √w_g(stored) [n, k_g]}``: score = Σ_g direction_g · φ_g(x)."""
    dims = attributor.featurizer.projector.group_dims()
    stored = attributor.index.weights.scales(attributor.groups)
    out, start = {}, 0
    for group in attributor.groups:
        out[group] = vectors[:, start : start + dims[group]] * stored[group]
        start += dims[group]
    if start != vectors.shape[1]:
        raise AssertionError(f"query vectors have {vectors.shape[1]} columns, the groups {start}")
    return out


def top_span(scores: Sequence[float]) -> tuple[int, int]:
    """``(start, stop)`` of the contiguous tokens with the largest total score (Kadane); one token at least."""
    best, best_bounds = -np.inf, (0, min(1, len(scores)))
    total, start = 0.0, 0
    for t, score in enumerate(scores):
        if total <= 0:
            total, start = 0.0, t
        total += score
        if total > best:
            best, best_bounds = total, (start, t + 1)
    return best_bounds


def add_tokens(records: list[dict[str, Any]], tokens: list[list[list[dict[str, Any]]]]) -> None:
    """Put ``"tokens"`` and ``"top_span"`` ([start, stop)) into each result of ``query --json`` records."""
    for record, per_rank in zip(records, tokens):
        for result in record["results"]:
            scored = per_rank[result["rank"] - 1]
            result["tokens"] = scored
            result["top_span"] = list(top_span([t["score"] for t in scored]))


def marked_text(result: dict[str, Any], width: int = 60) -> str:
    """The document's text around its top span, the span in ``[[ ]]`` (the readable table's column)."""
    start, stop = result["top_span"]
    text = [t["token"] for t in result["tokens"]]
    before, span, after = "".join(text[:start]), "".join(text[start:stop]), "".join(text[stop:])
    room = max(0, (width - len(span)) // 2)
    before = ("…" + before[-room:]) if len(before) > room else before
    after = (after[:room] + "…") if len(after) > room else after
    return (before + "[[" + span + "]]" + after).replace("\n", " ")


def write_token_page(path: str | Path, captions: Sequence[str], records: list[dict[str, Any]]) -> Path:
    """An HTML page: each query, then each retrieved document's tokens shaded by score (green: proponent,
    raises the query's measurement; red: opponent), the top span outlined. Returns the path."""
    path = Path(path)
    parts = ["<!doctype html><meta charset='utf-8'><title>gradindex token attribution</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:auto}.doc{font-family:monospace;"
             "white-space:pre-wrap;line-height:1.6;border:1px solid #ddd;padding:.5em;margin:.3em 0 1em}"
             ".top{outline:2px solid #333}</style>",
             "<p>Token scores of each retrieved training document; they add up to its score. "
             "<span style='background:rgba(0,150,0,.5)'>proponent</span> "
             "<span style='background:rgba(200,0,0,.5)'>opponent</span></p>"]
    for q, record in enumerate(records):
        caption = captions[q] if q < len(captions) else ""
        parts.append(f"<h2>query {q}</h2><p>{html.escape(caption)}</p>")
        for result in record["results"]:
            parts.append(f"<h3>rank {result['rank']}: sample {result['sample_id']}, score {result['score']:.4g}</h3>")
            parts.append(f"<div class='doc'>{_shaded(result)}</div>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def _shaded(result: dict[str, Any]) -> str:
    scores = [t["score"] for t in result["tokens"]]
    scale = max((abs(s) for s in scores), default=0.0) or 1.0
    start, stop = result["top_span"]
    spans = []
    for t, token in enumerate(result["tokens"]):
        alpha = min(1.0, abs(token["score"]) / scale)
        colour = f"rgba(0,150,0,{alpha:.2f})" if token["score"] >= 0 else f"rgba(200,0,0,{alpha:.2f})"
        mark = " class='top'" if start <= t < stop else ""
        spans.append(f"<span{mark} style='background:{colour}' title='{token['score']:.4g}'>"
                     f"{html.escape(token['token'])}</span>")
    return "".join(spans)
