"""K-FAC / EK-FAC against dense computations: hand covariances, naive eigenvalue corrections from a
per-example backward loop, the exact damped Fisher inverse where EK-FAC is exact, and query scores
against a dense inverse applied to per-example autograd gradients."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import HERE, mixed_batch, mixed_loss, rows
from gradindex.config import FeaturizeConfig, Preconditioner, ProjectionConfig, ProjectionKind
from gradindex.errors import ConfigError
from gradindex.features.factor_fit import fit_factors, sample_rows, store_factors
from gradindex.features.groups import parameter_groups
from gradindex.features.kfac import Factors, FactorInverse, group_parts
from gradindex.features.query import QueryFeaturizer, precondition_features
from gradindex.features.run import featurize
from gradindex.task import Task, load_task


class ListTask(Task):
    """Batches are tuples of stacked tensors; ``loss(model, batch) -> [B]``."""

    def __init__(self, data, loss):
        self.data, self.loss = data, loss

    def train_dataset(self):
        return torch.utils.data.TensorDataset(*self.data)

    def compute_train_loss(self, batch, model):
        return self.loss(model, batch)


def mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(OrderedDict([("hidden", nn.Linear(4, 5)), ("act", nn.Tanh()), ("out", nn.Linear(5, 3))]))


def mlp_data(n: int = 24):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def fitted(model, data, loss, batch_size=7) -> tuple[Factors, list]:
    task = ListTask(data, loss)
    groups = parameter_groups(model, [])
    factors = fit_factors(task, model, groups, task.train_dataset(), range(len(data[0])), task.compute_train_loss,
                          batch_size=batch_size)
    return factors, groups


def per_example_full_gradients(model, data, loss) -> dict[str, np.ndarray]:
    """``{module: [N, out, in+1]}`` (weight | bias column) by one backward per example, float64."""
    out = {}
    for n in range(len(data[0])):
        model.zero_grad()
        loss(model, tuple(t[n:n + 1] for t in data)).sum().backward()
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                parts = [module.weight.grad] + ([module.bias.grad[:, None]] if module.bias is not None else [])
                out.setdefault(name, []).append(torch.cat(parts, 1).double().numpy())
    return {k: np.stack(v) for k, v in out.items()}


def hand_covariances(model, data, loss) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{module: (A, S)}`` from module inputs and per-example output gradients recorded by hand."""
    inputs, outputs = {}, {}

    def record(name):
        def hook(module, args, output):
            inputs[name], outputs[name] = args[0], output
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    values = loss(model, data)
    grads = torch.autograd.grad(values.sum(), [outputs[k] for k in outputs])
    for h in handles:
        h.remove()
    result = {}
    for (name, x), g in zip(inputs.items(), grads):
        a = torch.cat([x, torch.ones(len(x), 1)], 1).detach().double().numpy()
        s = g.double().numpy()
        result[name] = (a.T @ a / len(a), s.T @ s / len(s))
    return result


def test_kfac_factors_are_the_hand_computed_covariances_and_their_kronecker_product():
    model, data = mlp(), mlp_data()
    factors, _ = fitted(model, data, ce)
    hand = hand_covariances(model, data, ce)
    full = per_example_full_gradients(model, data, ce)
    for name, (a, s) in hand.items():
        f = factors.kron[f"{name}/{name}"]
        np.testing.assert_allclose(f.q_a @ np.diag(f.eig_a) @ f.q_a.T, a, atol=1e-10)
        np.testing.assert_allclose(f.q_s @ np.diag(f.eig_s) @ f.q_s.T, s, atol=1e-10)
        # K-FAC's Fisher is S ⊗ A on row-major vec([out, in+1]); its eigenvalues e_S e_Aᵀ
        kron = np.kron(s, a)
        basis = np.kron(f.q_s, f.q_a)
        np.testing.assert_allclose(basis @ np.diag(f.eigenvalues("kfac").ravel()) @ basis.T, kron, atol=1e-10)
        # one row per example: Σ_n vec(G)vec(G)ᵀ/N differs from S ⊗ A only by K-FAC's independence assumption
        assert not np.allclose(np.einsum("ni,nj->ij", full[name].reshape(len(full[name]), -1),
                                         full[name].reshape(len(full[name]), -1)) / len(full[name]), kron)


def test_ekfac_eigenvalues_are_the_naive_rotated_second_moments():
    model, data = mlp(), mlp_data()
    factors, _ = fitted(model, data, ce, batch_size=5)
    full = per_example_full_gradients(model, data, ce)
    for name, grads in full.items():
        f = factors.kron[f"{name}/{name}"]
        naive = np.mean([(f.q_s.T @ g @ f.q_a) ** 2 for g in grads], axis=0)
        np.testing.assert_allclose(f.lam, naive, rtol=1e-5, atol=1e-12)  # float32 per-example gradients


