"""Task adapter for Hugging Face ``transformers`` causal LMs (``pip install 'gradindex[hf]'``).

Spec: ``gradindex.integrations.hf:HFCausalLMTask`` with options

* ``model``: a local directory written by ``save_pretrained`` (read with
  ``AutoModelForCausalLM.from_pretrained(..., local_files_only=True)``; nothing is
  downloaded). ``--checkpoint DIR`` overrides it.
* ``train_file``: JSONL training sequences, ``{"text": ...}`` (needs a tokenizer)
  or ``{"input_ids": [...]}``.
* ``tokenizer``: a local tokenizer directory (default: ``model``, when it holds
  one; without a tokenizer, sequences and queries are token ids).
* ``query_file``: default queries (JSONL, :mod:`gradindex.tasks.causal_lm`).
* ``bos_id``: token id put before every sequence and prompt; default the
  tokenizer's (else the model config's) beginning-of-sequence id, ``-1`` for none.
* ``max_length``: default the model's position limit.

Text is tokenized without special tokens; the beginning-of-sequence token is
added explicitly. Loss and measurements are :mod:`gradindex.tasks.causal_lm`'s.
The model is called with explicit ``position_ids [B, T]`` so that position
embeddings see examples along dimension 0.

Groups: the default (one per module). GPT-2's ``Conv1D`` layers are factorized,
and its ``lm_head`` (tied to ``wte``) joins the ``transformer.wte`` group.
LoRA-only attribution: freeze the base model (peft does) — frozen parameters are
never attributed; a peft adapter directory (``adapter_config.json``, as
``PeftModel.save_pretrained`` writes it) as ``model`` loads its base model (the
adapter config's ``base_model_name_or_path``, a local directory) with the adapter
trainable, so only the adapter is attributed. Selected modules: group rules such as
``--group-rule 'transformer.h.5.*=h5' --group-rule '*=-'``.

:class:`~gradindex.integrations.hf_callback.GradindexCallback` (importable from here)
writes stores of this task during ``transformers.Trainer`` training.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradindex.errors import ArtifactNotFoundError, ConfigError, MissingDependencyError, StoreMismatchError
from gradindex.tasks.causal_lm import CausalLMTask, read_jsonl, sequence_item


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError(
            "the Hugging Face adapter needs transformers: pip install 'gradindex[hf]'"
        ) from None
    return transformers


def _base_dir(directory: Path) -> Path:
    """The directory holding the full model: ``directory`` itself, or a peft adapter's base model."""
    adapter = directory / "adapter_config.json"
    if not adapter.is_file():
        return directory
    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ArtifactNotFoundError(f"hf task: the peft adapter {directory} names base model {base!r}, which is not "
                                    "a local directory (save the base model with save_pretrained and train from it)")
    return Path(base)


def _load_adapter(model: nn.Module, directory: Path) -> nn.Module:
    try:
        import peft
    except ImportError:
        raise MissingDependencyError(f"hf task: {directory} is a peft adapter: pip install peft") from None
    return peft.PeftModel.from_pretrained(model, directory, is_trainable=True)


