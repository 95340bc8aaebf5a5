"""Regression tests for the ``gradindex serve`` cases of issue 19's probe: nested JSON, a list as the
concept, absurd limits, a store rebuilt under a running server, cross-site content types, DNS
rebinding Host headers, echoed megabytes and huge answers."""

from __future__ import annotations

import http.client
import json

import pytest

pytest.importorskip("fastapi")

from click.testing import CliRunner  # noqa: E402

from gradindex.cli import main  # noqa: E402
from gradindex.config import ServeConfig  # noqa: E402
from gradindex.errors import ConfigError  # noqa: E402
from gradindex.serve.app import create_app  # noqa: E402
from gradindex.serve.engine import AttributionEngine  # noqa: E402
from gradindex.serve.server import ServerThread  # noqa: E402
from store_helpers import make_store  # noqa: E402
from tiny_task import TinyTask  # noqa: E402

INPUTS = {"x": TinyTask().x[40:43].tolist(), "y": TinyTask().y[40:43].tolist()}


def request(url: str, body: bytes, headers: dict | None = None, path: str = "/v1/attribute",
            method: str = "POST") -> tuple[int, dict]:
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    connection.request(method, path, body=body if method == "POST" else None,
                       headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    status, data = response.status, response.read()
    connection.close()
    assert response.headers["content-type"] == "application/json", data[:200]
    return status, json.loads(data)


def post(url: str, body: object, **kwargs) -> tuple[int, dict]:
    return request(url, json.dumps(body).encode(), **kwargs)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("serve-probe"))


@pytest.fixture(scope="module")
def server(store):
    engine = AttributionEngine.open(store, config=ServeConfig(max_wait_ms=0), trust_task=True)
    with ServerThread(create_app(engine)) as running:
        yield running.url
    engine.close()


def test_deeply_nested_json_is_a_400(server):
    status, body = request(server, b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert status == 400 and "nested too deeply" in body["error"], body
    status, body = post(server, {"inputs": {"x": json.loads("[" * 900 + "]" * 900)}})
    assert status == 400, body


@pytest.mark.parametrize("concept", [["all"], {"a": 1}, 3, None])
def test_a_concept_that_is_not_a_string_is_a_400(server, concept):
    status, body = post(server, {"inputs": INPUTS, "concept": concept})
    assert status == 400 and "is not served here" in body["error"], body


def test_a_megabyte_concept_is_not_echoed(server):
    status, body = post(server, {"inputs": INPUTS, "concept": "c" * (1 << 20)})
    assert status == 400 and len(body["error"]) < 2000, len(body["error"])


def test_answers_are_capped(store):
    engine = AttributionEngine.open(store, config=ServeConfig(max_wait_ms=0, max_queries=1024), trust_task=True)
    with pytest.raises(ConfigError, match="more than the 100,000 one answer may hold"):
        engine.parse({"inputs": {"x": [[0.0] * 4] * 1024, "y": [0] * 1024}, "k": 1000})
    engine.close()


@pytest.mark.parametrize("field, value", [("max_body_mb", 1e308), ("max_wait_ms", 1e308), ("max_wait_ms", -1.0)])
def test_absurd_limits_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"ServeConfig.{field}"):
        ServeConfig(**{field: value})


def test_absurd_limits_are_one_line_from_the_cli(store):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "gradindex", "-q", "serve", str(store), "--max-body-mb", "1e308",
                           "--trust-task", "--port", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "max_body_mb" in done.stderr, done.stderr


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""])
def test_only_json_content_type_runs_a_query(server, content_type):
    status, body = post(server, {"inputs": INPUTS}, headers={"Content-Type": content_type})
    assert status == 415 and "application/json" in body["error"], body
    status, body = post(server, {"inputs": INPUTS}, headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200, body


@pytest.mark.parametrize("host, ok", [("evil.example", False), ("evil.example:80", False), ("127.0.0.1.nip.io", False),
                                      ("localhost", True), ("127.0.0.1:8000", True), ("[::1]:8000", True)])
def test_loopback_server_checks_the_host_header(server, host, ok):
    status, body = request(server, b"", headers={"Host": host}, path="/v1/info", method="GET")
    assert (status == 200) == ok and (ok or status == 403), (status, body)


def test_a_rebuilt_store_is_flagged_stale_in_every_answer(store, tmp_path):
    import shutil

    copy = shutil.copytree(store, tmp_path / "store")
    engine = AttributionEngine.open(copy, config=ServeConfig(max_wait_ms=0), trust_task=True)
    with ServerThread(create_app(engine)) as running:
        status, body = post(running.url, {"inputs": INPUTS, "k": 2})
        assert status == 200 and body["stale"] is False and "stale_reason" not in body
        info = request(running.url, b"", path="/v1/info", method="GET")[1]
        assert info["stale"] is False and info["served"]["all"]["kind"] == "flat"
        result = CliRunner().invoke(main, ["-q", "build-index", str(copy), "--kind", "hnsw"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        engine._stale = (0.0, None)  # do not wait for the once-a-second recheck
        status, body = post(running.url, {"inputs": INPUTS, "k": 2})
        assert status == 200 and body["stale"] is True and "restart gradindex serve" in body["stale_reason"]
        info = request(running.url, b"", path="/v1/info", method="GET")[1]
        assert info["stale"] is True
    engine.close()