def test_ekfac_is_the_exact_damped_fisher_inverse_on_one_linear_layer_with_one_example_per_class():
    """Orthogonal inputs and orthogonal output gradients (regression to one-hot targets at W = 0, one
    example per class, distinct scales): every per-example gradient is one entry in the Kronecker
    eigenbasis, so the Fisher is diagonal there and EK-FAC equals (F + λI)⁻¹ exactly."""
    classes, dim = 3, 4
    model = nn.Sequential(OrderedDict([("layer", nn.Linear(dim, classes, bias=False))]))
    nn.init.zeros_(model.layer.weight)
    x = torch.zeros(classes, dim)
    x[range(classes), range(classes)] = torch.tensor([1.0, 2.0, 3.0])
    y = torch.eye(classes) * torch.tensor([[1.5], [0.5], [2.5]])

    def mse(model, batch):
        return 0.5 * ((model(batch[0]) - batch[1]) ** 2).sum(1)

    factors, groups = fitted(model, (x, y), mse)
    grads = np.stack([(-(y[n, :, None]) * x[n][None, :]).double().numpy() for n in range(classes)])
    vecs = grads.reshape(classes, -1)
    fisher = vecs.T @ vecs / classes
    rho = 0.1
    lam = rho * np.trace(fisher) / fisher.shape[0]
    inverse = FactorInverse(factors, groups, "ekfac", rho, torch.device("cpu"), torch.float64)
    query = torch.randn(2, classes * dim, dtype=torch.float64)
    block = groups[0].blocks[0]
    got = inverse("layer/layer", block, query).double().numpy()
    expected = np.linalg.solve(fisher + lam * np.eye(len(fisher)), query.numpy().T).T
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # K-FAC is not exact here (S ⊗ A has cross terms the Fisher lacks): the test can tell them apart
    kfac = FactorInverse(factors, groups, "kfac", rho, torch.device("cpu"), torch.float64)("layer/layer", block, query)
    assert not np.allclose(kfac.double().numpy(), expected, rtol=1e-3)


def test_generic_and_embedding_blocks_get_the_diagonal_second_moment(mixed_net):
    batch = mixed_batch(9)
    groups = parameter_groups(mixed_net, [])
    task = ListTask(batch, lambda model, b: mixed_loss(model, b))
    factors = fit_factors(task, mixed_net, groups, task.train_dataset(), range(9), task.compute_train_loss,
                          batch_size=4)
    assert set(factors.diag) == {"embed/embed", "norm/norm", "scale/"}, sorted(factors.diag)
    assert {"shared/shared", "conv/conv", "head/head"} <= set(factors.kron)
    for key, param_names in {"embed/embed": ["embed.weight"], "norm/norm": ["norm.weight", "norm.bias"],
                             "scale/": ["scale"]}.items():
        params = dict(mixed_net.named_parameters())
        squares = 0
        for n in range(9):
            grads = torch.autograd.grad(mixed_loss(mixed_net, rows(batch, n)).sum(), [params[p] for p in param_names])
            squares = squares + torch.cat([g.reshape(-1) for g in grads]).double() ** 2
        np.testing.assert_allclose(factors.diag[key], (squares / 9).numpy(), rtol=1e-5, atol=1e-12)
    # the conv block's Λ from patches matches the naive rotation of autograd's per-example conv gradients
    f = factors.kron["conv/conv"]
    lam = 0
    for n in range(9):
        w, b = torch.autograd.grad(mixed_loss(mixed_net, rows(batch, n)).sum(), [mixed_net.conv.weight,
                                                                                mixed_net.conv.bias])
        g = torch.cat([w.reshape(3, -1), b[:, None]], 1).double().numpy()
        lam = lam + (f.q_s.T @ g @ f.q_a) ** 2
    np.testing.assert_allclose(f.lam, lam / 9, rtol=1e-5, atol=1e-12)


@pytest.fixture(scope="module")
def identity_store(tmp_path_factory):
    """TinyTask featurized without projection: the stored rows are the full per-example gradients."""
    task = load_task(f"{HERE / 'tiny_task.py'}:TinyTask")
    folder = tmp_path_factory.mktemp("kfac")
    checkpoint = task.train(folder / "model.pt")
    config = FeaturizeConfig(projection=ProjectionConfig(kind=ProjectionKind.IDENTITY))
    return task, featurize(task, folder / "store", config, checkpoint=checkpoint, show_progress=False)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_query_side_scores_equal_scoring_with_the_dense_inverse(identity_store, kind):
    task, store = identity_store
    featurizer = QueryFeaturizer.open(store, preconditioner=Preconditioner(kind), damping=0.3, trust_task=True)
    queries = task.query_dataset()
    try:
        psi = featurizer.group_features(queries)
        factors = store_factors(featurizer.store)
    finally:
        featurizer.close()
    _, train = featurizer.store.read()
    model = task.load_model(store.manifest["checkpoint"])
    measure = task.compute_measurement
    q_grads = per_example_full_gradients(model, tuple(queries.tensors), lambda m, b: measure(b, m))
    for group in ("hidden", "out"):
        f = factors.kron[f"{group}/{group}"]
        values = f.eigenvalues(kind).ravel()
        basis = np.kron(f.q_s, f.q_a)
        dense_inverse = basis @ np.diag(1 / (values + 0.3 * values.mean())) @ basis.T
        expected = -(q_grads[group].reshape(len(queries), -1) @ dense_inverse) @ train[group].T.astype(np.float64)
        got = psi[group].astype(np.float64) @ train[group].T.astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6 * np.abs(expected).max())


