"""Ray featurization on a GPU: one worker per GPU (``device="auto"``) gives the store a
single-process ``featurize --device cuda`` gives. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from gradindex.config import FeaturizeConfig  # noqa: E402
from gradindex.features.distributed import featurize_ray, local_ray  # noqa: E402
from gradindex.features.run import featurize  # noqa: E402
from gradindex.task import load_task  # noqa: E402

TINY = f"{Path(__file__).parent / 'tiny_task.py'}:TinyTask"


@pytest.mark.gpu
def test_one_worker_per_gpu_matches_single_process_cuda(tmp_path):
    import torch

    task = load_task(TINY)
    checkpoint = task.train(tmp_path / "tiny.pt")
    config = FeaturizeConfig(batch_size=4, shard_size=8)
    reference = featurize(task, tmp_path / "single", config, checkpoint=checkpoint, device="cuda",
                          show_progress=False)
    with local_ray(num_cpus=2, num_gpus=torch.cuda.device_count(), log_to_driver=False):
        store = featurize_ray(task, tmp_path / "ray", config, checkpoint=checkpoint, device="auto",
                              show_progress=False)
    assert store.manifest["ray"]["device"] == "cuda"
    assert store.manifest["ray"]["workers"] == min(torch.cuda.device_count(), 5)
    ids, feats = store.read()
    ref_ids, ref_feats = reference.read()
    np.testing.assert_array_equal(ids, ref_ids)
    for group, block in ref_feats.items():
        np.testing.assert_allclose(feats[group], block, rtol=1e-5, atol=1e-6)
