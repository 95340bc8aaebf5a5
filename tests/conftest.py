"""Shared seeded fixtures. Files only under tmp_path; no network; CPU only.

Tiny seeded toy tasks (tests/toy_tasks.py) with their checkpoints and stores for weight learning.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradindex.config import FeaturizeConfig, ProjectionConfig
from gradindex.features.run import featurize
from gradindex.task import load_task

HERE = Path(__file__).parent
TOY_TASKS = HERE.joinpath("toy_tasks.py").resolve()


def toy_spec(name: str) -> str:
    return f"{TOY_TASKS}:{name}"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)  # small tensors; a shared CI machine


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    """Checkpoints the built-in tasks train on first use go to a per-session folder."""
    home = tmp_path_factory.mktemp("gradindex-home")
    old = os.environ.get("GRADINDEX_HOME")
    os.environ["GRADINDEX_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("GRADINDEX_HOME", None)
    else:
        os.environ["GRADINDEX_HOME"] = old


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    np.random.seed(0)


class MixedNet(nn.Module):
    """Embedding + LayerNorm (generic) + Linear used twice + in-place ReLU + Conv2d."""

    def __init__(self, vocab: int = 11, dim: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.shared = nn.Linear(dim, dim)
        self.conv = nn.Conv2d(1, 3, kernel_size=3, stride=2, padding=1, dilation=1)
        self.head = nn.Linear(dim + 3 * 2 * 2, 4)
        self.scale = nn.Parameter(torch.ones(4))  # a root parameter: generic block of the root

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(tokens))  # [B, T, dim]
        h = torch.relu_(self.shared(h))  # in-place op on a hooked module's output
        h = self.shared(h).mean(1)  # the same module called a second time
        c = self.conv(image).flatten(1)  # [B, 12]
        return self.head(torch.cat([h, c], dim=1)) * self.scale


def mixed_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 11, (n, 5), generator=g)
    image = torch.randn(n, 1, 4, 4, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    return tokens, image, labels


def mixed_loss(model: nn.Module, batch) -> torch.Tensor:
    tokens, image, labels = batch
    return nn.functional.cross_entropy(model(tokens, image), labels, reduction="none")


def rows(batch, i: int):
    return tuple(t[i : i + 1] for t in batch)


@pytest.fixture
def mixed_net() -> MixedNet:
    torch.manual_seed(1)
    return MixedNet().eval()


def _toy_store(tmp_path_factory, name: str, **options):
    task = load_task(toy_spec(name), options)
    folder = tmp_path_factory.mktemp(name.lower())
    checkpoint = task.train(folder / "model.pt")
    # factor_dim 8 = one LoGra product at proj_dim 64: the projection these fixtures were tuned on (weights-lds)
    config = FeaturizeConfig(projection=ProjectionConfig(proj_dim=64, factor_dim=8))
    return featurize(task, folder / "store", config, checkpoint=checkpoint, show_progress=False)


@pytest.fixture(scope="session")
def toy_store(tmp_path_factory):
    """ToyTask store: groups body.0, heads.0 and the planted noise branch."""
    return _toy_store(tmp_path_factory, "ToyTask")


@pytest.fixture(scope="session")
def concept_store(tmp_path_factory):
    """TwoConceptTask store: two heads, concepts 'first' and 'second'."""
    return _toy_store(tmp_path_factory, "TwoConceptTask")


def _gpu_ready() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def pytest_collection_modifyitems(config, items):
    if _gpu_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with torch and a GPU build of FAISS")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS, tests/s3_server.py) on 127.0.0.1 for the session;
    the tests that use it skip, saying why, where it cannot be started."""
    from s3_server import start_seaweedfs

    try:
        server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    except RuntimeError as err:
        pytest.skip(f"no S3 test server: {err}")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The S3 server's endpoint and credentials in the environment (leases of 3 s: a killed writer's
    expires quickly)."""
    for name, value in s3_server.env(GRADINDEX_LEASE_SECONDS="3").items():
        monkeypatch.setenv(name, value)
    return s3_server
