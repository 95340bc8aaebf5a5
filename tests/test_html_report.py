"""`gradindex report --html` and the shared template (eval.view): the report's cards equal
`query --json --opponents`, it is one self-contained file, and the PNGs it inlines decode to the pixels."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from click.testing import CliRunner
from explorer_helpers import assert_cards_match, cards, digits_store, query_json

from gradindex.cli import main
from gradindex.eval.view import format_score, png_bytes, weights_svg


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    store, task = digits_store(root)
    inputs = root / "q.npz"
    x = task.split["x_test"][:3].reshape(3, 8, 8) * 16.0
    np.savez(inputs, x=x, y=task.split["y_test"][:3])
    return store, task, inputs, root


def test_report_matches_query_json_and_is_self_contained(digits):
    store, _, inputs, root = digits
    out = root / "report.html"
    result = CliRunner().invoke(main, ["-q", "report", str(store.path), "--inputs", str(inputs), "--html", str(out),
                                       "-k", "4", "--concept", "all", "--concept", "uniform"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    parsed = cards(text)
    assert len(parsed.answers) == 6  # per query, one answer per concept
    for c, concept in enumerate(("all", "uniform")):
        for q, record in enumerate(query_json(store.path, inputs, 4, concept)):
            assert_cards_match(parsed.answers[2 * q + c], record)
    # one file: every image inline, no script or stylesheet from elsewhere, alt text on every image
    assert parsed.images and all(img["src"].startswith("data:image/png;base64,") for img in parsed.images)
    assert all(img.get("alt") for img in parsed.images)
    assert not re.search(r'(src|href)="(https?:)?//', text) and "<link" not in text
    assert text.count('<svg class="weights"') == 2 and "digest" in text


def test_report_refuses_a_non_html_name(digits):
    store, _, inputs, root = digits
    result = CliRunner().invoke(main, ["-q", "report", str(store.path), "--inputs", str(inputs), "--html",
                                       str(root / "x.png")])
    assert result.exit_code == 2 and "expected a file name ending in .html" in result.stderr


@pytest.mark.parametrize("image", [np.arange(12.0).reshape(3, 4), np.random.default_rng(0).random((5, 6, 3)),
                                   np.random.default_rng(1).integers(0, 256, (4, 2, 3)).astype(np.uint8)])
def test_png_bytes_decode_to_the_pixels(image):
    from PIL import Image

    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(image))))
    if image.ndim == 2:  # min..max → light..dark
        want = np.round(255 * (1 - (image - image.min()) / (image.max() - image.min())))
    else:
        want = np.round(image * 255) if image.max() <= 1 else image
    np.testing.assert_array_equal(decoded, want.astype(np.uint8))


def test_scores_are_signed_and_weights_chart_labels_every_group():
    assert [format_score(s) for s in (28310.4, -0.012345, 0.0)] == ["+28310", "−0.01235", "+0"]
    svg = weights_svg({"fc1": 1.0, "fc2": 4.0, "fc3": 0.25}, "concept all")
    assert svg.count("<rect") == 3 and "fc2: weight 4" in svg and 'role="img"' in svg and "aria-label" in svg
    heights = [float(h) for h in re.findall(r'<rect[^>]* width="([0-9.]+)"', svg)]
    assert heights[1] > heights[0] > heights[2]  # bars grow with the weight
    assert base64.b64decode(b"iVBORw0KGgo=")[:4] == png_bytes(np.ones((2, 2)))[:4]


def test_every_text_from_the_task_or_the_user_is_escaped():
    from gradindex.eval.view import Answer, Example, ExampleRenderer, answer_html, summary_html

    class Task:
        def describe(self, item):
            return f"<script>alert({item})</script>"

        def render(self, item):
            return None

    renderer = ExampleRenderer(Task(), [1, 2], np.array([10, 20]))
    rows = [{"rank": 1, "sample_id": 10, "score": 2.0, "note": "<img src=x onerror=alert(1)>"}]
    html = answer_html(Answer('"><b>title', Example("<i>query</i>"), "<c>", rows, rows), renderer)
    assert "<script" not in html and "<img" not in html and "<b>" not in html and "<i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;img src=x" in html
    summary = {"store": "<s>", "task": "<t>", "num_samples": 1, "groups": [], "dim": 1, "model_fingerprint": "f",
               "projection": {"kind": "<k>", "proj_dim": 1, "seed": 0}}
    assert "<s>" not in summary_html(summary) and "<t>" not in summary_html(summary)
