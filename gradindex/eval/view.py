"""The HTML view of attributions: one template module for ``gradindex serve``'s page and the static report.

In: ``query --json``'s objects (:func:`~gradindex.query.attributor.result_records`, with
``"opponents"``), the task (``render`` → images, ``describe`` → captions), a concept's group
weights and ``store_summary``. Out: HTML strings — :func:`answer_html` (a query beside its
proponents and opponents: images inline as PNG data URIs with alt text, rank, sample id, signed
score, metadata), :func:`weights_svg` (the concept's group weights as an inline SVG bar chart),
:func:`summary_html` (the store's summary) and :func:`document` (a page with the inline style; no
external resource, so it works offline and as one file).

PNG encoding is numpy + zlib (no imaging library): ``[H, W]`` arrays are drawn dark-on-light
(high values dark, as the PNG reports' ``gray_r``), ``[H, W, 3]`` as colours (0..1 floats or 0..255).
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCORE_KEYS = ("rank", "sample_id", "score")


# -- images -------------------------------------------------------------------------------------
def png_bytes(image: np.ndarray) -> bytes:
    """A PNG of ``image [H, W]`` (grey, min..max → light..dark) or ``[H, W, 3]`` (RGB, 0..1 or 0..255)."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        low, high = float(np.nanmin(image)), float(np.nanmax(image))
        scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
        pixels = np.round(255 * (1 - scaled)).astype(np.uint8)
        colour = 0  # greyscale
    elif image.ndim == 3 and image.shape[2] == 3:
        scale = 255.0 if image.max(initial=0) <= 1.0 else 1.0
        pixels = np.clip(np.round(image * scale), 0, 255).astype(np.uint8)
        colour = 2  # truecolour
    else:
        raise ValueError(f"render: expected an image [H, W] or [H, W, 3], got shape {image.shape}")
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def data_uri(image: np.ndarray | None) -> str | None:
    """``data:image/png;base64,...`` of :func:`png_bytes`, or None for no image."""
    if image is None:
        return None
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


# -- what is shown ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One shown example (a query or a training example): its caption and image (a data URI, or None)."""

    caption: str
    image: str | None = None


class ExampleRenderer:
    """Renders a task's query items and training examples (by sample id), caching the training ones."""

    def __init__(self, task: Any, train: Sequence, sample_ids: np.ndarray):
        self.task = task
        self.train = train
        self.position = {int(sid): p for p, sid in enumerate(np.asarray(sample_ids))}
        self._cache: dict[int, Example] = {}

    def item(self, item: Any) -> Example:
        return Example(str(self.task.describe(item) or ""), data_uri(self.task.render(item)))

    def training(self, sample_id: int) -> Example:
        if sample_id not in self._cache:
            position = self.position.get(int(sample_id))
            self._cache[sample_id] = (Example(f"sample {sample_id} (not in the task's training set)")
                                      if position is None else self.item(self.train[position]))
        return self._cache[sample_id]


@dataclass
class Answer:
    """One query's view: the query, the concept and ``query --json``'s rows (``opponents`` may be empty)."""

    title: str
    query: Example
    concept: str
    results: list[dict[str, Any]]
    opponents: list[dict[str, Any]] = field(default_factory=list)


# -- HTML pieces ----------------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_score(score: float) -> str:
    """Signed, about 4 significant digits, no exponent between 1e-3 and 1e7 (``+28310``, ``−0.01234``)."""
    size = abs(score)
    if size == 0 or not math.isfinite(score):
        return f"{score:+g}".replace("-", "−")
    if 1e-3 <= size < 1e7:
        return f"{score:+.{max(0, 3 - math.floor(math.log10(size)))}f}".replace("-", "−")
    return f"{score:+.3e}".replace("-", "−")


def example_html(example: Example, alt: str, css: str = "thumb") -> str:
    """An example's image (with ``alt``) or, without one, its caption as text."""
    if example.image is not None:
        return f'<img class="{css}" src="{example.image}" alt="{esc(alt)}">'
    return f'<blockquote class="text">{esc(example.caption)}</blockquote>'


