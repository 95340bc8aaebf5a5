"""A store written by the previous release (flat module layout, 0.1.0) opens and answers the same.

The fixture (``tests/fixtures/store-0.1.0``, made as its README says) holds the store, the
checkpoint it was featurized from and the ``query --json`` answer of that release.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gradindex.cli import main
from gradindex.store.feature_store import FeatureStore

HERE = Path(__file__).parent
FIXTURE = HERE / "fixtures" / "store-0.1.0"
QUERIES = HERE.parent / "data" / "digits-queries.npz"


@pytest.fixture
def old_store(tmp_path, monkeypatch):
    shutil.copytree(FIXTURE / "home", tmp_path / "home")
    shutil.copytree(FIXTURE / "store", tmp_path / "store")
    monkeypatch.setenv("GRADINDEX_HOME", str(tmp_path / "home"))
    return tmp_path / "store"


def run(*args) -> str:
    result = CliRunner().invoke(main, ["-q", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def answers(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def assert_same_answers(got: list[dict], expected: list[dict]) -> None:
    """Same queries, same sample ids in the same order, scores equal to float32 rounding of another CPU."""
    assert [a["query"] for a in got] == [e["query"] for e in expected]
    for a, e in zip(got, expected):
        assert [r["sample_id"] for r in a["results"]] == [r["sample_id"] for r in e["results"]], a["query"]
        np.testing.assert_allclose([r["score"] for r in a["results"]], [r["score"] for r in e["results"]],
                                   rtol=1e-4, atol=1e-3)


def test_old_store_opens_and_answers_what_it_answered(old_store):
    store = FeatureStore.open(old_store)
    assert store.num_samples == 60 and len(store.groups) == 3
    expected = answers((FIXTURE / "query-k5.jsonl").read_text())
    assert len(expected) == 10
    assert_same_answers(answers(run("query", old_store, "--inputs", QUERIES, "-k", 5, "--json")), expected)


def test_old_store_rebuilds_and_answers_the_same(old_store):
    run("build-index", old_store, "--kind", "flat")
    expected = answers((FIXTURE / "query-k5.jsonl").read_text())
    assert_same_answers(answers(run("query", old_store, "--inputs", QUERIES, "-k", 5, "--json")), expected)
    assert "60" in run("info", old_store)
