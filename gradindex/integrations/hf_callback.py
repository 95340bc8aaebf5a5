"""A ``transformers.Trainer`` callback writing gradindex stores during training (``pip install 'gradindex[hf]'``).

In: a Trainer training a causal LM (a ``transformers`` model, or a ``peft`` LoRA model
whose trainable parameters are the adapters) on a dataset with an ``input_ids`` column
(a ``datasets.Dataset`` or a list of dicts). Out, under ``store``:

* ``train.jsonl`` — the training sequences (``{"input_ids": [...]}``), line ``i`` =
  training-set index ``i``, which is also each row's ``sample_id``;
* ``step-000040/`` … — one complete gradindex store per checkpoint event (``every``:
  each ``N`` optimizer steps, each ``"epoch"``, or each ``"save"`` of the Trainer): the
  per-example projected gradients of the per-sequence training loss (next-token
  cross-entropy, token mean) at the model of that moment, with the model saved beside
  it (``step-000040/model``, ``save_pretrained``: the LoRA adapter for a peft model) and
  named in its manifest, so ``build-index``, ``query`` and ``query --tokens`` work on
  it with no extra featurize pass;
* ``checkpoints.json`` — ``[{"step", "epoch", "learning_rate", "store", "model"}]``,
  the learning rates a TracIn-over-checkpoints sum weights the blocks by
  (:func:`checkpoint_scores`).

It equals a post-hoc ``gradindex featurize gradindex.integrations.hf:HFCausalLMTask``
of the same model directory and ``train.jsonl`` (``bos_id=-1``: the sequences are
taken as tokenized). A block already complete (a resumed run) is kept. The model is
featurized in eval mode (no dropout) and put back in its mode afterwards. One
process only: under distributed data parallel it refuses to start (featurize the
saved checkpoints afterwards, e.g. with ``featurize --ray``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import transformers

from gradindex.config import FeaturizeConfig, GroupRule, ProjectionConfig
from gradindex.errors import ConfigError
from gradindex.features.run import featurize
from gradindex.integrations.hf import HFCausalLMTask
from gradindex.store.feature_store import FeatureStore, temporary_path

logger = logging.getLogger(__name__)

HF_TASK_SPEC = "gradindex.integrations.hf:HFCausalLMTask"


class GradindexCallback(transformers.TrainerCallback):
    """Write a gradindex store of the training set at each checkpoint event (see the module docstring).

    ``store``: the output directory. ``every``: ``N`` (optimizer steps), ``"epoch"`` or ``"save"``.
    ``projection`` / ``proj_dim``: the random projection (``proj_dim`` sets
    :attr:`ProjectionConfig.proj_dim` of the default). ``group_rules``: ``PATTERN=GROUP`` strings or
    :class:`GroupRule` s. ``dataset``: the training set (default: the Trainer's ``train_dataset``).
    """

    def __init__(self, store: str | Path, every: int | str = "epoch", proj_dim: int | None = None,
                 projection: ProjectionConfig | None = None, group_rules: Sequence[str | GroupRule] = (),
                 batch_size: int = 8, dataset: Any = None, show_progress: bool = False):
        if not (every in ("epoch", "save") or (isinstance(every, int) and not isinstance(every, bool) and every > 0)):
            raise ConfigError(f"GradindexCallback.every: expected a positive number of steps, 'epoch' or 'save', "
                              f"got {every!r}")
        if projection is None:
            projection = ProjectionConfig() if proj_dim is None else ProjectionConfig(proj_dim=proj_dim)
        elif proj_dim is not None:
            raise ConfigError("GradindexCallback: give projection or proj_dim, not both")
        rules = tuple(GroupRule.parse(r) if isinstance(r, str) else r for r in group_rules)
        self.config = FeaturizeConfig(projection=projection, group_rules=rules, batch_size=batch_size)
        self.root = Path(store)
        self.every = every
        self.dataset = dataset
        self.show_progress = show_progress
        self.blocks: list[dict[str, Any]] = []

    # -- Trainer events -----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs) -> None:
        if args.world_size > 1:
            raise ConfigError(
                f"GradindexCallback runs in one process, this Trainer has {args.world_size} (distributed data "
                "parallel): train without it and featurize the saved checkpoints afterwards "
                "(gradindex featurize ... --checkpoint DIR, or --ray)")
        self.root.mkdir(parents=True, exist_ok=True)
        dataset = self.dataset
        if dataset is None:
            loader = kwargs.get("train_dataloader")
            dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ConfigError("GradindexCallback: no training set (pass dataset=...)")
        _write_atomically(self.root / "train.jsonl", "".join(json.dumps({"input_ids": ids}) + "\n"
                                                             for ids in sequences(dataset)))
        listing = self.root / "checkpoints.json"
        self.blocks = json.loads(listing.read_text()) if listing.is_file() else []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if isinstance(self.every, int) and state.global_step % self.every == 0:
            self._write_block(state, **kwargs)

    def on_epoch_end(self, args, state, control, **kwargs) -> None:
        if self.every == "epoch":
            self._write_block(state, **kwargs)

    def on_save(self, args, state, control, **kwargs) -> None:
        if self.every == "save":
            self._write_block(state, **kwargs)

    # -- one block ----------------------------------------------------------------------------
    def _write_block(self, state, model=None, lr_scheduler=None, **_: Any) -> None:
        name = f"step-{state.global_step:06d}"
        if any(block["store"] == name for block in self.blocks):
            return  # written before (a resumed run)
        block = self.root / name
        model_dir = block / "model"
        _save_quietly(model, model_dir)
        task = HFCausalLMTask(model=str(model_dir), train_file=str(self.root / "train.jsonl"), bos_id=-1)
        task.load_model = lambda checkpoint: model  # featurize the live model (same weights as model_dir)
        device = str(next(model.parameters()).device)
        training = model.training
        try:
            featurize(task, block / "store", self.config, checkpoint=str(model_dir), device=device,
                      overwrite=True, show_progress=self.show_progress)
        finally:
            model.train(training)
        rate = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else None
        self.blocks.append({"step": state.global_step, "epoch": state.epoch, "learning_rate": rate,
                            "store": name, "model": f"{name}/model"})
        _write_atomically(self.root / "checkpoints.json", json.dumps(self.blocks, indent=1) + "\n")
        logger.info("gradindex: wrote %s (step %d, learning rate %s)", block / "store", state.global_step, rate)

    def stores(self) -> list[FeatureStore]:
        """The stores written so far, in training order (each opens with its task trusted: we wrote it)."""
        return [FeatureStore.open(self.root / block["store"] / "store", trust_task=True) for block in self.blocks]


def checkpoint_scores(store: str | Path, inputs: str | Path, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """TracIn over the callback's checkpoints: ``Σ_b lr_b · score_b(q, x)`` for the queries in ``inputs``.

    Returns ``(sample_ids [N], scores [n, N])``. Each block is scored exactly from its store under its
    own setting (:func:`gradindex.query.attributor.score_setting`: its index's preconditioner and weights
    when built, else Gram) — build each block's index with ``--preconditioner identity`` for TracIn's
    plain gradient dot products. A block without a recorded learning rate counts with weight 1.
    """
    from gradindex.query.attributor import all_scores

    root = Path(store)
    listing = root / "checkpoints.json"
    if not listing.is_file():
        raise ConfigError(f"{root}: no checkpoints.json; is it a GradindexCallback store directory?")
    total, ids = None, None
    for block in json.loads(listing.read_text()):
        opened = FeatureStore.open(root / block["store"] / "store", trust_task=True)
        _, parts = all_scores(opened, inputs, batch_size=batch_size)
        block_ids, scores = zip(*parts)
        block_ids, scores = np.concatenate(block_ids), np.concatenate(scores, axis=1)
        rate = block["learning_rate"] if block["learning_rate"] is not None else 1.0
        if ids is not None and not np.array_equal(ids, block_ids):
            raise ConfigError(f"{root}: block {block['store']} holds other training examples than the first block")
        ids = block_ids
        total = rate * scores if total is None else total + rate * scores
    if total is None:
        raise ConfigError(f"{root}: checkpoints.json lists no block yet")
    return ids, total


def sequences(dataset: Any) -> list[list[int]]:
    """Token ids of every training example, in dataset order: its ``input_ids`` (without padding where an
    ``attention_mask`` marks it)."""
    rows = [dataset[i] for i in range(len(dataset))]
    out = []
    for position, row in enumerate(rows):
        if "input_ids" not in row:
            raise ConfigError(f"GradindexCallback: training example {position} has no 'input_ids' "
                              f"(columns: {sorted(row)}); tokenize the dataset first")
        ids = [int(v) for v in _as_list(row["input_ids"])]
        mask = row.get("attention_mask")
        if mask is not None:
            ids = [v for v, keep in zip(ids, _as_list(mask)) if keep]
        out.append(ids)
    return out


def _save_quietly(model: Any, directory: Path) -> None:
    """``save_pretrained`` without transformers' progress bar (one per event would clutter the training log)."""
    hf_logging = transformers.utils.logging
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def _as_list(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _write_atomically(path: Path, text: str) -> None:
    tmp = temporary_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)
