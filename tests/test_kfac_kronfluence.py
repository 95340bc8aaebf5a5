"""Our K-FAC / EK-FAC factors and scores against kronfluence's on the same model and data (skipped
when kronfluence is not installed; install it with ``pip install --no-deps kronfluence accelerate einconv
einops opt_einsum`` so that it cannot replace the installed torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_kfac import ListTask, ce, fitted, mlp, mlp_data, per_example_full_gradients
from gradindex.features.kfac import FactorInverse

kronfluence = pytest.importorskip("kronfluence")


def kronfluence_factors_and_scores(model, data, tmp_path):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KronfluenceTask

    class Classification(KronfluenceTask):
        def compute_train_loss(self, batch, model, sample=False):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    dataset = torch.utils.data.TensorDataset(*data)
    task = Classification()
    analyzer = Analyzer("gradindex", prepare_model(model, task), task, disable_tqdm=True, cpu=True,
                        output_dir=str(tmp_path))
    dtypes = {f"{name}_dtype": torch.float64 for name in ("activation_covariance", "gradient_covariance", "lambda")}
    analyzer.fit_all_factors("f", dataset, per_device_batch_size=7, overwrite_output_dir=True,
                             factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True, **dtypes))
    analyzer.compute_pairwise_scores("s", "f", dataset, dataset, per_device_query_batch_size=8,
                                     per_device_train_batch_size=8, overwrite_output_dir=True,
                                     score_args=ScoreArguments(damping_factor=None, precondition_dtype=torch.float64,
                                                               per_sample_gradient_dtype=torch.float64,
                                                               score_dtype=torch.float64))
    return analyzer.load_all_factors("f"), analyzer.load_pairwise_scores("s")["all_modules"].double().numpy()


def test_factors_and_ekfac_scores_match_kronfluence(tmp_path):
    model, data = mlp(), mlp_data()
    ours, groups = fitted(model, data, ce)
    theirs, scores = kronfluence_factors_and_scores(mlp(), data, tmp_path)
    for name in ("hidden", "out"):
        f = ours.kron[f"{name}/{name}"]
        their_lam = (theirs["lambda_matrix"][name] / theirs["num_lambda_processed"][name]).double().numpy()
        np.testing.assert_allclose(f.lam, their_lam, rtol=1e-4, atol=1e-10)
        q_a, e_a = theirs["activation_eigenvectors"][name].double().numpy(), theirs["activation_eigenvalues"][name]
        np.testing.assert_allclose(f.q_a @ np.diag(f.eig_a) @ f.q_a.T, q_a @ np.diag(e_a.double().numpy()) @ q_a.T,
                                   rtol=1e-4, atol=1e-10)
    # scores: g_qᵀ (F_EKFAC + λI)⁻¹ g_x, λ = 0.1 · mean(Λ) per module (kronfluence's heuristic)
    inverse = FactorInverse(ours, groups, "ekfac", 0.1, torch.device("cpu"))
    grads = per_example_full_gradients(model, data, ce)
    expected = 0
    for group in groups:
        block = group.blocks[0]
        g = torch.from_numpy(grads[group.name].reshape(len(data[0]), -1))
        expected = expected + inverse(f"{group.name}/{group.name}", block, g).double().numpy() @ g.numpy().T
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-6 * np.abs(expected).max())
