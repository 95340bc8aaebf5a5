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
