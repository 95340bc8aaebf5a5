"""The seeded training loop the built-in tasks share (digits, tabular, resnet, lm).

:func:`seeded_model` builds a model under ``torch.manual_seed(seed)`` without touching the
caller's random state; :func:`train_epochs` runs epochs of mini-batches in an order drawn from
a generator seeded by ``seed``; :func:`one_thread` runs a block on one CPU thread (small GEMMs
are as fast, and parallel retrainings do not fight). Same seed, same data → the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)``; the caller's thread count comes back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def seeded_model(build: Callable[[], M], seed: int) -> M:
    """``build()`` under ``torch.manual_seed(seed)``, the global random state restored after."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def train_epochs(model: M, batch_loss: Callable[[torch.Tensor], torch.Tensor], count: int, epochs: int,
                 batch_size: int, seed: int, optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
                 on_epoch: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None) -> M:
    """Train ``model`` in place for ``epochs`` passes over ``count`` examples; returns it in eval mode.

    Each epoch draws a permutation of ``0..count-1`` from a generator seeded by ``seed`` and cuts it
    into mini-batches of ``batch_size`` positions ``rows [B]`` (int64); ``batch_loss(rows)`` is the
    scalar loss of those examples. ``optimizer`` (and ``schedule``, if any) step once per batch;
    ``on_epoch(epoch, model, optimizer)`` runs after each epoch (1-based; e.g. keeping checkpoints).
    """
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, batch_size):
            rows = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            batch_loss(rows).backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, model, optimizer)
    return model.eval()
