"""The built-in tabular tasks: bundled data, split, training, losses, measurements, query files, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import per_example_gradients
from task_helpers import assert_query_file_errors

from gradindex.config import FeaturizeConfig, ProjectionConfig, ProjectionKind
from gradindex.errors import ConfigError
from gradindex.features.run import featurize
from gradindex.features.gradients import GradientProjector
from gradindex.features.groups import parameter_groups
from gradindex.task import load_task, make_batch
from gradindex.tasks import BUILTIN_TASKS
from gradindex.tasks.tabular import load_split

NAMES = ("tabular-cancer", "tabular-wine", "tabular-diabetes")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each task with its default model (trained on first use, about a second each)."""
    return {name: (task := load_task(name), task.load_model(None)) for name in NAMES}


@pytest.mark.parametrize("name, rows, features, queries", [("tabular-cancer", 427, 30, 142),
                                                           ("tabular-wine", 134, 13, 44),
                                                           ("tabular-diabetes", 332, 10, 110)])
def test_split_is_fixed_and_standardised(name, rows, features, queries):
    assert name in BUILTIN_TASKS
    task = load_task(name)
    x, _ = task.train_dataset().tensors
    assert x.shape == (rows, features) and len(task.query_dataset()) == queries
    torch.testing.assert_close(x.mean(0), torch.zeros(features), atol=1e-5, rtol=0)
    again = load_split(task.dataset)
    assert np.array_equal(again["x_train"], load_split(task.dataset)["x_train"])  # deterministic
    train_rows = {tuple(r) for r in again["x_train"].round(6).tolist()}
    assert not any(tuple(r) in train_rows for r in again["x_query"].round(6).tolist())  # disjoint


def test_models_learn_but_do_not_saturate(trained):
    """Held-out quality of the default models, and training losses kept off zero (gradients to attribute)."""
    for name, (task, model) in trained.items():
        x, y = task.query_dataset().tensors
        with torch.no_grad():
            out = model(x)
            losses = task.compute_train_loss(make_batch(task, task.train_dataset(), range(len(task.train_dataset()))),
                                             model)
        if task.regression:
            r2 = 1 - float(((out[:, 0] - y) ** 2).mean() / y.var(unbiased=False))
            assert r2 > 0.2, (name, r2)
        else:
            accuracy = float((out.argmax(1) == y).float().mean())
            assert accuracy > 0.85, (name, accuracy)
        assert float(losses.median()) > 1e-3, name


def test_groups_are_the_layers(trained):
    task, model = trained["tabular-cancer"]
    assert [g.name for g in parameter_groups(model)] == ["fc1", "fc2", "fc3", "head"]


def test_training_is_seeded_and_uses_the_subset(tmp_path):
    task = load_task("tabular-wine")
    a = task.load_model(task.train(tmp_path / "a.pt", indices=range(60), seed=3))
    b = task.load_model(task.train(tmp_path / "b.pt", indices=range(60), seed=3))
    c = task.load_model(task.train(tmp_path / "c.pt", indices=range(60, 120), seed=3))
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    assert not torch.equal(a.head.weight, c.head.weight)
    with pytest.raises(ConfigError, match="indices"):
        task.train(tmp_path / "d.pt", indices=[0, 500])


def test_regression_measurements(trained):
    task, model = trained["tabular-diabetes"]
    batch = make_batch(task, task.query_dataset(), range(8))
    with torch.no_grad():
        prediction = model(batch[0])[:, 0]
        torch.testing.assert_close(task.compute_measurement(batch, model), prediction)
        torch.testing.assert_close(task.compute_train_loss(batch, model), (prediction - batch[1]) ** 2)
        error = load_task("tabular-diabetes", {"measurement": "neg_squared_error"})
        torch.testing.assert_close(error.compute_measurement(batch, model), -((prediction - batch[1]) ** 2))
    with pytest.raises(ConfigError, match="measurement"):
        load_task("tabular-diabetes", {"measurement": "r2"})
    with pytest.raises(ConfigError, match="dataset"):
        load_task("tabular-cancer", {"dataset": "iris"})


@pytest.mark.parametrize("name", NAMES)
def test_per_example_gradients_match_autograd(trained, name):
    task, model = trained[name]
    groups = parameter_groups(model)
    measurements = [task.compute_measurement]
    if task.regression:
        measurements.append(load_task(name, {"measurement": "neg_squared_error"}).compute_measurement)
    cases = [(task.train_dataset(), task.compute_train_loss)] + [(task.query_dataset(), m) for m in measurements]
    for dataset, function in cases:
        with GradientProjector(model, groups, ProjectionConfig(kind=ProjectionKind.IDENTITY)) as projector:
            got = projector(lambda: function(make_batch(task, dataset, range(5)), model), verify=True)
        expected = per_example_gradients(model, groups, lambda b: function(b, model),
                                         [make_batch(task, dataset, [i]) for i in range(5)])
        for group in groups:
            torch.testing.assert_close(got[group.name], expected[group.name], rtol=1e-4, atol=1e-6, msg=group.name)


def test_query_files(trained, tmp_path):
    task, _ = trained["tabular-cancer"]
    split = load_split("cancer")
    np.savez(tmp_path / "q.npz", x=split["x_query"][:4], y=split["y_query"][:4])
    loaded = task.load_queries(tmp_path / "q.npz")
    for a, b in zip(loaded.tensors, task.query_dataset().tensors):
        torch.testing.assert_close(a, b[:4])
    np.savez(tmp_path / "unlabelled.npz", x=split["x_query"][:2])
    assert task.load_queries(tmp_path / "unlabelled.npz").tensors[1].tolist() == [-1, -1]
    assert_query_file_errors(task, tmp_path, [({"x": split["x_query"][:2, :5]}, "shape"),
                                              ({"z": split["x_query"]}, "'x'"),
                                              ({"x": split["x_query"][:2], "y": np.array([0, 2])}, "labels")])
    regression = load_task("tabular-diabetes", {"measurement": "neg_squared_error"})
    np.savez(tmp_path / "reg.npz", x=load_split("diabetes")["x_query"][:3])
    with pytest.raises(ConfigError, match="needs targets"):
        regression.load_queries(tmp_path / "reg.npz")
    assert len(load_task("tabular-diabetes").load_queries(tmp_path / "reg.npz")) == 3


def test_featurize_stores_labels_and_targets(trained, tmp_path):
    for name in ("tabular-wine", "tabular-diabetes"):
        task, _ = trained[name]
        config = FeaturizeConfig(projection=ProjectionConfig(proj_dim=32))
        store = featurize(task, tmp_path / name, config, show_progress=False)
        assert store.num_samples == len(task.train_dataset()) and len(store.groups) == 4
        _, meta = store.read_metadata()
        column = "target" if task.regression else "label"
        assert list(meta) == [column]
        if task.regression:
            np.testing.assert_allclose(meta["target"], load_split("diabetes")["y_train"], rtol=1e-5)
