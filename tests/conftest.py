"""Shared fixtures: tiny seeded toy tasks (tests/toy_tasks.py), their checkpoints and stores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradindex.config import FeaturizeConfig, ProjectionConfig
from gradindex.featurize import featurize
from gradindex.task import load_task

TOY_TASKS = Path(__file__).with_name("toy_tasks.py").resolve()


def toy_spec(name: str) -> str:
    return f"{TOY_TASKS}:{name}"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)  # small tensors; a shared CI machine


def _toy_store(tmp_path_factory, name: str, **options):
    task = load_task(toy_spec(name), options)
    folder = tmp_path_factory.mktemp(name.lower())
    checkpoint = task.train(folder / "model.pt")
    config = FeaturizeConfig(projection=ProjectionConfig(proj_dim=64))
    return featurize(task, folder / "store", config, checkpoint=checkpoint, show_progress=False)


@pytest.fixture(scope="session")
def toy_store(tmp_path_factory):
    """ToyTask store: groups body.0, heads.0 and the planted noise branch."""
    return _toy_store(tmp_path_factory, "ToyTask")


@pytest.fixture(scope="session")
def concept_store(tmp_path_factory):
    """TwoConceptTask store: two heads, concepts 'first' and 'second'."""
    return _toy_store(tmp_path_factory, "TwoConceptTask")
