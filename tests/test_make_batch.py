"""make_batch: the TensorDataset fast path builds what the task's default collate builds."""

from __future__ import annotations

import numpy as np
import torch

from gradindex.task import Task, make_batch


class _Plain(Task):
    pass


class _OwnCollate(Task):
    def collate(self, items):
        return {"x": torch.stack([x for x, _ in items]), "n": len(items)}


def test_tensor_dataset_fast_path_equals_default_collate():
    dataset = torch.utils.data.TensorDataset(torch.randn(10, 3, 2), torch.arange(10) * 7, torch.rand(10) > 0.5)
    task = _Plain()
    for indices in ([4, 1, 9, 1], np.array([0, 5]), range(3, 7)):
        got = make_batch(task, dataset, indices)
        want = task.collate([dataset[int(i)] for i in indices])
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w)


def test_a_task_collate_is_still_used():
    dataset = torch.utils.data.TensorDataset(torch.randn(6, 2), torch.arange(6))
    batch = make_batch(_OwnCollate(), dataset, [2, 3, 5])
    assert batch["n"] == 3 and torch.equal(batch["x"], dataset.tensors[0][[2, 3, 5]])


class _ChannelsLastConv(Task):
    """A user task whose collate stacks ``[H, W, C]`` images and permutes the batch to ``[n, C, H, W]``
    (channels-last strides) — the layout that crashes oneDNN's conv backward on AVX2-only CPUs (issue 19)."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(6, 5, 5, 3, generator=generator)
        self.labels = torch.arange(6) % 2
        self.seen: list[bool] = []
        self.options = {}

    def train_dataset(self):
        return [(self.images[i], self.labels[i]) for i in range(6)]

    def collate(self, items):
        return torch.stack([x for x, _ in items]).permute(0, 3, 1, 2), torch.stack([y for _, y in items])

    def load_model(self, checkpoint=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(18, 2))
        model[0].register_forward_pre_hook(lambda module, args: self.seen.append(args[0].is_contiguous()))
        return model.eval()

    def compute_train_loss(self, batch, model):
        images, labels = batch
        return torch.nn.functional.cross_entropy(model(images), labels, reduction="none")

    compute_measurement = compute_train_loss


def test_channels_last_inputs_reach_the_model_contiguous():
    images = torch.rand(8, 4, 4, 3).permute(0, 3, 1, 2)  # [n, C, H, W] with channels-last strides
    assert not images.is_contiguous()
    dataset = torch.utils.data.TensorDataset(images, torch.arange(8))
    fast = make_batch(_Plain(), dataset, [3, 1, 4])
    assert fast[0].is_contiguous() and torch.equal(fast[0], images[[3, 1, 4]])
    task = _ChannelsLastConv()
    collated = make_batch(task, task.train_dataset(), [0, 2])
    assert collated[0].is_contiguous() and torch.equal(collated[0], task.images[[0, 2]].permute(0, 3, 1, 2))
    assert isinstance(collated, tuple)
    nested = make_batch(_OwnCollate(), [(x, 0) for x in images], [0, 1])
    assert nested["x"].is_contiguous() and nested["n"] == 2


def test_featurize_feeds_a_user_tasks_channels_last_images_contiguous(tmp_path):
    from gradindex.config import FeaturizeConfig, ProjectionConfig
    from gradindex.features.run import featurize

    task = _ChannelsLastConv()
    store = featurize(task, tmp_path / "store", FeaturizeConfig(projection=ProjectionConfig(proj_dim=4), batch_size=3))
    assert store.num_samples == 6 and task.seen and all(task.seen)
