"""Fit/eval split of a task's default queries: disjoint, deterministic, covering; learn-weights fits on
fit, eval lds measures eval, and evaluation warns when its queries were fitted on."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import toy_spec
from gradindex.cli import main
from gradindex.config import LDSConfig, LearnConfig, Preconditioner
from gradindex.errors import ConfigError, TaskError
from gradindex.eval.lds import lds_report, retrain
from gradindex.weights.learn import learn_weights
from gradindex.features.query import load_store_task
from gradindex.task import (
    Task,
    dataset_metadata,
    default_query_splits,
    load_task,
    query_digests,
    query_split_positions,
    task_queries,
)
from gradindex.tasks.tabular import load_split


@pytest.mark.parametrize("count", [0, 1, 2, 7, 48, 359])
def test_default_split_is_disjoint_covering_and_deterministic(count):
    splits = default_query_splits(count)
    fit, held = splits["fit"], splits["eval"]
    assert len(fit) == count // 2 and len(held) == count - count // 2
    assert sorted(np.concatenate([fit, held]).tolist()) == list(range(count))
    assert (np.diff(fit) > 0).all() and (np.diff(held) > 0).all()  # sorted, no repeats
    again = default_query_splits(count)
    assert np.array_equal(again["fit"], fit) and np.array_equal(again["eval"], held)
    if count >= 48:  # neither split is a block of the query order
        assert fit[0] < count // 4 and fit[-1] > 3 * count // 4


def test_task_queries_of_a_user_task_that_only_defines_query_dataset():
    task = load_task(toy_spec("ToyTask"))
    everything = task.query_dataset()
    fit, held, every = (task_queries(task, s) for s in ("fit", "eval", "all"))
    assert len(fit) + len(held) == len(every) == len(everything) == 48
    fit_digests, held_digests = set(query_digests(fit)), set(query_digests(held))
    assert len(fit_digests) == len(fit) and not fit_digests & held_digests
    assert fit_digests | held_digests == set(query_digests(everything))
    with pytest.raises(ConfigError, match="query split"):
        task_queries(task, "test")


def test_subset_metadata_follows_the_positions():
    task = load_task("tabular-cancer")
    held = task_queries(task, "eval")
    labels = dataset_metadata(task, held)["label"]
    assert np.array_equal(labels, task.query_dataset().tensors[1].numpy()[held.indices])


class _BadSplit(Task):
    def __init__(self, splits):
        self.options = {}
        self.splits = splits

    def query_dataset(self):
        return list(range(6))

    def query_splits(self, count):
        return self.splits


@pytest.mark.parametrize("splits", [{"fit": [0, 1, 2], "eval": [2, 3, 4, 5]},  # overlap
                                    {"fit": [0, 1], "eval": [2, 3]},  # does not cover
                                    {"fit": [0, 1, 2], "eval": [3, 4, 9]},  # out of range
                                    {"train": [0, 1, 2], "eval": [3, 4, 5]}])  # wrong keys
def test_a_task_split_that_is_not_a_partition_is_refused(splits):
    with pytest.raises(TaskError, match="query_splits"):
        task_queries(_BadSplit(splits), "fit")


def test_a_task_may_choose_its_own_split():
    task = _BadSplit({"fit": [5, 0], "eval": [1, 2, 3, 4]})
    assert query_split_positions(task, 6)["fit"].tolist() == [0, 5]
    assert list(task_queries(task, "fit")) == [0, 5]


class _ConceptQueries(_BadSplit):
    def concept_queries(self, concept):
        return [f"{concept}-{i}" for i in range(3)]


def test_a_concept_learns_from_its_own_queries_whatever_the_split():
    task = _ConceptQueries({"fit": [0, 1, 2], "eval": [3, 4, 5]})
    for split in ("fit", "eval", "all"):
        assert list(task_queries(task, split, "style")) == ["style-0", "style-1", "style-2"]
    assert list(task_queries(task, "fit")) == [0, 1, 2]  # "all" concepts: the split
    assert list(task_queries(_BadSplit({"fit": [0, 1, 2], "eval": [3, 4, 5]}), "fit", "style")) == [0, 1, 2]


def test_digests_are_per_item_and_ignore_where_the_item_came_from(tmp_path):
    task = load_task("tabular-diabetes")
    split = load_split("diabetes")
    np.savez(tmp_path / "q.npz", x=split["x_query"][:5], y=split["y_query"][:5])
    from_file = task.load_queries(tmp_path / "q.npz")
    assert query_digests(from_file) == query_digests(task.query_dataset())[:5]
    assert len(set(query_digests(task.query_dataset()))) == len(task.query_dataset())


@pytest.fixture(scope="module")
def diabetes_store(tmp_path_factory):
    from gradindex.features.run import featurize

    task = load_task("tabular-diabetes")
    return featurize(task, tmp_path_factory.mktemp("diabetes") / "store", show_progress=False)


def test_learned_weights_record_the_fit_queries_and_evaluation_warns_on_overlap(diabetes_store, tmp_path, caplog):
    store = diabetes_store
    task = load_store_task(store)
    weights = learn_weights(store, LearnConfig(preconditioner=Preconditioner.IDENTITY, steps=20), show_progress=False)
    recorded = weights.info["queries"]
    fit, held = task_queries(task, "fit"), task_queries(task, "eval")
    assert recorded["source"] == "fit" and recorded["count"] == len(fit)
    assert recorded["digests"] == query_digests(fit)
    assert weights.fit_overlap(query_digests(held)) == 0
    assert weights.fit_overlap(query_digests(task.query_dataset())) == len(fit)

    retrained = retrain(task, tmp_path / "cache", LDSConfig(num_models=6), workers=1, show_progress=False)
    positions = query_split_positions(task, len(task.query_dataset()))
    with caplog.at_level(logging.WARNING, logger="gradindex"):
        rows = lds_report(store, retrained.queries(positions["eval"]), held)
    assert {row["fit_overlap"] for row in rows if row["attribution"] == "learned"} == {0}
    assert not [r for r in caplog.records if "were used to fit" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="gradindex"):
        rows = lds_report(store, retrained, task.query_dataset())
    assert [row["fit_overlap"] for row in rows if row["attribution"] == "learned"] == [len(fit)]
    assert any(f"{len(fit)} of the {len(task.query_dataset())} evaluation queries" in r.getMessage()
               for r in caplog.records)


def test_cli_uses_fit_for_learning_and_eval_for_lds_and_warns_for_overlapping_inputs(diabetes_store, tmp_path):
    runner = CliRunner()
    store = str(diabetes_store.path)
    learned = runner.invoke(main, ["-q", "learn-weights", store, "--preconditioner", "identity", "--steps", "20"])
    assert learned.exit_code == 0, learned.output
    assert "queries: the task's fit split (55 of its 110 default queries)" in learned.output
    cache = ["--cache", str(tmp_path / "cache"), "--models", "6", "--workers", "1"]
    result = runner.invoke(main, ["-q", "eval", "lds", store, *cache])
    assert result.exit_code == 0, result.output
    assert "LDS over the task's eval split (55 of its 110 default queries)" in result.stdout
    assert "were used to fit" not in result.stderr
    rows = json.loads(runner.invoke(main, ["-q", "eval", "lds", store, *cache, "--json"]).stdout)
    assert [row["fit_overlap"] for row in rows if row["attribution"] == "learned"] == [0]

    # the fit queries again, as a query file: the overlap is found by content
    task = load_task("tabular-diabetes")
    split = load_split("diabetes")
    fit_positions = task_queries(task, "fit").indices
    np.savez(tmp_path / "fit.npz", x=split["x_query"][fit_positions[:7]], y=split["y_query"][fit_positions[:7]])
    overlapping = runner.invoke(main, ["-q", "eval", "lds", store, *cache, "--inputs", str(tmp_path / "fit.npz")])
    assert overlapping.exit_code == 0, overlapping.output
    assert "warning: 7 of the 7 evaluation queries were used to fit the learned weights" in overlapping.stderr
    assert "7 queries from" in overlapping.stdout

    both = runner.invoke(main, ["-q", "eval", "lds", store, *cache, "--inputs", str(tmp_path / "fit.npz"),
                                "--split", "eval"])
    assert both.exit_code == 2 and "--split selects among the task's default queries" in both.stderr


def test_the_builtin_tasks_split_their_default_queries():
    """Every built-in task with cheap default queries: the default split, half and half."""
    for name, count in (("digits", 359), ("tabular-cancer", 142), ("tabular-wine", 44), ("tabular-diabetes", 110)):
        task = load_task(name)
        fit, held = task_queries(task, "fit"), task_queries(task, "eval")
        assert (len(fit), len(held)) == (count // 2, count - count // 2), name
        assert isinstance(fit, torch.utils.data.Subset)