def hits_html(rows: Sequence[Mapping[str, Any]], renderer: ExampleRenderer, heading: str, kind: str) -> str:
    """A list of result cards: image or text, rank, sample id, signed score, caption and metadata."""
    if not rows:
        return f'<section class="hits {kind}"><h3>{esc(heading)}</h3><p>(no results)</p></section>'
    cards = []
    for row in rows:
        example = renderer.training(int(row["sample_id"]))
        columns = {k: v for k, v in row.items() if k not in SCORE_KEYS}
        meta = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in columns.items())
        columns = {k: v for k, v in columns.items() if str(v) != example.caption}  # text tasks: the caption
        meta = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in columns.items())
        shown = example.caption and f"{example.caption}" not in {f"{k} {v}" for k, v in columns.items()}
        sign = "pos" if row["score"] > 0 else "neg" if row["score"] < 0 else "zero"
        alt = f"{kind} #{row['rank']}: training example {row['sample_id']}" + \
            (f", {example.caption}" if example.caption else "") + f", score {format_score(row['score'])}"
        cards.append(
            f'<li class="card{"" if example.image else " textual"}" data-sample-id="{int(row["sample_id"])}" data-score="{float(row["score"])!r}">'
            f'{example_html(example, alt)}'
            f'<div class="rank">#{int(row["rank"])} <span class="sid">id {int(row["sample_id"])}</span></div>'
            f'<div class="score {sign}">{esc(format_score(float(row["score"])))}</div>'
            + (f'<div class="caption">{esc(example.caption)}</div>' if example.image is not None and shown else "")
            + (f"<dl>{meta}</dl>" if meta else "") + "</li>")
    return (f'<section class="hits {kind}"><h3>{esc(heading)}</h3>'
            f'<ol class="cards">{"".join(cards)}</ol></section>')


def answer_html(answer: Answer, renderer: ExampleRenderer) -> str:
    """A query beside its proponents and (when asked) opponents."""
    query = example_html(answer.query, f"query: {answer.query.caption or answer.title}", "thumb query-image")
    caption = f'<div class="caption">{esc(answer.query.caption)}</div>' if answer.query.image else ""
    parts = [f'<article class="answer" data-concept="{esc(answer.concept)}">',
             f'<header><h2>{esc(answer.title)} <span class="concept">concept {esc(answer.concept)}</span></h2></header>',
             f'<div class="query">{query}{caption}</div>',
             hits_html(answer.results, renderer, f"Top {len(answer.results)} proponents (highest scores)",
                       "proponents")]
    if answer.opponents:
        parts.append(hits_html(answer.opponents, renderer,
                               f"Top {len(answer.opponents)} opponents (most negative scores)", "opponents"))
    parts.append("</article>")
    return "".join(parts)


