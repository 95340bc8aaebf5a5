"""Shared by the explorer tests (page, report, browser): a small digits store with two concepts and
helpers that read the rendered cards back out of the HTML."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from gradindex.cli import main
from gradindex.config import FeaturizeConfig, IndexConfig, LearnConfig, ProjectionConfig
from gradindex.features.run import featurize
from gradindex.index import build_index
from gradindex.task import load_task
from gradindex.weights.learn import learn_weights


def digits_store(root: Path):
    """300 digits, ``all`` with learned weights and ``uniform``, both flat; returns (store, task)."""
    task = load_task("digits")
    config = FeaturizeConfig(projection=ProjectionConfig(proj_dim=32), shard_size=128)
    store = featurize(task, root / "store", config, limit=300, show_progress=False)
    learn_weights(store, LearnConfig(num_queries=32, reference_size=128, steps=30), show_progress=False)
    for concept in ("all", "uniform"):
        build_index(store, IndexConfig(concept=concept), show_progress=False)
    return store, task


def default_query_file(task, position: int, path: Path) -> Path:
    """Default query ``position`` as a query .npz (pixels 0..16, the label), for `query --json`."""
    item = task.query_dataset()[position]
    np.savez(path, x=(item[0].numpy() * 16.0).reshape(1, 8, 8), y=np.array([int(item[1])]))
    return path


def query_json(store_path: Path, inputs: Path, k: int, concept: str = "all") -> list[dict]:
    """`gradindex query --json --opponents`'s objects (the reference)."""
    result = CliRunner().invoke(main, ["-q", "query", str(store_path), "--inputs", str(inputs), "-k", str(k),
                                       "--concept", concept, "--json", "--opponents"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


class Cards(HTMLParser):
    """``[(kind, sample_id, score)]`` of the result cards, per answer (``kind``: proponents / opponents)."""

    def __init__(self):
        super().__init__()
        self.answers: list[dict[str, list[tuple[int, float]]]] = []
        self.kind = None
        self.images: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "article" and "answer" in classes:
            self.answers.append({"proponents": [], "opponents": []})
        if tag == "section" and "hits" in classes:
            self.kind = "opponents" if "opponents" in classes else "proponents"
        if tag == "li" and "card" in classes:
            self.answers[-1][self.kind].append((int(attrs["data-sample-id"]), float(attrs["data-score"])))
        if tag == "img":
            self.images.append(attrs)


def cards(html: str) -> Cards:
    parser = Cards()
    parser.feed(html)
    return parser


def expected_cards(record: dict) -> dict[str, list[tuple[int, float]]]:
    return {"proponents": [(r["sample_id"], r["score"]) for r in record["results"]],
            "opponents": [(r["sample_id"], r["score"]) for r in record.get("opponents", [])]}


def assert_cards_match(got: dict, record: dict) -> None:
    """Same ids in the same order, scores to float32 round-off (another batch composition)."""
    want = expected_cards(record)
    for kind in ("proponents", "opponents"):
        assert [sid for sid, _ in got[kind]] == [sid for sid, _ in want[kind]], kind
        np.testing.assert_allclose([s for _, s in got[kind]], [s for _, s in want[kind]], rtol=1e-4)
