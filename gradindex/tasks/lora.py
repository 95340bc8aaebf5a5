"""LoRA adapters for ``nn.Linear`` layers, written so that gradindex attributes them in factorized form.

In: a model and glob patterns over module names. Out: the same model with every matched
``nn.Linear`` replaced by a :class:`LoRALinear` whose base layer is frozen, and every other
parameter of the model frozen too (only the adapters train; frozen parameters are never
attributed).

:class:`LoRALinear` computes ``base(x) + (alpha / rank) · lora_b(lora_a(x))`` with
``lora_a = nn.Linear(d_in, rank)`` and ``lora_b = nn.Linear(rank, d_out)`` (no biases;
``lora_a`` Kaiming-uniform, ``lora_b`` zero, so an adapted model starts equal to its base).
Both factors are plain ``nn.Linear`` submodules, so their per-example gradients are the
factorized outer products ``Σ_t δ_t a_tᵀ`` the engine projects without forming them
(``lora_a``: output gradient ``scale · lora_bᵀ δ``, input ``x``; ``lora_b``: output
gradient ``scale · δ``, input ``lora_a(x)``), each a parameter group of its own by default.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
from torch import nn

from gradindex.config import require_positive
from gradindex.errors import ConfigError


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        require_positive(rank, "LoRA rank")
        self.base = base
        self.base.requires_grad_(False)
        self.rank = int(rank)
        self.scale = float(alpha if alpha is not None else rank) / self.rank
        self.lora_a = nn.Linear(base.in_features, self.rank, bias=False)
        self.lora_b = nn.Linear(self.rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))


def add_lora(model: nn.Module, patterns: Sequence[str], rank: int, alpha: float | None = None,
             seed: int = 0) -> list[str]:
    """Wrap every ``nn.Linear`` of ``model`` whose module name matches a glob of ``patterns`` in a
    :class:`LoRALinear` (adapters initialised from ``seed``) and freeze all other parameters.

    Returns the wrapped module names, in model order. Raises :class:`ConfigError` when nothing matches.
    """
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not targets:
        raise ConfigError(f"LoRA: no nn.Linear module matches {list(patterns)}")
    model.requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return targets
