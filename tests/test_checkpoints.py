"""TracIn over checkpoints: one store with a block per checkpoint, weighted on the query side."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import HERE
from gradindex.config import FeaturizeConfig, Preconditioner, ProjectionConfig, ProjectionKind
from gradindex.errors import ConfigError
from gradindex.features.checkpoints import (
    CheckpointEnsemble, featurize_target, run_checkpoints, set_checkpoint_weights, write_run_index,
)
from gradindex.features.query import QueryFeaturizer
from gradindex.features.run import featurize
from gradindex.store.feature_store import FeatureStore
from gradindex.task import load_task

SPEC = f"{HERE / 'tiny_task.py'}:TinyTask"
IDENTITY = FeaturizeConfig(projection=ProjectionConfig(kind=ProjectionKind.IDENTITY))


def scores(store, task) -> np.ndarray:
    """``[queries, N]`` grad-dot scores of the task's queries against every stored row."""
    featurizer = QueryFeaturizer.open(store, preconditioner=Preconditioner.IDENTITY, trust_task=True)
    try:
        query = featurizer.group_features(task.query_dataset())
    finally:
        featurizer.close()
    _, train = FeatureStore.open(store.path).read()
    return sum(query[g].astype(np.float64) @ train[g].T.astype(np.float64) for g in query)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tracin")
    task = load_task(SPEC)
    paths = [task.train(folder / f"c{i}.pt", seed=i) for i in range(3)]
    return folder, task, paths


def test_multi_checkpoint_scores_are_the_lr_weighted_sum_of_single_checkpoint_scores(runs):
    folder, task, paths = runs
    lrs = [0.5, 1.0, 2.0]
    singles = [scores(featurize(task, folder / f"single{i}", IDENTITY, checkpoint=p, show_progress=False), task)
               for i, p in enumerate(paths)]
    ensemble, checkpoint = featurize_target(SPEC, {}, paths, lrs)
    assert isinstance(ensemble, CheckpointEnsemble) and checkpoint is None
    store = featurize(ensemble, folder / "multi", IDENTITY, checkpoint=None, show_progress=False)
    assert store.groups == ["c0.hidden", "c0.out", "c1.hidden", "c1.out", "c2.hidden", "c2.out"]
    expected = sum(lr * s for lr, s in zip(lrs, singles))
    np.testing.assert_allclose(scores(store, task), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    # the weights change on the query side only: the stored rows stay, the scores follow
    _, before = store.read()
    set_checkpoint_weights(store, [1.0, 0.0, 3.0])
    store = FeatureStore.open(store.path)
    _, after = store.read()
    assert all(np.array_equal(before[g], after[g]) for g in before)
    np.testing.assert_allclose(scores(store, task), singles[0] + 3 * singles[2], rtol=1e-4,
                               atol=1e-6 * np.abs(expected).max())


def test_checkpoints_from_a_run_dir_take_their_learning_rates(runs, tmp_path):
    folder, _, paths = runs
    write_run_index(folder, [{"file": p.name, "lr": lr, "step": i} for i, (p, lr) in enumerate(zip(paths, [3, 2, 1]))])
    files, lrs = run_checkpoints(folder)
    assert files == [str(p.resolve()) for p in paths] and lrs == [3.0, 2.0, 1.0]
    task, _ = featurize_target(SPEC, {}, run_dir=folder)
    assert task.weights == [3.0, 2.0, 1.0] and task.options["checkpoints"] == files


def test_bad_checkpoint_options_are_one_line_errors(runs, tmp_path):
    _, _, paths = runs
    with pytest.raises(ConfigError, match="one per checkpoint"):
        featurize_target(SPEC, {}, paths[:2], [1.0])
    with pytest.raises(ConfigError, match="non-negative"):
        featurize_target(SPEC, {}, paths[:2], [1.0, -1.0])
    with pytest.raises(ConfigError, match="give the checkpoints"):
        featurize_target(SPEC, {}, [], [1.0])
    with pytest.raises(Exception, match="checkpoints.json"):
        run_checkpoints(tmp_path)


def test_digits_keeps_intermediate_checkpoints_with_lr_and_adam_state(tmp_path):
    import torch

    from gradindex.features.normalize import second_moments

    task = load_task("digits")
    final = task.train(tmp_path / "m.pt", indices=range(128), keep_checkpoints=4)
    files, lrs = run_checkpoints(tmp_path / "m.pt.run")
    assert [f.rsplit("/", 1)[-1] for f in files] == ["epoch-0010.pt", "epoch-0020.pt", "epoch-0030.pt",
                                                      "epoch-0040.pt"]
    assert lrs == [3e-3] * 4
    # the last kept checkpoint is the final model; every one loads and carries its Adam state
    final_state = torch.load(final, weights_only=True)["state_dict"]
    last = torch.load(files[-1], weights_only=True)["state_dict"]
    assert all(torch.equal(final_state[k], last[k]) for k in final_state)
    moments, eps = second_moments(files[0], task.load_model(files[0]))
    assert set(moments) == {n for n, _ in task.load_model(files[0]).named_parameters()} and eps == 1e-8
    ensemble, _ = featurize_target("digits", {}, run_dir=tmp_path / "m.pt.run")
    assert ensemble.weights == lrs and len(ensemble.load_model(None)) == 4


def test_cli_featurize_several_checkpoints(runs, tmp_path):
    from click.testing import CliRunner

    from gradindex.cli import main

    _, _, paths = runs
    args = ["-q", "featurize", SPEC, "--out", str(tmp_path / "s"), "--proj-dim", "8"]
    for p in paths[:2]:
        args += ["--checkpoint", str(p)]
    result = CliRunner().invoke(main, [*args, "--checkpoint-weights", "2", "--checkpoint-weights", "1"])
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(tmp_path / "s")
    assert store.groups == ["c0.hidden", "c0.out", "c1.hidden", "c1.out"]
    assert store.manifest["task"]["options"]["weights"] == [2.0, 1.0]
    info = CliRunner().invoke(main, ["info", str(tmp_path / "s")])
    assert "checkpoints: 2 of" in info.output and "weights [2.0, 1.0]" in info.output
    bad = CliRunner().invoke(main, [*args, "--checkpoint-weights", "1", "--overwrite"])
    assert bad.exit_code == 2 and "one per checkpoint" in bad.output


def test_tabular_keeps_checkpoints_with_the_optimizer_state(tmp_path):
    from gradindex.features.normalize import second_moments

    task = load_task("tabular-cancer")
    task.train(tmp_path / "m.pt", keep_checkpoints=2)
    files, lrs = run_checkpoints(tmp_path / "m.pt.run")
    assert len(files) == 2 and all(lr > 0 for lr in lrs)
    moments, _ = second_moments(files[-1], task.load_model(files[-1]))
    assert set(moments) == {n for n, _ in task.load_model(files[-1]).named_parameters()}
