"""The explorer page of ``gradindex serve``: ``GET /`` (HTML) and ``POST /upload`` (a query file → JSON inputs).

``GET /?q=3&concept=all&k=10&opponents=1`` shows default query 3 of the task (``query_dataset()``);
``GET /?inputs=<JSON>&...`` any query given as the task's JSON inputs (what ``POST /v1/attribute``
takes), so every view — an upload included — has a shareable address. The page lists the default
queries (thumbnails, or text for language tasks), a form for concept / k / opponents, an upload
(an image: PNG or JPEG, decoded with Pillow or matplotlib, or a ``.npy`` array, turned into inputs
by ``Task.query_from_image``; a query file ``.npz`` / ``.jsonl``; or typed JSON), and the answer
rendered by :mod:`gradindex.eval.view` (the template the static report uses): the query beside its
top-k proponents and opponents, the concept's group weights and the store's summary. Lookups go
through the server's micro-batcher like ``/v1/attribute`` and answer the same rows.

``POST /upload?filename=NAME&fields=JSON`` takes the file's bytes as the body and answers
``{"inputs": ...}`` (checked with the task's ``queries_from_json``) or a one-line ``{"error"}``.
Server-rendered HTML, a few lines of inline JavaScript (the upload), no external resource.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from gradindex.errors import ConfigError, GradIndexError, MissingDependencyError
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
from gradindex.inputs import read_npz
from gradindex.serve.engine import AttributeRequest, AttributionEngine
from gradindex.serve.http import error_response, json_response, read_body
from gradindex.task import default_queries

GALLERY_SIZE = 24
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")


class Explorer:
    """What the page needs besides the engine: the task's renderer, default queries and the store summary."""

    def __init__(self, engine: AttributionEngine):
        self.engine = engine
        self.task = next(iter(engine.attributors.values())).task
        train, ids, _ = training_table(self.task)
        self.renderer = ExampleRenderer(self.task, train, ids)
        try:
            self.defaults = default_queries(self.task)
        except (ConfigError, NotImplementedError):
            self.defaults = None
        self.summary = view_summary(engine.store)
        first = self.defaults[0] if self.defaults is not None and len(self.defaults) else None
        self.visual = first is not None and self.task.render(first) is not None
        self._gallery = [self.renderer.item(self.defaults[i])
                         for i in range(min(GALLERY_SIZE, len(self.defaults)))] if self.defaults is not None else []

    def warm_up(self) -> None:
        """Answer one default query per concept (first-use costs of the backward pass before the first visitor)."""
        if self.defaults is None or not len(self.defaults):
            return
        items = torch.utils.data.Subset(self.defaults, [0])
        self.engine.answer([AttributeRequest(items, 1, concept, True) for concept in self.engine.concepts])

    def settings(self, params: Any) -> dict[str, Any]:
        """``{"concept", "k", "opponents", "q" | "inputs"}`` from the query string; ConfigError names a bad one."""
        concepts = self.engine.concepts
        concept = params.get("concept") or ("all" if "all" in concepts else concepts[0])
        if concept not in concepts:
            raise ConfigError(f"concept {concept!r} is not served here; served: {', '.join(concepts)}")
        k_text = params.get("k") or "10"
        if not k_text.isdigit() or not 1 <= int(k_text) <= self.engine.config.max_k:
            raise ConfigError(f"k must be an integer in 1..{self.engine.config.max_k}, got {k_text!r}")
        flags = params.getlist("opponents")
        settings = {"concept": concept, "k": int(k_text), "opponents": (flags[-1] if flags else "1") == "1"}
        if params.get("inputs"):
            settings["inputs"] = params["inputs"]
        elif self.defaults is not None:
            q_text = params.get("q") or "0"
            if not q_text.isdigit() or int(q_text) >= len(self.defaults):
                raise ConfigError(f"q must be a default query number in 0..{len(self.defaults) - 1}, got {q_text!r}")
            settings["q"] = int(q_text)
        return settings

    def request(self, settings: dict[str, Any]) -> tuple[AttributeRequest, list[str]]:
        """The lookup for ``settings`` and each query's title."""
        if "inputs" in settings:
            try:
                inputs = json.loads(settings["inputs"])
            except ValueError as err:
                raise ConfigError(f"inputs: not valid JSON ({err})") from None
            parsed = self.engine.parse({"inputs": inputs, "k": settings["k"], "concept": settings["concept"],
                                        "opponents": settings["opponents"]})
            titles = [f"your query {i}" if len(parsed.queries) > 1 else "your query" for i in range(len(parsed.queries))]
            return parsed, titles
        if "q" not in settings:
            raise ConfigError("the task has no default queries: upload one or type it as JSON")
        items = torch.utils.data.Subset(self.defaults, [settings["q"]])
        return AttributeRequest(items, settings["k"], settings["concept"], settings["opponents"]), \
            [f"default query {settings['q']}"]

    def page(self, settings: dict[str, Any], answers_html: str, error: str | None, timing: str) -> str:
        concept = settings.get("concept", self.engine.concepts[0])
        attributor = self.engine.attributors[concept]
        panels = [(concept, attributor.weights.weights, weights_description(attributor.weights))]
        header = (f'<h1>gradindex explorer</h1><span class="muted">{esc(self.summary["task"])} · '
                  f'{self.summary["num_samples"]} training examples · concepts {esc(", ".join(self.engine.concepts))}'
                  f'</span><span class="muted" id="timing">{esc(timing)}</span>')
        banner = f'<p class="error" role="alert" id="error">{esc(error)}</p>' if error else ""
        gallery, form, upload = self.controls(settings)
        main = gallery + form + banner + answers_html + upload
        return document(f"gradindex explorer: {self.summary['task']}", header, main,
                        weights_panel(panels) + summary_html(self.summary), SCRIPT)

    def controls(self, settings: dict[str, Any]) -> tuple[str, str, str]:
        """The default-query gallery, the settings form and the upload section."""
        keep = {k: settings[k] for k in ("concept", "k") if k in settings}
        keep["opponents"] = "1" if settings.get("opponents", True) else "0"
        links = []
        for i, example in enumerate(self._gallery):
            href = "/?" + urlencode({"q": i, **keep})
            current = ' aria-current="true"' if settings.get("q") == i and "inputs" not in settings else ""
            label = f"default query {i}" + (f": {example.caption}" if example.caption else "")
            inner = (f'<img class="thumb small" src="{example.image}" alt="{esc(label)}">' if example.image
                     else esc(example.caption or label))
            links.append(f'<li><a href="{esc(href)}" class="query-link" data-q="{i}"{current} '
                         f'title="{esc(label)}">{inner}</a></li>')
        gallery = (f'<h2>Default queries</h2><ul class="gallery{"" if self.visual else " text"}" id="gallery">'
                   f'{"".join(links)}</ul>' if links else '<p class="muted">The task has no default queries.</p>')
        hidden = (f'<input type="hidden" name="inputs" value="{esc(settings["inputs"])}">' if "inputs" in settings
                  else f'<input type="hidden" name="q" value="{settings["q"]}">' if "q" in settings else "")
        options = "".join(f'<option value="{esc(c)}"{" selected" if c == settings.get("concept") else ""}>{esc(c)}'
                          "</option>" for c in self.engine.concepts)
        checked = " checked" if settings.get("opponents", True) else ""
        form = (f'<form method="get" action="/" id="settings" aria-label="settings">{hidden}'
                f'<label>concept<select name="concept" id="concept">{options}</select></label>'
                f'<label>k<input type="number" name="k" id="k" min="1" max="{self.engine.config.max_k}" '
                f'value="{settings.get("k", 10)}" style="width: 5em"></label>'
                f'<input type="hidden" name="opponents" value="0">'
                f'<label><span>opponents</span><input type="checkbox" name="opponents" value="1" id="opponents"'
                f'{checked}></label><button type="submit" id="apply">Show</button></form>')
        accept = ",".join((*IMAGE_SUFFIXES, ".npy", ".npz", ".jsonl")) if self.visual else ".jsonl,.npz"
        upload = (f'<h2>Your own query</h2><form id="upload" aria-label="upload a query">'
                  f'<label>file ({esc(accept)})<input type="file" id="upload-file" accept="{esc(accept)}"></label>'
                  + ('<label>other fields (JSON, e.g. {"y": 3})<input type="text" id="upload-fields" '
                     'placeholder="{}"></label>' if self.visual else "")
                  + '<button type="submit" id="upload-button">Upload and attribute</button>'
                  '<span id="upload-status" role="status" class="muted"></span></form>'
                  f'<form method="get" action="/" id="typed" aria-label="type a query">'
                  f'<input type="hidden" name="concept" value="{esc(settings.get("concept", ""))}">'
                  f'<input type="hidden" name="k" value="{settings.get("k", 10)}">'
                  f'<label>query as JSON inputs (as POST /v1/attribute takes them)'
                  f'<textarea name="inputs" id="inputs" rows="2" cols="60" placeholder="{esc(self.example_inputs())}">'
                  f'</textarea></label><button type="submit" id="typed-button">Attribute</button></form>')
        return gallery, form, upload

    def example_inputs(self) -> str:
        return '[{"prompt": "...", "completion": "..."}]' if not self.visual else '{"x": [[...]], "y": [3]}'

    def upload(self, filename: str, fields_text: str, body: bytes) -> Any:
        """JSON inputs for an uploaded file (checked with the task's ``queries_from_json``)."""
        suffix = Path(filename).suffix.lower()
        try:
            fields = json.loads(fields_text) if fields_text.strip() else {}
        except ValueError as err:
            raise ConfigError(f"fields: not valid JSON ({err})") from None
        if not isinstance(fields, dict):
            raise ConfigError("fields: expected a JSON object such as {\"y\": 3}")
        if suffix in IMAGE_SUFFIXES:
            inputs = self.task.query_from_image(decode_image(body, filename), fields)
        elif suffix == ".npy":
            inputs = self.task.query_from_image(unit_range(np.load(io.BytesIO(body), allow_pickle=False)), fields)
        elif suffix == ".npz":
            with tempfile.TemporaryDirectory(prefix="gradindex-upload-") as folder:
                (Path(folder) / "q.npz").write_bytes(body)
                inputs = {key: value.tolist() for key, value in read_npz(Path(folder) / "q.npz", filename).items()}
        elif suffix == ".jsonl":
            try:
                inputs = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
            except (ValueError, UnicodeDecodeError) as err:
                raise ConfigError(f"{filename}: not JSON lines ({err})") from None
        else:
            raise ConfigError(f"{filename}: expected an image ({', '.join(IMAGE_SUFFIXES)}), .npy, .npz or .jsonl")
        self.engine.parse({"inputs": inputs})  # the task's own check, before the address is built
        return inputs


