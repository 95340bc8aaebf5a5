"""Adam normalisation (--normalize adam) against a hand computation: g ⊘ (√v̂ + ε) from the optimizer's
own state, per-example gradients from a backward loop, the stored projection applied densely."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiny_task import N_TRAIN, TinyTask, build_model
from gradindex.config import FeaturizeConfig, Normalize, Preconditioner, ProjectionConfig, ProjectionKind
from gradindex.errors import ConfigError
from gradindex.features.normalize import second_moments
from gradindex.features.projection import make_block_projector
from gradindex.features.query import QueryFeaturizer
from gradindex.features.run import featurize
from gradindex.features.groups import parameter_groups
from gradindex.tasks.checkpoints import adam_state


class AdamTinyTask(TinyTask):
    """TinyTask whose checkpoints carry the Adam state ({"state_dict", "optimizer"})."""

    def train(self, path, indices=None, seed=0, raw_state=False):
        torch.manual_seed(seed)
        model = build_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05, eps=1e-3)
        x, y = torch.from_numpy(self.x[:N_TRAIN]), torch.from_numpy(self.y[:N_TRAIN])
        for _ in range(30):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        state = optimizer.state_dict() if raw_state else adam_state(optimizer, model)
        torch.save({"state_dict": model.state_dict(), "optimizer": state}, path)
        return Path(path)

    def load_model(self, checkpoint):
        model = build_model()
        model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
        return model.eval()


SPEC = f"{Path(__file__).resolve()}:AdamTinyTask"


def hand_normalized(task, model, checkpoint, batch, loss) -> dict[str, np.ndarray]:
    """``{module: [n, out·(in+1)]}``: per-example ``g ⊘ (√v̂ + ε)`` from the optimizer state, by hand."""
    saved = torch.load(checkpoint, weights_only=True)["optimizer"]
    beta2, eps, step = saved["betas"][1], saved["eps"], saved["step"]
    out = {}
    for n in range(len(batch[0])):
        model.zero_grad()
        loss(tuple(t[n:n + 1] for t in batch), model).sum().backward()
        for name in ("hidden", "out"):
            module = getattr(model, name)
            v_hat = [saved["exp_avg_sq"][f"{name}.{p}"] / (1 - beta2 ** step) for p in ("weight", "bias")]
            grads = [module.weight.grad, module.bias.grad]
            scaled = [g / (v.sqrt() + eps) for g, v in zip(grads, v_hat)]
            out.setdefault(name, []).append(torch.cat([scaled[0], scaled[1][:, None]], 1).reshape(-1).double())
    return {k: torch.stack(v).numpy() for k, v in out.items()}


@pytest.mark.parametrize("kind", [ProjectionKind.IDENTITY, ProjectionKind.GAUSSIAN])
def test_adam_normalised_rows_and_scores_equal_the_hand_computation(tmp_path, kind):
    task = AdamTinyTask()
    checkpoint = task.train(tmp_path / "model.pt")
    projection = ProjectionConfig(kind=kind, proj_dim=8)
    config = FeaturizeConfig(projection=projection, normalize=Normalize.ADAM)
    store = featurize(task, tmp_path / "store", config, checkpoint=checkpoint, show_progress=False)
    assert store.manifest["config"]["normalize"] == "adam"
    model = task.load_model(checkpoint)
    groups = {g.name: g for g in parameter_groups(model, [])}
    train = tuple(task.train_dataset().tensors)
    hand = hand_normalized(task, model, checkpoint, train, task.compute_train_loss)
    _, stored = store.read()
    projected = {}
    for name, grads in hand.items():
        bp = make_block_projector(name, groups[name].blocks[0], projection)
        projected[name] = bp.project_gradient(torch.from_numpy(grads).float()).double().numpy()
        np.testing.assert_allclose(stored[name], projected[name], rtol=1e-4, atol=1e-6 * np.abs(projected[name]).max())
    # the query side normalises the same way: scores are −⟨P(∇m ⊘ (√v̂+ε)), P(∇ℓ ⊘ (√v̂+ε))⟩
    queries = task.query_dataset()
    featurizer = QueryFeaturizer.open(store, preconditioner=Preconditioner.IDENTITY, trust_task=True)
    try:
        psi = featurizer.group_features(queries)
    finally:
        featurizer.close()
    q_hand = hand_normalized(task, model, checkpoint, tuple(queries.tensors),
                             lambda b, m: task.compute_measurement(b, m))
    for name in hand:
        bp = make_block_projector(name, groups[name].blocks[0], projection)
        expected = -bp.project_gradient(torch.from_numpy(q_hand[name]).float()).double().numpy()
        np.testing.assert_allclose(psi[name], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    # normalisation changes the rows (the test can fail)
    plain = featurize(task, tmp_path / "plain", FeaturizeConfig(projection=projection), checkpoint=checkpoint,
                      show_progress=False)
    assert not np.allclose(plain.read()[1]["hidden"], stored["hidden"], rtol=1e-2)


def test_torch_optimizer_state_dicts_are_read_like_gradindex_state(tmp_path):
    task = AdamTinyTask()
    ours = task.train(tmp_path / "ours.pt")
    raw = task.train(tmp_path / "raw.pt", raw_state=True)
    model = task.load_model(ours)
    a, eps_a = second_moments(ours, model)
    b, eps_b = second_moments(raw, model)
    assert eps_a == eps_b == 1e-3 and set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_a_checkpoint_without_optimizer_state_is_a_one_line_error(tmp_path):
    task = TinyTask()
    checkpoint = task.train(tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="no optimizer state"):
        featurize(task, tmp_path / "store", FeaturizeConfig(normalize="adam"), checkpoint=checkpoint,
                  show_progress=False)