def __getattr__(name: str) -> Any:
    if name == "GradindexCallback":  # imports transformers: only when asked for
        import_transformers()  # the install hint rather than an ImportError
        from gradindex.integrations.hf_callback import GradindexCallback

        return GradindexCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class HFCausalLMTask(CausalLMTask):
    """Any ``AutoModelForCausalLM`` saved in a local directory; see the module docstring."""

    def __init__(self, model: str | None = None, train_file: str | None = None, tokenizer: str | None = None,
                 query_file: str | None = None, bos_id: int | None = None, max_length: int | None = None):
        if not model:
            raise ConfigError("hf task: option 'model' (a local save_pretrained directory) is required")
        if not train_file:
            raise ConfigError("hf task: option 'train_file' (JSONL of {\"text\"} or {\"input_ids\"}) is required")
        self.model_dir = Path(model)
        if not self.model_dir.is_dir():
            raise ArtifactNotFoundError(f"hf task: no model directory at {self.model_dir}")
        self.options = {"model": str(model), "train_file": str(train_file), "tokenizer": tokenizer,
                        "query_file": query_file, "bos_id": bos_id, "max_length": max_length}
        transformers = import_transformers()
        self.config = transformers.AutoConfig.from_pretrained(_base_dir(self.model_dir), local_files_only=True)
        self.tokenizer = self._load_tokenizer(transformers, tokenizer)
        vocab_size = self.vocab_size = int(self.config.vocab_size)
        self.bos_ids = self._bos_ids(bos_id, vocab_size)
        limit = getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", None)
        self.max_length = int(max_length or limit or 1024)
        self.pad_id = 0
        self.query_file = query_file
        self._texts, self._train_items = self._read_train_file(Path(train_file), vocab_size)
        self._takes_positions: bool | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def _load_tokenizer(self, transformers: Any, path: str | None) -> Any:
        directory = Path(path) if path else _base_dir(self.model_dir)
        has_files = any((directory / name).is_file() for name in
                        ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"))
        if not has_files:
            if path:
                raise ArtifactNotFoundError(f"hf task: no tokenizer files in {directory}")
            return None
        return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)

    def _bos_ids(self, bos_id: int | None, vocab_size: int) -> tuple[int, ...]:
        if bos_id is None:
            bos_id = getattr(self.tokenizer, "bos_token_id", None) if self.tokenizer is not None else None
            if bos_id is None:
                bos_id = getattr(self.config, "bos_token_id", None)
            if bos_id is None or not 0 <= bos_id < vocab_size:
                return ()
            return (int(bos_id),)
        if bos_id == -1:
            return ()
        if not isinstance(bos_id, int) or not 0 <= bos_id < vocab_size:
            raise ConfigError(f"hf task: bos_id must be a token id below {vocab_size} or -1, got {bos_id!r}")
        return (bos_id,)

    def _read_train_file(self, path: Path, vocab_size: int) -> tuple[list[str] | None, list[dict]]:
        texts: list[str] = []
        items = []
        for number, record in read_jsonl(path):
            where = f"{path}:{number}"
            if "input_ids" in record:
                ids = record["input_ids"]
                if not isinstance(ids, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
                    raise ConfigError(f"{where}: 'input_ids' must be a list of token ids")
                texts.append("")
            elif isinstance(record.get("text"), str):
                ids = self.encode(record["text"])
                texts.append(record["text"])
            else:
                raise ConfigError(f"{where}: expected {{\"text\": ...}} or {{\"input_ids\": [...]}}")
            ids = [*self.bos_ids, *ids]
            if len(ids) < 2:
                raise ConfigError(f"{where}: a training sequence needs at least two tokens (with bos)")
            if len(ids) > self.max_length or min(ids) < 0 or max(ids) >= vocab_size:
                raise ConfigError(f"{where}: {len(ids)} tokens with ids in [{min(ids)}, {max(ids)}]; the model takes "
                                  f"at most {self.max_length} tokens with ids below {vocab_size}")
            items.append(sequence_item(ids))
        return (texts if any(texts) else None), items

    # -- tokenizer ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ConfigError(f"hf task: {self.model_dir} has no tokenizer (pass tokenizer=DIR); "
                              "without one give token ids (input_ids, prompt_ids/completion_ids)")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return super().decode(ids)
        return self.tokenizer.decode([int(i) for i in ids])

    # -- model ----------------------------------------------------------------------------------
    def load_model(self, checkpoint: str | Path | None) -> nn.Module:
        transformers = import_transformers()
        directory = Path(checkpoint) if checkpoint is not None else self.model_dir
        if not directory.is_dir():
            raise ArtifactNotFoundError(f"hf task: no model directory at {directory} (a save_pretrained folder)")
        hf_logging = transformers.utils.logging
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # its weight-loading bar would break `query --json` output
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(_base_dir(directory), local_files_only=True)
            if _base_dir(directory) != directory:
                model = _load_adapter(model, directory)
        except (OSError, ValueError) as err:
            raise StoreMismatchError(f"hf task: cannot load a causal LM from {directory}: {err}") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        if int(model.config.vocab_size) != int(self.config.vocab_size):  # a peft model forwards .config
            raise StoreMismatchError(f"hf task: {directory} has vocabulary size {model.config.vocab_size}, "
                                     f"the task's model {self.config.vocab_size}")
        return model.eval()

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._takes_positions is None:
            self._takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        kwargs: dict[str, Any] = {"attention_mask": batch["attention_mask"], "use_cache": False}
        if self._takes_positions:
            batch_size, length = batch["input_ids"].shape
            kwargs["position_ids"] = torch.arange(length, device=batch["input_ids"].device).expand(batch_size, length)
        return model(input_ids=batch["input_ids"], **kwargs).logits

    # -- data -----------------------------------------------------------------------------------
    def train_dataset(self) -> Sequence:
        return self._train_items

    def metadata(self, dataset: Sequence) -> dict[str, np.ndarray]:
        if dataset is not self._train_items or self._texts is None:
            return {}
        return {"text": np.array(self._texts, dtype=object)}

    def query_dataset(self) -> Sequence:
        if not self.query_file:
            raise ConfigError("hf task: no default queries; pass a query file with --inputs FILE.jsonl, or the task "
                              "option query_file=FILE.jsonl")
        return self.load_queries(self.query_file)