def decode_image(body: bytes, filename: str) -> np.ndarray:
    """An uploaded image as ``[H, W]`` or ``[H, W, 3]`` floats in 0..1 (Pillow, else matplotlib for PNG)."""
    try:
        from PIL import Image
    except ImportError:
        Image = None
    try:
        if Image is not None:
            with Image.open(io.BytesIO(body)) as image:
                return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
        if filename.lower().endswith(".png"):
            import matplotlib.image

            return unit_range(matplotlib.image.imread(io.BytesIO(body), format="png")[..., :3])
    except ImportError:
        pass
    except Exception as err:  # noqa: BLE001 - a broken image file is bad input
        raise ConfigError(f"{filename}: cannot decode the image ({type(err).__name__}: {err})") from None
    raise MissingDependencyError(f"{filename}: decoding it needs Pillow (pip install pillow); PNGs also work with "
                                 "matplotlib, and .npy arrays with neither")


def unit_range(array: np.ndarray) -> np.ndarray:
    """Pixels scaled to 0..1 (0..255 and other ranges divided by their maximum)."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim not in (2, 3) or not np.isfinite(array).all():
        raise ConfigError(f"image: expected a finite [H, W] or [H, W, 3] array, got shape {array.shape}")
    top = array.max(initial=0)
    return array / (255.0 if 1 < top <= 255 else top) if top > 1 else array


def add_page_routes(app: FastAPI, engine: AttributionEngine) -> None:
    """``GET /`` and ``POST /upload`` on ``app`` (the API's, so lookups share its batcher)."""
    explorer = Explorer(engine)
    explorer.warm_up()
    app.state.explorer = explorer

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request) -> Response:
        started = time.perf_counter()
        settings: dict[str, Any] = {}
        error, body, status, timing = None, "", 200, ""
        try:
            settings = explorer.settings(request.query_params)
            if "q" not in settings and "inputs" not in settings:  # no default queries: the upload is the start
                return HTMLResponse(explorer.page(settings, "", None, ""))
            parsed, titles = await run_in_threadpool(explorer.request, settings)
            records = await app.state.batcher.submit(parsed, len(parsed.queries))
            looked_up = time.perf_counter()
            answers = answers_from_records(records, parsed.queries, explorer.renderer, parsed.concept, titles)
            body = "".join(answer_html(answer, explorer.renderer) for answer in answers)
            timing = f"lookup {1000 * (looked_up - started):.0f} ms"
        except GradIndexError as err:
            error, status = str(err), 400
        except RuntimeError as err:
            error, status = str(err), 503
        return HTMLResponse(explorer.page(settings, body, error, timing), status_code=status)

    @app.post("/upload")
    async def upload(request: Request) -> Response:
        body = await read_body(request, engine.config.max_body_bytes)
        filename = request.query_params.get("filename", "")
        try:
            inputs = await run_in_threadpool(explorer.upload, filename, request.query_params.get("fields", ""), body)
        except GradIndexError as err:
            return error_response(400, str(err))
        return json_response({"inputs": inputs})


SCRIPT = """
(function () {
  var form = document.getElementById('upload');
  if (!form) return;
  form.addEventListener('submit', function (event) {
    event.preventDefault();
    var file = document.getElementById('upload-file').files[0];
    var status = document.getElementById('upload-status');
    if (!file) { status.textContent = 'choose a file first'; return; }
    var fields = document.getElementById('upload-fields');
    var params = new URLSearchParams({filename: file.name, fields: fields ? fields.value : ''});
    status.textContent = 'uploading ' + file.name + '…';
    fetch('/upload?' + params, {method: 'POST', body: file, headers: {'Content-Type': 'application/octet-stream'}})
      .then(function (r) { return r.json(); })
      .then(function (answer) {
        if (answer.error) { status.textContent = answer.error; return; }
        var settings = new URLSearchParams(new FormData(document.getElementById('settings')));
        settings.delete('q'); settings.delete('inputs');
        settings.set('inputs', JSON.stringify(answer.inputs));
        window.location.href = '/?' + settings.toString();
      })
      .catch(function (err) { status.textContent = 'upload failed: ' + err; });
  });
})();
"""
