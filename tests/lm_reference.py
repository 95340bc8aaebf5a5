"""Test-only references for the causal-LM tests: a tiny corpus config and brute-force gradients."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from gradindex.features.gradients import GradientProjector, reference_layout
from gradindex.features.groups import part_owners
from gradindex.task import load_task
from gradindex.tasks.training import one_thread

TINY_CORPUS = {
    "seed": 3,
    "syllables": ["ba", "di", "ko", "mu", "ne", "sa"],
    "names": {"person": {"count": 10, "syllables": 2}, "city": {"count": 4, "syllables": 3}},
    "subject": "person",
    "objects": {"pet": ["cat", "dog", "owl"]},
    "relations": [
        {"name": "home", "object": "city", "templates": ["{s} lives in {o} .", "{s} moved to {o} ."],
         "query": "{s} lives in"},
        {"name": "pet", "object": "pet", "templates": ["{s} owns a {o} .", "at home {s} keeps a {o} ."],
         "query": "{s} owns a"},
    ],
    "mentions": [[1, 0.5], [2, 0.5]],
    "sentences_per_sequence": [1, 2],
    "num_queries": 8,
}



@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread (and the test machine is shared): import it into a test
    module to run the whole module so."""
    with one_thread():
        yield

def write_tiny_corpus(path: Path, **changes) -> Path:
    path.write_text(json.dumps({**TINY_CORPUS, **changes}))
    return path


def tiny_lm(root: Path, epochs: int) -> tuple:
    """``(task, checkpoint)``: the ``lm`` task on the tiny corpus (width 16, 2 layers, 2 heads) trained for
    ``epochs`` into ``root/model.pt``."""
    options = {"corpus": str(write_tiny_corpus(root / "corpus.json")), "width": 16, "layers": 2, "heads": 2,
               "epochs": epochs}
    task = load_task("lm", options)
    return task, task.train(root / "model.pt")


def assert_projector_matches_brute_force(task, model: nn.Module, groups, config, cases) -> None:
    """For each ``(items, function)`` of ``cases``: the projector's batched per-example features of
    ``function(batch, model)`` equal :func:`brute_force_features` (one backward per example)."""
    with GradientProjector(model, groups, config) as projector:
        for items, function in cases:
            batch = task.collate(list(items))
            got = projector(lambda: function(batch, model), verify=True)
            expected = brute_force_features(model, projector, items, lambda b: function(b, model), task.collate)
            assert_features_close(got, expected)


def brute_force_features(
    model: nn.Module,
    projector: GradientProjector,
    items: Sequence,
    value: Callable[[object], torch.Tensor],
    collate: Callable[[list], object],
) -> dict[str, torch.Tensor]:
    """``{group: [n, k_g]}`` from one ``backward`` per example (each example alone in its batch),
    laid out and projected exactly as :class:`GradientProjector` lays out its features."""
    rows: dict[str, list[torch.Tensor]] = {}
    modules = dict(model.named_modules())
    for item in items:
        with torch.enable_grad():
            scalar = value(collate([item]))[0]
            for group in projector.groups:
                parts = []
                for position in part_owners(group.blocks):
                    bp = projector.projectors[group.name][position]
                    module = modules[bp.block.module]
                    params = [getattr(module, name) for name in bp.block.params]
                    grads = torch.autograd.grad(scalar, params, retain_graph=True, allow_unused=True)
                    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
                    flat = reference_layout(bp.block.kind, bp.block.params, grads).unsqueeze(0)
                    parts.append(bp.project_gradient(flat)[0])
                rows.setdefault(group.name, []).append(torch.cat(parts))
    return {group: torch.stack(values) for group, values in rows.items()}


def assert_features_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-4) -> None:
    assert set(got) == set(expected)
    for group, value in expected.items():
        scale = float(value.norm())
        error = float((got[group] - value).norm())
        assert error <= rtol * max(scale, 1e-6), f"group {group}: relative error {error / max(scale, 1e-12):.2e}"
