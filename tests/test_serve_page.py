"""`gradindex serve`'s explorer page at / and its /upload, over real HTTP on 127.0.0.1: the shown cards
equal `query --json --opponents`; uploads (PNG, .npy, .npz) become shareable addresses; bad input is a
400 with one line."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi")

from explorer_helpers import assert_cards_match, cards, default_query_file, digits_store, query_json  # noqa: E402

from gradindex.config import ServeConfig  # noqa: E402
from gradindex.serve.app import create_app  # noqa: E402
from gradindex.serve.engine import AttributionEngine  # noqa: E402
from gradindex.serve.server import ServerThread  # noqa: E402


APPS = {}  # the served apps, for tests that reach into their explorer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    store, task = digits_store(root)
    engine = AttributionEngine.open(store, ("all", "uniform"), ServeConfig(max_wait_ms=0))
    app = create_app(engine)
    APPS["digits"] = app
    with ServerThread(app) as running:
        yield running.url, store, task, root
    engine.close()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            assert response.headers["content-type"].startswith("text/html")
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def upload(url: str, name: str, body: bytes, fields: str = "") -> tuple[int, dict]:
    query = urllib.parse.urlencode({"filename": name, "fields": fields})
    request = urllib.request.Request(f"{url}/upload?{query}", data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("q,k,concept", [(0, 5, "all"), (7, 3, "uniform")])
def test_a_default_query_shows_query_json(served, q, k, concept):
    url, store, task, root = served
    status, html = get(f"{url}/?q={q}&k={k}&concept={concept}")
    assert status == 200
    [answer] = cards(html).answers
    [record] = query_json(store.path, default_query_file(task, q, root / f"q{q}.npz"), k, concept)
    assert_cards_match(answer, record)
    assert f'data-q="{q}" aria-current="true"' in html and f'<option value="{concept}" selected>' in html
    assert '<svg class="weights"' in html and "training examples" in html


def test_opponents_can_be_switched_off(served):
    url = served[0]
    _, html = get(f"{url}/?q=1&k=4&opponents=0&opponents=1")
    assert len(cards(html).answers[0]["opponents"]) == 4
    _, html = get(f"{url}/?q=1&k=4&opponents=0")
    assert cards(html).answers[0]["opponents"] == [] and "Top 4 proponents" in html


def test_uploads_become_shareable_addresses(served):
    from PIL import Image

    url, store, task, root = served
    pixels = task.split["x_test"][5].reshape(8, 8)  # 0..1, ink high
    picture = Image.fromarray(np.kron(255 - pixels * 255, np.ones((4, 4))).astype(np.uint8))  # 32 x 32, dark ink
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    status, answer = upload(url, "mine.png", buffer.getvalue(), '{"y": 3}')
    assert status == 200, answer
    assert answer["inputs"]["y"] == [3] and np.array(answer["inputs"]["x"]).shape == (1, 8, 8)
    np.testing.assert_allclose(np.array(answer["inputs"]["x"])[0] / 16, pixels / pixels.max(), atol=1 / 16)
    shared = f"{url}/?" + urllib.parse.urlencode({"inputs": json.dumps(answer["inputs"]), "k": 4})
    status, html = get(shared)
    assert status == 200 and "your query" in html
    inputs = root / "uploaded.npz"
    np.savez(inputs, x=np.array(answer["inputs"]["x"]), y=np.array(answer["inputs"]["y"]))
    assert_cards_match(cards(html).answers[0], query_json(store.path, inputs, 4)[0])
    # a .npy array is an image too; an .npz is the task's query file
    buffer = io.BytesIO()
    np.save(buffer, pixels)
    assert upload(url, "mine.npy", buffer.getvalue())[1]["inputs"]["y"] == [-1]
    status, answer = upload(url, "q.npz", (root / "uploaded.npz").read_bytes())
    assert status == 200 and answer["inputs"]["y"] == [3]


@pytest.mark.parametrize("path,message", [
    ("/?k=0", "k must be an integer"), ("/?concept=nope", "not served here"), ("/?q=99999", "q must be"),
    ("/?inputs=%7Bbad", "not valid JSON"), ("/?inputs=%7B%22z%22%3A1%7D", "inputs: expected an object with"),
])
def test_bad_settings_show_one_line_and_400(served, path, message):
    status, html = get(served[0] + path)
    assert status == 400 and message in html and html.count('role="alert"') == 1


@pytest.mark.parametrize("name,body,message", [
    ("x.png", b"not a png", "cannot decode the image"), ("x.txt", b"1", "expected an image"),
    ("x.npz", b"PK-not-zip", "x.npz"), ("x.png", b"", "cannot decode"),
])
def test_bad_uploads_are_one_line_400(served, name, body, message):
    status, answer = upload(served[0], name, body)
    assert status == 400 and message in answer["error"] and "\n" not in answer["error"]


def test_the_api_is_unchanged_beside_the_page(served):
    url = served[0]
    with urllib.request.urlopen(url + "/v1/health", timeout=60) as response:
        assert json.loads(response.read())["concepts"] == ["all", "uniform"]


@pytest.fixture(scope="module")
def lm_served(tmp_path_factory):
    """The tiny lm task (text: no render) served with its page."""
    from lm_reference import write_tiny_corpus

    from gradindex.config import FeaturizeConfig, IndexConfig, ProjectionConfig
    from gradindex.features.run import featurize
    from gradindex.index import build_index
    from gradindex.task import load_task

    root = tmp_path_factory.mktemp("page-lm")
    options = {"corpus": str(write_tiny_corpus(root / "corpus.json")), "width": 16, "layers": 2, "heads": 2,
               "epochs": 20}
    task = load_task("lm", options)
    checkpoint = task.train(root / "model.pt")
    store = featurize(task, root / "store", FeaturizeConfig(projection=ProjectionConfig(proj_dim=16), batch_size=16),
                      checkpoint=checkpoint, show_progress=False)
    build_index(store, IndexConfig(), show_progress=False)
    engine = AttributionEngine.open(store, config=ServeConfig(max_wait_ms=0))
    with ServerThread(create_app(engine)) as running:
        yield running.url, store, task, root
    engine.close()


def test_a_language_task_shows_text_and_takes_typed_queries(lm_served):
    url, store, task, root = lm_served
    status, html = get(f"{url}/?q=1&k=3")
    assert status == 200 and 'class="gallery text"' in html and "<img" not in html
    assert '<blockquote class="text">' in html  # the query and the hits as text (describe)
    record = task.query_records()[2]
    status, html = get(f"{url}/?" + urllib.parse.urlencode({"inputs": json.dumps([record]), "k": 3}))
    assert status == 200, html
    (root / "q.jsonl").write_text(json.dumps(record) + "\n")
    assert_cards_match(cards(html).answers[0], query_json(store.path, root / "q.jsonl", 3)[0])
    status, answer = upload(url, "q.jsonl", (root / "q.jsonl").read_bytes())
    assert status == 200 and answer["inputs"] == [record]
    status, answer = upload(url, "x.png", b"\x89PNG")
    assert status == 400  # a text task takes no images


def test_image_uploads_become_each_image_tasks_inputs():
    """digits: grey 8 x 8 in 0..16, ink high; diffusion: the task's size, 0..255 RGB, prompt fields kept."""
    from gradindex.inputs import resample_image
    from gradindex.tasks.diffusion import DiffusionTask
    from gradindex.tasks.digits import DigitsTask

    picture = np.kron(np.eye(8), np.ones((3, 3)))  # 24 x 24, a light diagonal on black
    np.testing.assert_allclose(resample_image(picture, 8, 8), np.eye(8))
    np.testing.assert_allclose(resample_image(np.eye(2), 4, 4), np.kron(np.eye(2), np.ones((2, 2))))
    inputs = DigitsTask.query_from_image(DigitsTask.__new__(DigitsTask), 1 - picture, {"y": 4})
    assert inputs == {"x": [(np.eye(8) * 16).tolist()], "y": [4]}  # dark ink on light: ink → 16
    task = DiffusionTask.__new__(DiffusionTask)
    task.concept_config = type("Config", (), {"image_size": 4})()
    made = task.query_from_image(np.ones((8, 8, 3)) * 0.5, {"subject": "circle", "style": "solid", "background": "plain"})
    assert np.array(made["images"]).shape == (1, 4, 4, 3) and made["images"][0][0][0] == [128, 128, 128]
    assert made["subject"] == ["circle"]
    with pytest.raises(Exception, match="expected names"):
        task.query_from_image(np.ones((8, 8)), {"subject": 3})


def test_a_task_without_default_queries_starts_with_the_upload(served):
    url = served[0]
    explorer = APPS["digits"].state.explorer  # the same server's, its default queries taken away for this test
    saved, gallery = explorer.defaults, explorer._gallery
    explorer.defaults, explorer._gallery = None, []
    try:
        status, html = get(url + "/")
        assert status == 200 and "no default queries" in html and 'id="upload"' in html and 'role="alert"' not in html
        assert cards(html).answers == []
    finally:
        explorer.defaults, explorer._gallery = saved, gallery
