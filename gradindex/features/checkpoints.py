"""TracIn over checkpoints (TracIn-CP; DESIGN §1.2): one store, one projected block per checkpoint.

In: a task spec (and its options), checkpoints ``θ_1..θ_K`` and their weights ``η_1..η_K``
(learning rates). Out: :class:`CheckpointEnsemble`, a :class:`~gradindex.task.Task` whose
model holds the K checkpoints side by side (``c0.<module>``, ``c1.<module>``, …) and whose

* training loss is ``Σ_c ℓ(x; θ_c)``: the gradient w.r.t. ``θ_c`` is ``∇ℓ(x; θ_c)``, so the
  stored row is ``[φ^(1)(x); …; φ^(K)(x)]`` with a group per checkpoint and module
  (``c0.fc1``, ``c1.fc1``, …), each block with its own matrix drawn from the one ``seed``;
* measurement is ``Σ_c η_c m(q; θ_c)``: the query block of checkpoint ``c`` is
  ``η_c ∇m(q; θ_c)``, so ``u(q)ᵀv(x) = Σ_c η_c ⟨∇m(q; θ_c), ∇ℓ(x; θ_c)⟩`` (TracIn-CP).

The weights act on the query side only: :func:`set_checkpoint_weights` changes them in the
manifest without touching a stored row (indexes built before must be built again to use
them, as after learning new group weights). Learned group weights are per checkpoint and
module (the paper's learned multi-checkpoint TracIn).

``RUN_DIR/checkpoints.json`` (written by built-in tasks' ``train(..., keep_checkpoints=K)``,
:func:`write_run_index`) lists ``[{"file", "lr", "step"}]``; :func:`run_checkpoints` reads it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradindex.config import GroupRule
from gradindex.errors import ArtifactNotFoundError, ConfigError
from gradindex.task import Task, load_task

#: the spec the manifest records for a multi-checkpoint store
ENSEMBLE_SPEC = "gradindex.features.checkpoints:CheckpointEnsemble"
RUN_INDEX = "checkpoints.json"


class CheckpointEnsemble(Task):
    """The task ``task`` (spec, with ``task_options``) over ``checkpoints`` weighted by ``weights``."""

    def __init__(self, task: str = "", task_options: dict | None = None, checkpoints: Sequence[str] = (),
                 weights: Sequence[float] | None = None):
        checkpoints = [str(Path(c).resolve()) if Path(c).exists() else str(c) for c in checkpoints]
        if not task or len(checkpoints) < 1:
            raise ConfigError("checkpoint ensemble: expected a task spec and at least one checkpoint")
        weights = [1.0] * len(checkpoints) if weights is None else [float(w) for w in weights]
        check_weights(weights, len(checkpoints))
        self.base = load_task(task, dict(task_options or {}))
        self.checkpoints = checkpoints
        self.weights = weights
        base = self.base.spec()  # file specs resolved: the store works from any folder
        self.options = {"task": base["task"], "task_options": base["options"], "checkpoints": checkpoints,
                        "weights": weights}

    # -- model ------------------------------------------------------------------------------
    def load_model(self, checkpoint: str | Path | None) -> nn.Module:
        if checkpoint is not None:
            raise ConfigError("a multi-checkpoint store names its checkpoints in its task options; "
                              "query it without --checkpoint")
        return nn.ModuleDict({f"c{i}": self.base.load_model(c) for i, c in enumerate(self.checkpoints)}).eval()

    def parameter_groups(self, model: nn.Module) -> Sequence[GroupRule]:
        """The base task's rules, once per checkpoint (patterns and plain group names prefixed ``c<i>.``)."""
        rules = []
        for i, name in enumerate(model):
            for rule in self.base.parameter_groups(model[name]):
                group = rule.group if rule.group is None or "{" in rule.group else f"{name}.{rule.group}"
                rules.append(GroupRule(f"{name}.{rule.pattern}", group))
        return rules

    def _each(self, model: nn.ModuleDict, value, weighted: bool) -> torch.Tensor:
        total = 0
        for i, name in enumerate(model):
            total = total + (self.weights[i] if weighted else 1.0) * value(model[name])
        return total

    # -- losses -----------------------------------------------------------------------------
    def compute_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self._each(model, lambda m: self.base.compute_train_loss(batch, m), weighted=False)

    def compute_sampled_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self._each(model, lambda m: self.base.compute_sampled_loss(batch, m), weighted=False)

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self._each(model, lambda m: self.base.compute_measurement(batch, m), weighted=True)

    def concept_measurement(self, batch: Any, model: nn.Module, concept: str) -> torch.Tensor:
        return self._each(model, lambda m: self.base.concept_measurement(batch, m, concept), weighted=True)

    # -- everything else is the base task's -------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in ("base", "checkpoints", "weights", "options"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def train_dataset(self) -> Sequence:
        return self.base.train_dataset()

    def query_dataset(self) -> Sequence:
        return self.base.query_dataset()

    def collate(self, items: list[Any]) -> Any:
        return self.base.collate(items)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return self.base.to_device(batch, device)

    def sample_ids(self, dataset: Sequence):
        return self.base.sample_ids(dataset)

    def metadata(self, dataset: Sequence):
        return self.base.metadata(dataset)

    def load_queries(self, path):
        return self.base.load_queries(path)

    def queries_from_json(self, inputs):
        return self.base.queries_from_json(inputs)

    def query_splits(self, count: int):
        return self.base.query_splits(count)

    def concept_queries(self, concept: str):
        return self.base.concept_queries(concept)

    def render(self, item):
        return self.base.render(item)

    def describe(self, item) -> str:
        return self.base.describe(item)

    @property
    def concepts(self):
        return self.base.concepts

    def spec(self) -> dict[str, Any]:
        return {"task": ENSEMBLE_SPEC, "options": self.options}