def test_factors_are_listed_checksummed_and_refused_when_corrupt(identity_store):
    from gradindex.errors import StoreMismatchError
    from gradindex.store.feature_store import FeatureStore

    _, store = identity_store
    store = FeatureStore.open(store.path)
    QueryFeaturizer.open(store, preconditioner=Preconditioner.EKFAC, trust_task=True).close()
    store = FeatureStore.open(store.path)
    entry = store.manifest["factors"]
    assert entry["file"].startswith("factors-") and entry["fisher"] == "empirical" and entry["count"] == 40
    assert store.read_factors() is not None
    path = store.path / entry["file"]
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-9] + b"corrupted")
        with pytest.raises((StoreMismatchError, Exception), match="checksum"):
            FeatureStore.open(store.path).read_factors()
    finally:
        path.write_bytes(original)


def test_projected_features_cannot_be_factor_preconditioned(identity_store):
    _, store = identity_store
    with pytest.raises(ConfigError, match="full query gradients"):
        precondition_features(store, {"hidden": np.zeros((1, 30), np.float32)}, Preconditioner.KFAC, 0.1)


def test_sample_rows_caps_and_is_seeded():
    assert list(sample_rows(5, 10, 0)) == [0, 1, 2, 3, 4]
    picked = sample_rows(100, 10, 3)
    assert len(picked) == 10 and list(picked) == sorted(picked) and list(picked) == list(sample_rows(100, 10, 3))
    with pytest.raises(ConfigError):
        sample_rows(5, 0, 0)


def test_group_parts_follow_the_projector_layout(mixed_net):
    groups = parameter_groups(mixed_net, [])
    parts = dict(group_parts(groups))
    assert [key for key, _ in parts["shared"]] == ["shared/shared"]


def test_cli_fit_factors_build_index_and_info(tmp_path):
    from click.testing import CliRunner

    from gradindex.cli import main

    spec = f"{HERE / 'tiny_task.py'}:TinyTask"

    def run(*args):
        result = CliRunner().invoke(main, ["-q", *map(str, args)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    store = tmp_path / "store"
    run("featurize", spec, "--out", store, "--proj-dim", 8)
    out = run("fit-factors", store, "--trust-task", "--fisher", "empirical", "--max-examples", 30)
    assert "empirical Fisher, 30 examples, 2 Kronecker blocks" in out
    run("build-index", store, "--preconditioner", "ekfac", "--trust-task")
    info = run("info", store)
    assert "factors:     K-FAC/EK-FAC, empirical Fisher, 30 examples" in info and "ekfac (damping 0.1)" in info
    bad = CliRunner().invoke(main, ["fit-factors", str(store), "--trust-task", "--max-examples", "0"])
    assert bad.exit_code == 2 and bad.output.startswith("error:") and len(bad.output.strip().splitlines()) == 1


def test_auto_damping_is_refused_for_the_factors():
    model, data = mlp(), mlp_data()
    factors, groups = fitted(model, data, ce)
    with pytest.raises(ConfigError, match="give ekfac a number"):
        FactorInverse(factors, groups, "ekfac", "auto", torch.device("cpu"))


def test_sampled_cross_entropy_draws_labels_from_the_model():
    from gradindex.tasks.classification import sampled_cross_entropy

    probs = torch.tensor([0.7, 0.2, 0.1])
    losses = sampled_cross_entropy(probs.log().repeat(20000, 1))
    frequencies = [float((losses - (-p.log())).abs().lt(1e-5).float().mean()) for p in probs]
    np.testing.assert_allclose(frequencies, probs.numpy(), atol=0.015)


def test_the_true_fisher_falls_back_to_the_empirical_one_for_tasks_that_cannot_sample(caplog):
    from gradindex.features.factor_fit import loss_function

    task = ListTask(mlp_data(), ce)
    loss, used = loss_function(task, "true")
    assert used == "empirical" and loss == task.compute_train_loss and "empirical Fisher" in caplog.text
    digits = load_task("digits")
    assert loss_function(digits, "true")[1] == "true" and loss_function(digits, "empirical")[1] == "empirical"
    with pytest.raises(ConfigError, match="fisher"):
        loss_function(digits, "exact")


def test_factors_are_fitted_on_the_examples_the_store_holds(tmp_path):
    from gradindex.features.factor_fit import fit_store_factors

    task = load_task(f"{HERE / 'tiny_task.py'}:TinyTask")
    checkpoint = task.train(tmp_path / "model.pt")
    store = featurize(task, tmp_path / "store", FeaturizeConfig(projection=ProjectionConfig(proj_dim=8)),
                      checkpoint=checkpoint, limit=20, show_progress=False)
    store = fit_store_factors(store, task, task.load_model(checkpoint))
    assert store.manifest["factors"]["count"] == 20
    store = fit_store_factors(store, task, task.load_model(checkpoint), max_examples=7)
    assert store.manifest["factors"]["count"] == 7 and len(list(tmp_path.glob("store/factors-*.npz"))) == 1
