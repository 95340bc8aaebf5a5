"""`gradindex serve`: a real HTTP client against a real server on 127.0.0.1.

The reference is `gradindex query --json` on the same store and inputs: a request answers
exactly its objects. Concurrent requests are batched (the server's counters say so) and still
answered correctly; bad input gets a 4xx with a one-line JSON error.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from lm_reference import tiny_lm  # noqa: E402
from same_answer import assert_same_answers  # noqa: E402
from tiny_task import TinyTask  # noqa: E402

from gradindex.cli import main  # noqa: E402
from gradindex.config import FeaturizeConfig, IndexConfig, ProjectionConfig, ServeConfig  # noqa: E402
from gradindex.errors import ConfigError  # noqa: E402
from gradindex.features.run import featurize  # noqa: E402
from gradindex.index import build_index  # noqa: E402
from gradindex.serve.app import create_app  # noqa: E402
from gradindex.serve.batcher import MicroBatcher  # noqa: E402
from gradindex.serve.engine import AttributionEngine  # noqa: E402
from gradindex.serve.server import ServerThread  # noqa: E402
from gradindex.eval.summary import store_summary  # noqa: E402
from gradindex.task import load_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# -- helpers ----------------------------------------------------------------------------------------
def post(url: str, body: object | bytes, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/attribute", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=60) as response:
        assert response.headers["content-type"] == "application/json"
        return json.loads(response.read())


def query_json(store_path: Path, inputs: Path, k: int, concept: str = "all") -> list[dict]:
    """`gradindex query --json`'s objects (the reference)."""
    result = CliRunner().invoke(main, ["-q", "query", str(store_path), "--inputs", str(inputs), "-k", str(k),
                                       "--concept", concept, "--json", "--trust-task"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(store, queries file, {"x", "y"} JSON inputs): 300 digits, flat index, 10 held-out queries."""
    root = tmp_path_factory.mktemp("serve-digits")
    task = load_task("digits")
    config = FeaturizeConfig(projection=ProjectionConfig(proj_dim=64), shard_size=128)
    store = featurize(task, root / "store", config, limit=300, show_progress=False)
    build_index(store, IndexConfig(), show_progress=False)
    x = task.split["x_test"][:10].reshape(10, 8, 8) * 16.0  # pixels 0..16, as in a query .npz
    y = task.split["y_test"][:10]
    np.savez(root / "queries.npz", x=x, y=y)
    return store, root / "queries.npz", {"x": x.tolist(), "y": y.tolist()}


@pytest.fixture(scope="module")
def server(digits):
    """The digits store served from a thread; waits 50 ms for company so concurrent requests batch."""
    engine = AttributionEngine.open(digits[0], config=ServeConfig(max_batch=64, max_wait_ms=50))
    with ServerThread(create_app(engine)) as running:
        yield running.url
    engine.close()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(store, queries JSONL, records): the tiny lm task (width 16) with a flat index."""
    root = tmp_path_factory.mktemp("serve-lm")
    task, checkpoint = tiny_lm(root, epochs=20)
    config = FeaturizeConfig(projection=ProjectionConfig(proj_dim=16), batch_size=16)
    store = featurize(task, root / "store", config, checkpoint=checkpoint, show_progress=False)
    build_index(store, IndexConfig(), show_progress=False)
    records = task.query_records()[:6]
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return store, root / "queries.jsonl", records


# -- answers ----------------------------------------------------------------------------------------
def test_digits_answers_equal_query_json(server, digits):
    store, queries, inputs = digits
    for k in (1, 5):
        status, body = post(server, {"inputs": inputs, "k": k})
        assert status == 200, body
        assert_same_answers(body["results"], query_json(store.path, queries, k))
    status, body = post(server, {"inputs": inputs, "k": 400, "concept": "all"})  # k > stored vectors: all of them
    assert status == 200 and [len(q["results"]) for q in body["results"]] == [300] * 10
    assert body["results"][0]["results"][0]["label"] in range(10)  # metadata columns come along


def test_lm_answers_equal_query_json(lm):
    store, queries, records = lm
    engine = AttributionEngine.open(store)
    with ServerThread(create_app(engine)) as running:
        status, body = post(running.url, {"inputs": records, "k": 4})
        assert status == 200, body
        assert_same_answers(body["results"], query_json(store.path, queries, 4))
        status, body = post(running.url, {"inputs": [{"prompt": records[0]["prompt"], "completion": "nosuchword"}]})
        assert status == 400 and "nosuchword" in body["error"], body
    engine.close()


def test_health_and_info(server, digits):
    store = digits[0]
    assert get(server, "/v1/health") == {"status": "ok", "concepts": ["all"]}
    info = get(server, "/v1/info")
    summary = json.loads(json.dumps(store_summary(store)))
    assert {key: info[key] for key in summary} == summary  # gradindex info's summary, shared code
    assert info["served"] == {"all": {"kind": "flat", "vectors": 300}}
    assert info["limits"]["max_batch"] == 64
    assert set(info["batching"]) >= {"batches", "items", "queries", "combined_batches"}


def test_concurrent_requests_are_batched_and_answered(server, digits):
    store, queries, inputs = digits
    references = {k: query_json(store.path, queries, k) for k in (3, 5)}
    before = get(server, "/v1/info")["batching"]

    def one(i: int) -> tuple[int, int, int, dict]:
        row, k = i % 10, (3, 5)[i % 2]
        status, body = post(server, {"inputs": {"x": inputs["x"][row:row + 1], "y": inputs["y"][row:row + 1]}, "k": k})
        return row, k, status, body

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    for row, k, status, body in answers:
        assert status == 200, body
        expected = {**references[k][row], "query": 0}
        assert_same_answers(body["results"], [expected])
    after = get(server, "/v1/info")["batching"]
    assert after["items"] - before["items"] == 16
    assert after["queries"] - before["queries"] == 16
    assert after["batches"] - before["batches"] < 16  # some requests shared a featurize + search
    assert after["combined_batches"] > before["combined_batches"]
    assert after["largest_batch_items"] >= 2


@pytest.mark.parametrize("body, status, fragment", [
    (b"{", 400, "not valid JSON"),
    (b'{"inputs": {"x": NaN}}', 400, "NaN"),
    (b"[1, 2]", 400, "expected a JSON object"),
    ({"k": 3}, 400, 'no "inputs"'),
    ({"inputs": {"x": [[0] * 64]}, "extra": 1}, 400, "unknown keys ['extra']"),
    ({"inputs": {"x": [[0] * 64]}, "k": 0}, 400, "k must be an integer"),
    ({"inputs": {"x": [[0] * 64]}, "k": "5"}, 400, "k must be an integer"),
    ({"inputs": {"x": [[0] * 64]}, "k": 10**6}, 400, "k must be an integer"),
    ({"inputs": {"x": [[0] * 64]}, "concept": "style"}, 400, "concept 'style' is not served"),
    ({"inputs": {"x": [[1, 2]]}}, 400, "expected digits of shape"),
    ({"inputs": {"x": [[0] * 64, [0] * 3]}}, 400, "not a rectangular array"),
    ({"inputs": {"x": [[99] * 64]}}, 400, "pixel values"),
    ({"inputs": {"x": [[0] * 64], "y": [12]}}, 400, "labels in 0..9"),
    ({"inputs": {"pixels": [[0] * 64]}}, 400, "expected an object with 'x'"),
    ({"inputs": [[0] * 64]}, 400, "expected an object with 'x'"),
    ({"inputs": {"x": []}}, 400, "expected digits of shape"),
])
def test_bad_input_is_a_4xx_one_line_json_error(server, body, status, fragment):
    got_status, got = post(server, body)
    assert got_status == status
    assert set(got) == {"error"} and "\n" not in got["error"] and "Traceback" not in got["error"]
    assert fragment in got["error"]


def test_unknown_routes_and_methods_are_json_errors(server):
    for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/attribute", 405), ("POST", "/v1/health", 405)):
        connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=30)
        connection.request(method, path)
        response = connection.getresponse()
        assert response.status == status
        assert set(json.loads(response.read())) == {"error"}
        connection.close()


def test_body_limit_declared_and_streamed(digits):
    engine = AttributionEngine.open(digits[0], config=ServeConfig(max_body_mb=1 / 1024))  # 1 KiB
    big = json.dumps({"inputs": {"x": [[0] * 64] * 20}}).encode()
    assert len(big) > 1024
    with ServerThread(create_app(engine)) as running:
        status, body = post(running.url, big)
        assert status == 413 and "limit of 1024 bytes" in body["error"]
        connection = http.client.HTTPConnection(running.url.removeprefix("http://"), timeout=30)
        connection.request("POST", "/v1/attribute", body=iter([big[:600], big[600:]]), encode_chunked=True)
        response = connection.getresponse()  # no Content-Length: refused while streaming
        assert response.status == 413 and "limit" in json.loads(response.read())["error"]
        connection.close()
        status, body = post(running.url, {"inputs": {"x": [[0] * 64]}, "k": 2})  # small requests still pass
        assert status == 200 and len(body["results"][0]["results"]) == 2
    engine.close()


def test_engine_refuses_too_many_queries(digits):
    engine = AttributionEngine.open(digits[0], config=ServeConfig(max_queries=2))
    with pytest.raises(ConfigError, match="expected 1..2 queries, got 3"):
        engine.parse({"inputs": {"x": [[0] * 64] * 3}})
    engine.close()


# -- the batcher alone ------------------------------------------------------------------------------
def test_batcher_respects_max_items_and_isolates_failures():
    batches = []

    def run(items):
        batches.append(list(items))
        if any(item == "bad" for item in items):
            raise ConfigError("bad item")
        return [item.upper() for item in items]

    async def scenario():
        batcher = MicroBatcher(run, max_items=5, max_wait=0.05)
        await batcher.start()
        items = ["a", "b", "bad", "c", "d", "e", "f"]
        sizes = [2, 1, 1, 2, 1, 3, 1]
        results = await asyncio.gather(*(batcher.submit(i, s) for i, s in zip(items, sizes)), return_exceptions=True)
        stats = batcher.stats()
        await batcher.stop()
        return items, sizes, results, stats

    items, sizes, results, stats = asyncio.run(scenario())
    for item, result in zip(items, results):
        if item == "bad":
            assert isinstance(result, ConfigError)
        else:
            assert result == item.upper()
    size_of = dict(zip(items, sizes))
    assert all(sum(size_of[i] for i in b) <= 5 for b in batches)  # never more queries than max_items
    failed = next(b for b in batches if "bad" in b and len(b) > 1)  # the batch holding the bad item...
    assert all([item] in batches for item in failed)  # ...was rerun item by item
    assert max(len(b) for b in batches) >= 2
    assert stats["items"] == len(items) and stats["queries"] == sum(sizes)


# -- the command line -------------------------------------------------------------------------------
def test_cli_serve_in_a_subprocess(digits):
    store, queries, inputs = digits
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "gradindex", "serve", str(store.path), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert "127.0.0.1" in line, line + process.stderr.read() if process.poll() is not None else line
        url = line.split(" on ")[-1].strip()
        status, body = post(url, {"inputs": inputs, "k": 3})
        assert status == 200
        assert_same_answers(body["results"], query_json(store.path, queries, 3))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    errors = process.stderr.read()
    assert process.returncode in (0, -signal.SIGTERM), errors  # uvicorn re-raises the signal it shut down on
    assert "Traceback" not in errors


def test_cli_serve_without_fastapi_prints_the_install_hint(digits, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` raises ImportError
    result = CliRunner().invoke(main, ["serve", str(digits[0].path)])
    assert result.exit_code == 2
    assert "pip install 'gradindex[serve]'" in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_serve_refuses_an_unknown_concept(digits):
    result = CliRunner().invoke(main, ["serve", str(digits[0].path), "--concept", "style", "--port", "0"])
    assert result.exit_code == 2 and "style" in result.output


# -- Task.queries_from_json's default: through the task's own query file ---------------------------
class JsonlTask(TinyTask):
    """TinyTask reading JSONL query files ({"x": [4 numbers], "y": label} a line)."""

    def load_queries(self, path):
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        x = np.array([r["x"] for r in records], np.float32)
        return torch.utils.data.TensorDataset(torch.from_numpy(x), torch.tensor([r["y"] for r in records]))


def test_default_queries_from_json_goes_through_the_query_file(tmp_path):
    task = TinyTask()
    x, y = task.x[40:44], task.y[40:44]
    np.savez(tmp_path / "q.npz", x=x, y=y)
    from_file = task.load_queries(tmp_path / "q.npz")
    from_json = task.queries_from_json({"x": x.tolist(), "y": y.tolist()})  # an object of arrays -> .npz
    for a, b in zip(from_json.tensors, from_file.tensors):
        assert torch.equal(a, b)
    records = JsonlTask().queries_from_json([{"x": row.tolist(), "y": int(label)} for row, label in zip(x, y)])
    for a, b in zip(records.tensors, from_file.tensors):  # a list of records -> .jsonl
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="not a rectangular array"):
        task.queries_from_json({"x": [[1.0], [1.0, 2.0]], "y": [0, 1]})
    with pytest.raises(ConfigError, match="an object of arrays or a list of records"):
        task.queries_from_json("x")