def featurize_target(task_spec: str, task_options: dict, checkpoints: Sequence[str | Path] = (),
                     weights: Sequence[float] = (), run_dir: str | Path | None = None) -> tuple[Task, str | None]:
    """``(task, checkpoint)`` for featurize: the plain task and its one checkpoint (or None), or a
    :class:`CheckpointEnsemble` (checkpoint None) for several checkpoints, ``weights`` or a ``run_dir``
    (its checkpoints follow the given ones; its learning rates are the default weights)."""
    checkpoints = [str(c) for c in checkpoints]
    weights = [float(w) for w in weights]
    if run_dir is not None:
        files, lrs = run_checkpoints(run_dir)
        if not weights:
            weights = [1.0] * len(checkpoints) + lrs if checkpoints else lrs
        checkpoints += files
    if len(checkpoints) <= 1 and not weights:
        return load_task(task_spec, task_options), (checkpoints[0] if checkpoints else None)
    if not checkpoints:
        raise ConfigError("--checkpoint-weights: give the checkpoints they weight (--checkpoint, repeated)")
    return CheckpointEnsemble(task_spec, task_options, checkpoints, weights or None), None


def check_weights(weights: Sequence[float], count: int) -> None:
    if len(weights) != count:
        raise ConfigError(f"checkpoint weights: expected {count} (one per checkpoint), got {len(weights)}")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ConfigError(f"checkpoint weights: expected finite non-negative numbers, got {list(weights)}")


def ensemble_spec_code(spec: dict[str, Any]) -> str:
    """The task code a manifest's task entry runs: the base task's spec for a multi-checkpoint store."""
    if spec.get("task") == ENSEMBLE_SPEC:
        return str(spec.get("options", {}).get("task", ""))
    return spec["task"]


def write_run_index(run_dir: str | Path, entries: Sequence[dict[str, Any]]) -> Path:
    """Write ``RUN_DIR/checkpoints.json``: ``[{"file" (relative to RUN_DIR), "lr", "step"}]``."""
    from gradindex.store.feature_store import atomic_write_json

    path = Path(run_dir) / RUN_INDEX
    atomic_write_json(path, {"checkpoints": list(entries)})
    return path


def run_checkpoints(run_dir: str | Path) -> tuple[list[str], list[float]]:
    """``(checkpoint paths, learning rates)`` that ``RUN_DIR/checkpoints.json`` lists."""
    path = Path(run_dir) / RUN_INDEX
    if not path.is_file():
        raise ArtifactNotFoundError(f"no {RUN_INDEX} in {run_dir}; train with keep_checkpoints=K to write one")
    try:
        entries = json.loads(path.read_text())["checkpoints"]
        files = [str((Path(run_dir) / e["file"]).resolve()) for e in entries]
        lrs = [float(e["lr"]) for e in entries]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: expected {{\"checkpoints\": [{{\"file\", \"lr\", \"step\"}}]}} ({err})") from None
    if not files:
        raise ConfigError(f"{path} lists no checkpoints")
    return files, lrs


def set_checkpoint_weights(store, weights: Sequence[float]) -> None:
    """Change a multi-checkpoint store's query-side checkpoint weights (no stored row changes)."""
    spec = store.manifest["task"]
    if spec.get("task") != ENSEMBLE_SPEC:
        raise ConfigError(f"{store.path} holds one checkpoint; its features have no checkpoint weights")
    weights = [float(w) for w in weights]
    check_weights(weights, len(spec["options"]["checkpoints"]))
    store.update_manifest(lambda m: {**m, "task": {**m["task"], "options": {**m["task"]["options"],
                                                                             "weights": weights}}})
