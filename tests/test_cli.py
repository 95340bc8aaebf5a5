"""The command line end to end (click's runner), including one-line errors with exit status 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gradindex.cli import main
from store_helpers import cli_store
from tiny_task import TinyTask

TASK = f"{Path(__file__).parent / 'tiny_task.py'}:TinyTask"


def run(*args):
    result = CliRunner().invoke(main, ["-q", *map(str, args)], catch_exceptions=False)
    return result


def assert_one_line_error(result, match):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert match in result.stderr, result.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return cli_store(tmp_path_factory.mktemp("cli"), run)


def test_groups_table_and_json():
    result = run("groups", TASK, "--proj-dim", 8)
    assert result.exit_code == 0 and "hidden" in result.output and "2 groups" in result.output
    rows = json.loads(run("groups", "digits", "--json").output)
    assert [r["group"] for r in rows] == ["fc1", "fc2", "fc3"] and rows[0]["params"] == 64 * 128 + 128
    assert all(r["proj_dim"] <= 256 for r in rows)


def test_featurize_info_build_query(built):
    root, _ = built
    info = run("info", root / "store")
    assert info.exit_code == 0 and "40 in 3 shard(s)" in info.output and "index 'all'" in info.output
    manifest = json.loads(run("info", root / "store", "--json").output)
    assert manifest["num_samples"] == 40 and len(manifest["shards"]) == 3

    result = run("query", root / "store", "--task", TASK, "--inputs", root / "queries.npz", "-k", 3, "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [line["query"] for line in lines] == [0, 1, 2, 3]
    assert all(line["certified"] and line["rows_reranked"] == 40 for line in lines)  # flat: exact, every row
    for line in lines:
        assert [r["rank"] for r in line["results"]] == [1, 2, 3]
        scores = [r["score"] for r in line["results"]]
        assert scores == sorted(scores, reverse=True)
        assert all(r["sample_id"] >= 1000 and r["label"] in (0, 1, 2) for r in line["results"])
    table = run("query", root / "store", "--task", TASK, "--inputs", root / "queries.npz", "-k", 2)
    assert table.exit_code == 0 and "sample_id" in table.output and "query 3: label" in table.output


def test_identity_preconditioner_and_rebuild(built):
    root, _ = built
    result = run("build-index", root / "store", "--preconditioner", "identity")
    assert result.exit_code == 0 and "identity" in result.output


def test_errors_are_one_line_with_exit_2(built, tmp_path):
    root, checkpoint = built
    assert_one_line_error(run("query", tmp_path / "nothing", "--inputs", root / "queries.npz"), "no feature store")
    assert_one_line_error(run("featurize", "nowhere.py:Task", "--out", tmp_path / "s"), "no such file")
    assert_one_line_error(run("query", root / "store", "--trust-task", "--inputs", root / "queries.npz", "-k", 0),
                          "positive integer")
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 5)), y=np.zeros(3, dtype=int))
    assert_one_line_error(run("query", root / "store", "--trust-task", "--inputs", tmp_path / "bad.npz"),
                          "shape [n, 4]")
    other = TinyTask().train(tmp_path / "other.pt", seed=3)
    assert_one_line_error(run("query", root / "store", "--task", TASK, "--inputs", root / "queries.npz",
                              "--checkpoint", other),
                          "another checkpoint")
    assert_one_line_error(run("featurize", TASK, "--out", root / "store", "--checkpoint", checkpoint), "--overwrite")
    assert_one_line_error(run("query", root / "store", "--task", TASK, "--inputs", root / "queries.npz",
                              "--concept", "style"),
                          "concept 'style'")
    assert_one_line_error(run("featurize", TASK, "--out", tmp_path / "s", "--group-rule", "oops"), "PATTERN=GROUP")
    (tmp_path / "partial").mkdir()
    assert_one_line_error(run("build-index", tmp_path / "partial"), "incomplete feature store")


def test_demo_writes_report(tmp_path):
    result = run("demo", "--out", tmp_path / "demo", "--queries", 2, "-k", 3)
    assert result.exit_code == 0, result.output
    assert result.output.count("top-3 training examples") == 2
    png = tmp_path / "demo" / "topk.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "demo" / "store" / "indexes" / "all").glob("b-*/part-*.faiss"))
    html = (tmp_path / "demo" / "report.html").read_text()  # the explorer's view beside the PNG
    assert html.count('<article class="answer"') == 2 and "opponents" in html and "html report:" in result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("query 0")) + 2  # past the table's header
    printed = [int(line.split()[1]) for line in lines[start:start + 3]]
    shown = [int(i) for i in re.findall(r'data-sample-id="(\d+)"', html.split('class="hits opponents"')[0])]
    assert shown == printed


def test_help_for_every_command():
    for command in ["demo", "groups", "featurize", "build-index", "query", "info", "report"]:
        result = run(command, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output