def weights_svg(weights: Mapping[str, float], title: str, width: int = 320) -> str:
    """The group weights relative to their mean as horizontal log-scale bars, one row per group (1 = uniform,
    dashed); each bar's tooltip and the chart's label give the values."""
    groups = list(weights)
    values = np.array([float(weights[g]) for g in groups], dtype=float)
    mean = values.mean() if len(values) and values.mean() > 0 else 1.0
    relative = np.maximum(values / mean, 1e-3)
    span = max(1.0, math.ceil(float(np.abs(np.log10(relative)).max(initial=0)) * 10) / 10)
    left, right, row, top = 96, 18, 18, 4
    height = top + row * len(groups) + 18
    plot_w = width - left - right

    def x_of(value: float) -> float:
        return left + plot_w * (math.log10(value) + span) / (2 * span)

    bars = []
    for i, (group, value, raw) in enumerate(zip(groups, relative, values)):
        y = top + i * row
        bars.append(f'<text x="{left - 4}" y="{y + row - 4}" class="label">{esc(group[-16:])}</text>'
                    f'<rect x="{left}" y="{y + 2}" width="{x_of(value) - left:.1f}" height="{row - 4}" class="bar">'
                    f'<title>{esc(group)}: weight {raw:.4g} ({value:.3g}× the mean)</title></rect>')
    axis_y = top + row * len(groups) + 12
    ticks = "".join(f'<text x="{x_of(10.0 ** e):.1f}" y="{axis_y}" class="tick">{10.0 ** e:g}×</text>'
                    for e in range(-math.floor(span), math.floor(span) + 1))
    label = f"{title}: group weights relative to their mean, " + ", ".join(
        f"{g} {v:.3g}×" for g, v in zip(groups, relative))
    return (f'<svg class="weights" role="img" aria-label="{esc(label)}" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg"><title>{esc(label)}</title>'
            f'{"".join(bars)}<line x1="{x_of(1.0):.1f}" x2="{x_of(1.0):.1f}" y1="{top}" y2="{axis_y - 9}" '
            f'class="unit"/>{ticks}</svg>')


def summary_html(summary: Mapping[str, Any]) -> str:
    """The store's summary (``store_summary``): task, sizes, projection, indexes and learned weights."""
    rows = [("task", summary["task"]), ("checkpoint", summary.get("checkpoint") or "(the task's default)"),
            ("training examples", summary["num_samples"]), ("groups", len(summary["groups"])),
            ("dimension", summary["dim"]),
            ("projection", (f"{summary['projection']['kind']}, proj_dim {summary['projection']['proj_dim']}, "
                            f"seed {summary['projection']['seed']}")),
            ("model fingerprint", str(summary["model_fingerprint"])[:16] + "…")]
    for concept, index in summary.get("indexes", {}).items():
        text = f"{index['kind']}, {index['ntotal']} vectors, {index['preconditioner']}, weights {index['weights']}"
        calibration = index.get("calibration")
        if calibration:
            text += f", calibrated recall@{calibration.get('k')} {calibration.get('recall', float('nan')):.3f}"
        if index.get("stale"):
            text += " (stale: the store's weights changed since)"
        rows.append((f"index {concept}", text))
    for concept, settings in summary.get("learned_weights", {}).items():
        for key, info in settings.items():
            rows.append((f"weights {concept} {key}", f"{info['method']}, digest {info['digest']}"))
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows)
    return f'<section class="summary"><h2>Store</h2><p class="path">{esc(summary["store"])}</p><dl>{items}</dl></section>'


