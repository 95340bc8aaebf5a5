"""featurize → build_index → Attributor against brute-force autograd and explicit formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradindex.config import FeaturizeConfig, IndexConfig, Preconditioner, ProjectionConfig, ProjectionKind
from gradindex.errors import StoreMismatchError
from gradindex.features.run import featurize, resolve_groups
from gradindex.features.gradients import GradientProjector
from gradindex.index import build_index
from gradindex.query.attributor import Attributor
from gradindex.weights.group_weights import GroupWeights, save_weights
from reference import dense_group_projection, per_example_gradients
from tiny_task import TinyTask


def _full_gradients(task, model, groups, dataset, compute):
    items = [dataset[i] for i in range(len(dataset))]
    return per_example_gradients(model, groups, lambda b: compute(b, model),
                                 [(x[None], y[None]) for x, y in items])


@pytest.fixture
def tiny(tmp_path):
    task = TinyTask()
    checkpoint = task.train(tmp_path / "tiny.pt")
    return task, checkpoint


def _topk_matches(top, expected, ids, k):
    """Scores agree (rel. error < 1e-4) and the ids are a valid top-k ordering of ``expected``."""
    for q in range(expected.shape[0]):
        position = {int(i): p for p, i in enumerate(ids)}
        got_scores = top.scores[q]
        want_scores = expected[q, [position[int(i)] for i in top.sample_ids[q]]]
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-4, atol=1e-6 * np.abs(expected[q]).max())
        ranked = np.sort(expected[q])[::-1][:k]
        np.testing.assert_allclose(got_scores, ranked, rtol=1e-4, atol=1e-6 * np.abs(expected[q]).max())


def test_query_scores_equal_bruteforce_gradient_dot_products(tiny, tmp_path):
    task, checkpoint = tiny
    config = FeaturizeConfig(projection=ProjectionConfig(kind=ProjectionKind.IDENTITY), batch_size=7)
    store = featurize(task, tmp_path / "store", config, checkpoint=checkpoint, show_progress=False)
    build_index(store, IndexConfig(preconditioner=Preconditioner.IDENTITY), show_progress=False)
    attributor = Attributor.open(store.path, trust_task=True)
    queries = task.query_dataset()
    k = 12
    top = attributor.attribute(queries, k=k, batch_size=3)

    model = task.load_model(checkpoint)
    groups = resolve_groups(task, model, config)
    train_grads = _full_gradients(task, model, groups, task.train_dataset(), task.compute_train_loss)
    query_grads = _full_gradients(task, model, groups, queries, task.compute_measurement)
    train = torch.cat([train_grads[g.name] for g in groups], 1).double()
    query = torch.cat([query_grads[g.name] for g in groups], 1).double()
    expected = (-query @ train.T).numpy()
    _topk_matches(top, expected, task.sample_ids(task.train_dataset()), k)
    assert top.sample_ids.shape == (len(queries), k)


def test_gram_preconditioner_equals_explicit_inverse(tiny, tmp_path):
    task, checkpoint = tiny
    config = FeaturizeConfig(projection=ProjectionConfig(proj_dim=8, seed=4))
    store = featurize(task, tmp_path / "store", config, checkpoint=checkpoint, show_progress=False)
    damping = 0.05
    build_index(store, IndexConfig(preconditioner=Preconditioner.GRAM, damping=damping), show_progress=False)
    queries = task.query_dataset()
    top = Attributor.open(store.path, trust_task=True).attribute(queries, k=40)

    model = task.load_model(checkpoint)
    groups = resolve_groups(task, model, config)
    with GradientProjector(model, groups, config.projection) as projector:
        projectors = projector.projectors
    query_grads = _full_gradients(task, model, groups, queries, task.compute_measurement)
    ids, stored = store.read()
    expected = np.zeros((len(queries), len(ids)))
    for group in groups:
        phi = stored[group.name].astype(np.float64)
        gram = phi.T @ phi / len(phi)
        lam = damping * np.trace(gram) / gram.shape[0]
        explicit_inverse = np.linalg.inv(gram + lam * np.eye(gram.shape[0]))
        phi_q = dense_group_projection(projectors[group.name], query_grads[group.name]).double().numpy()
        expected += -(phi_q @ explicit_inverse) @ phi.T
    _topk_matches(top, expected, ids, 40)


def test_weighted_index_scores_are_weighted_sums_of_group_scores(tiny, tmp_path):
    task, checkpoint = tiny
    config = FeaturizeConfig(projection=ProjectionConfig(kind=ProjectionKind.IDENTITY))
    store = featurize(task, tmp_path / "store", config, checkpoint=checkpoint, show_progress=False)
    weights = {"hidden": 0.25, "out": 3.0}
    save_weights(store, GroupWeights("all", weights, {"config": {"preconditioner": "identity"}}))
    build_index(store, IndexConfig(preconditioner=Preconditioner.IDENTITY), show_progress=False)
    queries = task.query_dataset()
    top = Attributor.open(store.path, trust_task=True).attribute(queries, k=5)

    model = task.load_model(checkpoint)
    groups = resolve_groups(task, model, config)
    train_grads = _full_gradients(task, model, groups, task.train_dataset(), task.compute_train_loss)
    query_grads = _full_gradients(task, model, groups, queries, task.compute_measurement)
    expected = sum(-weights[g] * (query_grads[g].double() @ train_grads[g].double().T) for g in weights).numpy()
    _topk_matches(top, expected, task.sample_ids(task.train_dataset()), 5)


def test_query_with_another_checkpoint_is_refused(tiny, tmp_path):
    task, checkpoint = tiny
    store = featurize(task, tmp_path / "store", checkpoint=checkpoint, show_progress=False)
    build_index(store, show_progress=False)
    other = task.train(tmp_path / "other.pt", seed=1)
    with pytest.raises(StoreMismatchError, match="another checkpoint"):
        Attributor.open(store.path, checkpoint=other, trust_task=True)


def test_projected_scores_correlate_with_exact_scores_on_digits():
    """JL at the default dims: per-group projected scores track exact ones (corr ≥ 0.9)."""
    from gradindex.features.run import featurize_rows
    from gradindex.task import load_task

    for spec in ("digits-mlp", "digits-cnn"):
        task = load_task(spec)
        model = task.load_model(None)
        groups = resolve_groups(task, model, FeaturizeConfig())
        scores = {}
        for name, projection in (("exact", ProjectionConfig(kind=ProjectionKind.IDENTITY)), ("default", ProjectionConfig())):
            with GradientProjector(model, groups, projection) as projector:
                train = featurize_rows(task, model, task.train_dataset(), range(300), projector, 100, torch.device("cpu"))
                query = featurize_rows(task, model, task.query_dataset(), range(40), projector, 40, torch.device("cpu"),
                                       measurement=task.compute_measurement)
            scores[name] = {g: query[g] @ train[g].T for g in train}
        for group in scores["exact"]:
            corr = np.corrcoef(scores["exact"][group].ravel(), scores["default"][group].ravel())[0, 1]
            assert corr >= 0.9, (spec, group, corr)
