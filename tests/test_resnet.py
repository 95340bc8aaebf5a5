"""The built-in ``resnet`` task: data, anatomy (≥ 30 groups), seeded training, BatchNorm in eval mode,
per-example gradients against autograd, query files, featurization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lm_reference import assert_features_close, brute_force_features
from reference import per_example_gradients
from task_helpers import assert_query_file_errors

from gradindex.config import FeaturizeConfig, ProjectionConfig, ProjectionKind
from gradindex.errors import ConfigError, StoreMismatchError
from gradindex.features.run import featurize
from gradindex.features.gradients import GradientProjector
from gradindex.features.groups import parameter_groups
from gradindex.task import load_task, make_batch
from gradindex.tasks.concepts import FACTORS
from gradindex.tasks.resnet import ModelConfig, ResNet

TINY = {"num_train": 256, "num_queries": 24, "width": 4, "epochs": 20}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    task = load_task("resnet", TINY)
    checkpoint = task.train(tmp_path_factory.mktemp("resnet") / "tiny.pt")
    return task, task.load_model(checkpoint), checkpoint


def test_default_model_has_31_groups_of_three_kinds():
    task = load_task("resnet")
    model = ResNet(task.model_config)
    groups = parameter_groups(model)
    assert len(groups) == 31
    kinds = {b.kind for g in groups for b in g.blocks}
    assert kinds == {"conv2d", "generic", "linear"}
    names = [g.name for g in groups]
    assert names[:3] == ["conv", "bn", "blocks.0.conv1"] and names[-1] == "head"
    assert {"blocks.2.shortcut_conv", "blocks.2.shortcut_bn", "blocks.4.shortcut_conv"} <= set(names)
    assert task.model_config.num_classes == 6


def test_data_is_seeded_labelled_by_subject_and_queries_are_held_out():
    task = load_task("resnet")
    train, queries = task.train_dataset(), task.query_dataset()
    assert len(train) == 2000 and len(queries) == 400
    images, labels = train.tensors
    assert images.shape == (2000, 3, 16, 16) and float(images.min()) >= -1 and float(images.max()) <= 1
    assert np.array_equal(labels.numpy(), train.factors[:, 0])  # the class is the subject
    meta = task.metadata(train)
    assert list(meta) == ["label", *FACTORS]
    assert set(meta["subject"]) == set(task.concept_config.subjects)
    assert np.bincount(labels.numpy()).min() > 250  # every class is well represented
    again = load_task("resnet")
    assert torch.equal(again.train_dataset().tensors[0], images)
    flat = {row.tobytes() for row in images.numpy()}
    # other draws (seed + 1); a small shape on a plain background can rasterise like a training image
    assert sum(row.tobytes() in flat for row in queries.tensors[0].numpy()) <= 2


def test_training_is_seeded_uses_the_subset_and_learns(tiny, tmp_path):
    task, model, _ = tiny
    a = task.load_model(task.train(tmp_path / "a.pt", indices=range(64), seed=5))
    b = task.load_model(task.train(tmp_path / "b.pt", indices=range(64), seed=5))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    other = task.load_model(task.train(tmp_path / "other.pt", indices=range(64, 128), seed=5))
    assert not torch.equal(other.head.weight, a.head.weight)
    torch.manual_seed(0)
    untrained = ResNet(task.model_config).eval()
    batch = make_batch(task, task.train_dataset(), range(256))
    with torch.no_grad():  # in eval mode, with BatchNorm's running statistics
        assert task.compute_train_loss(batch, model).mean() < 0.7 * task.compute_train_loss(batch, untrained).mean()
    with pytest.raises(ConfigError, match="indices"):
        task.train(tmp_path / "bad.pt", indices=[0, 256])


def test_batchnorm_uses_running_statistics_in_eval_mode(tiny):
    """Examples do not interact: one example's outputs do not depend on its batch."""
    task, model, _ = tiny
    batch = make_batch(task, task.train_dataset(), range(8))
    with torch.no_grad():
        together = model(batch[0])
        alone = torch.cat([model(batch[0][i : i + 1]) for i in range(8)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert not model.training and float(model.bn.running_var.sub(1).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", [ProjectionKind.IDENTITY, ProjectionKind.GAUSSIAN])
def test_per_example_gradients_match_autograd(tiny, kind):
    """Loss and margin: the engine's batched, hooked gradients == one autograd pass per example."""
    task, model, _ = tiny
    groups = parameter_groups(model)
    config = ProjectionConfig(kind=kind, proj_dim=64, seed=3)
    for dataset, function in ((task.train_dataset(), task.compute_train_loss),
                              (task.query_dataset(), task.compute_measurement)):
        with GradientProjector(model, groups, config) as projector:
            got = projector(lambda: function(make_batch(task, dataset, range(4)), model), verify=True)
            items = [dataset[i] for i in range(4)]
            expected = brute_force_features(model, projector, items, lambda b: function(b, model), task.collate)
        assert_features_close(got, expected)
        if kind is ProjectionKind.IDENTITY:  # also against the module-free reference layout, group by group
            full = per_example_gradients(model, groups, lambda b: function(b, model),
                                         [make_batch(task, dataset, [i]) for i in range(4)])
            assert_features_close(got, full)


def test_query_files_round_trip_and_errors(tiny, tmp_path):
    task, _, _ = tiny
    queries = task.query_dataset()
    path = task.save_queries(tmp_path / "q.npz", queries)
    loaded = task.load_queries(path)
    torch.testing.assert_close(loaded.tensors[0], queries.tensors[0], rtol=0, atol=1e-6)
    assert torch.equal(loaded.tensors[1], queries.tensors[1])
    assert list(task.metadata(loaded)) == ["label"]  # factors of a file's images are unknown
    images = np.zeros((2, 16, 16, 3), np.uint8)
    np.savez(tmp_path / "unlabelled.npz", images=images)
    assert task.load_queries(tmp_path / "unlabelled.npz").tensors[1].tolist() == [-1, -1]
    assert_query_file_errors(task, tmp_path, [({"images": images[:, :8]}, "shape"), ({"x": images}, "'images'"),
                                              ({"images": images.astype(np.float32)}, "uint8"),
                                              ({"images": images, "y": np.array([0, 6])}, "labels")])


def test_checkpoint_of_another_width_is_refused(tiny, tmp_path):
    _, _, checkpoint = tiny
    with pytest.raises(StoreMismatchError, match="resnet"):
        load_task("resnet", {**TINY, "width": 8}).load_model(checkpoint)
    with pytest.raises(ConfigError, match="num_queries"):
        load_task("resnet", {"num_queries": 0})
    with pytest.raises(ConfigError, match="width"):
        ModelConfig(num_classes=6, width=0)


def test_featurize_stores_every_group_and_the_factors(tiny, tmp_path):
    task, _, checkpoint = tiny
    config = FeaturizeConfig(projection=ProjectionConfig(proj_dim=16), batch_size=32)
    store = featurize(task, tmp_path / "store", config, checkpoint=checkpoint, show_progress=False)
    assert store.num_samples == 256 and len(store.groups) == 31
    _, meta = store.read_metadata()
    assert sorted(meta) == sorted(["label", *FACTORS])
    _, feats = store.read()
    assert all(np.isfinite(block).all() and np.abs(block).sum() > 0 for block in feats.values())


def test_training_images_reach_the_convolutions_contiguous(monkeypatch):
    """Channels-last training images crash oneDNN's conv backward on AVX2-only CPUs (issue 19): the task's
    images are row-major, and train_resnet makes any input so before its first convolution."""
    from gradindex.tasks import resnet

    task = load_task("resnet", {"num_train": 16, "num_queries": 4, "width": 2, "epochs": 1})
    images = task.train_dataset().tensors[0]
    assert images.is_contiguous()
    seen = []
    forward = ResNet.forward
    monkeypatch.setattr(ResNet, "forward", lambda self, x: (seen.append(x.is_contiguous()), forward(self, x))[1])
    channels_last = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    resnet.train_resnet(task.model_config, channels_last, task.train_dataset().tensors[1], seed=0,
                        train=resnet.TrainConfig(epochs=1))
    assert seen and all(seen)


def test_training_on_channels_last_images_survives_an_avx2_only_cpu(tmp_path):
    """The crash itself (issue 19): oneDNN limited to AVX2 (what an AVX-512 machine runs as an AMD EPYC
    without AVX-512) corrupts the heap in the conv backward of channels-last inputs. Run in a child
    process, so the old code's native crash fails this test instead of killing pytest."""
    import os
    import subprocess
    import sys

    script = (
        "from gradindex.task import load_task\n"
        "from gradindex.tasks import resnet\n"
        "task = load_task('resnet', {'num_train': 32, 'num_queries': 4, 'width': 2, 'epochs': 1})\n"
        "images, labels = task.train_dataset().tensors\n"
        "images = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)\n"
        "resnet.train_resnet(task.model_config, images, labels, seed=0, train=resnet.TrainConfig(epochs=6, batch_size=8))\n"
        "print('trained')\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-2000:]