STYLE = """
:root { --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --pos: #1a7f37; --neg: #cf222e; --accent: #0969da; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0; }
header.top { padding: 10px 20px; border-bottom: 1px solid var(--line); display: flex; gap: 16px; align-items: baseline; }
header.top h1 { font-size: 18px; margin: 0; }
main { display: grid; grid-template-columns: minmax(0, 1fr) 340px; gap: 20px; padding: 16px 20px; }
@media (max-width: 900px) { main { grid-template-columns: 1fr; } }
h2 { font-size: 16px; margin: 0 0 8px; } h3 { font-size: 14px; margin: 12px 0 6px; }
.concept { font-weight: normal; color: var(--muted); font-size: 13px; }
.answer { border: 1px solid var(--line); border-radius: 6px; padding: 12px; margin-bottom: 16px; }
.query { display: flex; gap: 10px; align-items: center; }
img.thumb { width: 64px; height: 64px; image-rendering: pixelated; border: 1px solid var(--line); background: #fff; }
img.thumb.small { width: 44px; height: 44px; }
img.query-image { width: 96px; height: 96px; border: 2px solid var(--accent); }
ol.cards { list-style: none; padding: 0; margin: 0; display: flex; flex-wrap: wrap; gap: 8px; }
li.card { width: 118px; border: 1px solid var(--line); border-radius: 4px; padding: 6px; font-size: 12px; }
li.card.textual { width: 220px; }
.hits.opponents li.card { background: #fff8f8; }
blockquote.text { margin: 0; font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap;
  max-height: 8em; overflow: auto; }
li.card blockquote.text { max-height: 10em; }
.score { font-variant-numeric: tabular-nums; font-weight: 600; }
.score.pos { color: var(--pos); } .score.neg { color: var(--neg); }
.sid, .caption, .path { color: var(--muted); }
dl { display: grid; grid-template-columns: auto 1fr; gap: 0 8px; margin: 4px 0 0; }
dt { color: var(--muted); } dd { margin: 0; overflow-wrap: anywhere; }
.summary dl { font-size: 12px; }
svg.weights { max-width: 100%; height: auto; }
svg.weights .bar { fill: var(--accent); } svg.weights .unit { stroke: #8c959f; stroke-dasharray: 4 3; }
svg.weights text { font-size: 11px; fill: var(--muted); } svg.weights .label { text-anchor: end; }
svg.weights .tick { text-anchor: middle; }
form { display: flex; flex-wrap: wrap; gap: 10px; align-items: end; margin-bottom: 12px; }
label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); }
input, select, button, textarea { font: inherit; }
button { padding: 4px 12px; }
a:focus, button:focus, input:focus, select:focus, textarea:focus { outline: 3px solid var(--accent); outline-offset: 1px; }
ul.gallery { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 6px; margin: 0 0 12px; }
ul.gallery a { display: block; border: 2px solid transparent; border-radius: 4px; text-decoration: none; color: inherit; }
ul.gallery a[aria-current="true"] { border-color: var(--accent); }
ul.gallery.text a { padding: 4px 6px; border: 1px solid var(--line); font-family: ui-monospace, monospace; font-size: 12px;
  max-width: 320px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.error { background: #ffebe9; border: 1px solid var(--neg); padding: 8px 12px; border-radius: 6px; }
.muted { color: var(--muted); }
"""


def document(title: str, header: str, main: str, aside: str, script: str = "") -> str:
    """A complete HTML page: inline style, no external resource (works offline and as one file)."""
    script_tag = f"<script>{script}</script>" if script else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f'<header class="top">{header}</header><main><div id="answers">{main}</div>'
            f"<aside>{aside}</aside></main>{script_tag}</body></html>")


def weights_panel(panels: Sequence[tuple[str, Mapping[str, float], str]]) -> str:
    """``(concept, {group: weight}, description)`` per concept: a heading and chart each."""
    return "".join(f'<section class="weights-panel"><h2>Group weights: {esc(concept)}</h2>'
                   f'<p class="muted">{esc(text)}</p>{weights_svg(weights, f"concept {concept}")}</section>'
                   for concept, weights, text in panels)


def answers_from_records(records: Sequence[Mapping[str, Any]], items: Sequence, renderer: ExampleRenderer,
                         concept: str, titles: Sequence[str] | None = None) -> list[Answer]:
    """One :class:`Answer` per ``query --json`` object (``records[i]`` answers ``items[i]``)."""
    return [Answer(titles[i] if titles else f"query {record['query']}", renderer.item(items[i]), concept,
                   list(record["results"]), list(record.get("opponents", [])))
            for i, record in enumerate(records)]


def view_summary(store: Any) -> dict[str, Any]:
    """``store_summary(store)`` with each index's calibration (target, k, recall) where it was calibrated."""
    from gradindex.eval.summary import store_summary

    summary = store_summary(store)
    for concept, index in summary.get("indexes", {}).items():
        calibration = store.manifest.get("indexes", {}).get(concept, {}).get("calibration")
        if calibration:
            index["calibration"] = {k: calibration.get(k) for k in ("target", "k", "recall")}
    return summary


def weights_description(weights: Any) -> str:
    """How a concept's weights were made: method, digest, setting and objective (``GroupWeights.provenance``)."""
    return weights.provenance(digest=True)
