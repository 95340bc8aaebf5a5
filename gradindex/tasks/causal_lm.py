"""What every causal-LM task shares: token batches, the training loss, completion log-probs, query files.

Items are dicts ``{"input_ids": Long[L], "targets": Bool[L]}``; ``targets[t]``
marks token ``t`` as scored (predicted from the positions before it, so
``targets[0]`` is always false). Batches pad on the right to the longest item:
``input_ids [B, T]``, ``targets [B, T]``, ``attention_mask [B, T]``.

* Training loss (per example): the token-mean next-token cross-entropy over the
  sequence's targets (every token after the first).
* Measurement (per query): ``log p(scored tokens | the tokens before them)``, the
  sum of their log-probabilities, so *higher = the model produces it more*.
  Sequence level: the scored tokens are the whole completion; token level: a
  chosen span of it.

Query files are JSONL, one object per line::

    {"prompt": "mira lives in", "completion": "dovra ."}                  sequence level
    {"prompt": "mira lives in", "completion": "dovra .", "span": "dovra"}  token level
    {"prompt": "...", "completion": "...", "span": [0, 1]}                 span as completion token positions
    {"prompt_ids": [5, 9], "completion_ids": [17, 3]}                      token ids (no tokenizer needed)

Prompt and completion are tokenized separately and concatenated (after the
task's beginning-of-sequence tokens), so the completion's tokens never depend on
the prompt. A text span is its first occurrence in the completion and must fall
on token boundaries. Optional keys ``id`` and ``meta`` are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradindex.errors import ArtifactNotFoundError, ConfigError
from gradindex.task import Task

QUERY_KEYS = {"prompt", "completion", "span", "prompt_ids", "completion_ids", "id", "meta"}


def sequence_item(ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """A training item: every token after the first is scored."""
    input_ids = torch.as_tensor(list(ids), dtype=torch.long)
    targets = torch.ones(len(input_ids), dtype=torch.bool)
    targets[0] = False
    return {"input_ids": input_ids, "targets": targets}


def completion_item(prompt_ids: Sequence[int], completion_ids: Sequence[int],
                    span: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """A query item: the completion's tokens (or ``completion[span[0]:span[1]]``) are scored."""
    input_ids = torch.as_tensor([*prompt_ids, *completion_ids], dtype=torch.long)
    targets = torch.zeros(len(input_ids), dtype=torch.bool)
    start, stop = span if span is not None else (0, len(completion_ids))
    targets[len(prompt_ids) + start : len(prompt_ids) + stop] = True
    return {"input_ids": input_ids, "targets": targets}


def pad_batch(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad items into ``{input_ids, targets, attention_mask}``, each ``[B, T]``."""
    length = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    targets = torch.zeros((len(items), length), dtype=torch.bool)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        size = len(item["input_ids"])
        input_ids[row, :size] = item["input_ids"]
        targets[row, :size] = item["targets"]
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "targets": targets, "attention_mask": attention_mask}


def token_log_probs(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(x_t | x_<t) [B, T-1], scored mask [B, T-1])`` from ``logits [B, T, V]``."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    next_ids = batch["input_ids"][:, 1:]
    picked = log_probs.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
    return picked, batch["targets"][:, 1:].to(picked.dtype)


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactNotFoundError(f"no query inputs file at {path}")
    records = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark is not JSON
            except UnicodeDecodeError as err:
                raise ConfigError(f"{path}:{number}: not UTF-8 text (byte {err.object[err.start]:#04x}); "
                                  "JSONL query files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as err:
                raise ConfigError(f"{path}:{number}: not valid JSON ({type(err).__name__}: "
                                  f"{' '.join(str(err).split())[:200]})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append((number, record))
    if not records:
        raise ConfigError(f"{path}: no queries (expected JSONL lines like {{\"prompt\": ..., \"completion\": ...}})")
    return records


class CausalLMTask(Task):
    """Base of causal-LM tasks. Subclasses set ``pad_id``, ``bos_ids``, ``max_length`` and
    implement :meth:`logits` (and :meth:`encode` / :meth:`decode` when they have a tokenizer)."""

    pad_id: int = 0
    bos_ids: tuple[int, ...] = ()
    max_length: int = 1024
    vocab_size: int | None = None  # token ids must be below it (None: unchecked)

    # -- subclass hooks ----------------------------------------------------------------------
    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits ``[B, T, V]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement logits(model, batch)")

    def encode(self, text: str) -> list[int]:
        raise ConfigError(f"{type(self).__name__} has no tokenizer; give queries as prompt_ids/completion_ids")

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    # -- losses --------------------------------------------------------------------------------
    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return pad_batch(items, self.pad_id)

    def compute_train_loss(self, batch: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
        picked, mask = token_log_probs(self.logits(model, batch), batch)
        return -(picked * mask).sum(1) / mask.sum(1).clamp_min(1)

    def compute_sampled_loss(self, batch: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
        """The training loss with every scored next token drawn from the model's own distribution."""
        from gradindex.tasks.classification import sampled_cross_entropy

        losses = sampled_cross_entropy(self.logits(model, batch)[:, :-1])
        mask = batch["targets"][:, 1:].to(losses.dtype)
        return (losses * mask).sum(1) / mask.sum(1).clamp_min(1)

    def compute_measurement(self, batch: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
        picked, mask = token_log_probs(self.logits(model, batch), batch)
        return (picked * mask).sum(1)

    # -- queries ---------------------------------------------------------------------------------
    def load_queries(self, path: str | Path) -> list[dict[str, torch.Tensor]]:
        return [self.query_item(record, f"{path}:{number}") for number, record in read_jsonl(path)]

    def queries_from_json(self, inputs: Any) -> list[dict[str, torch.Tensor]]:
        """A list of query records, the lines of a query JSONL file."""
        if not isinstance(inputs, list) or not inputs:
            raise ConfigError("inputs: expected a non-empty list of query records like "
                              "{\"prompt\": ..., \"completion\": ...}")
        items = []
        for number, record in enumerate(inputs):
            if not isinstance(record, dict):
                raise ConfigError(f"inputs[{number}]: expected a JSON object, got {type(record).__name__}")
            items.append(self.query_item(record, f"inputs[{number}]"))
        return items

    def query_item(self, record: dict[str, Any], where: str = "query") -> dict[str, torch.Tensor]:
        """Turn one query record (see the module docstring) into an item; ``where`` prefixes errors."""
        unknown = set(record) - QUERY_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; expected {sorted(QUERY_KEYS)}")
        try:
            if "prompt_ids" in record or "completion_ids" in record:
                prompt = [*self.bos_ids, *_token_ids(record, "prompt_ids", self.vocab_size)]
                completion = _token_ids(record, "completion_ids", self.vocab_size)
                span = _span_positions(record.get("span"), len(completion))
            else:
                for key in ("prompt", "completion"):
                    if not isinstance(record.get(key), str):
                        raise ConfigError(f"needs a string {key!r} (or prompt_ids/completion_ids)")
                prompt = [*self.bos_ids, *self.encode(record["prompt"])]
                completion = self.encode(record["completion"])
                span = record.get("span")
                span = (self._text_span(record["completion"], completion, span) if isinstance(span, str)
                        else _span_positions(span, len(completion)))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        if not prompt:
            raise ConfigError(f"{where}: the prompt is empty and the task adds no beginning-of-sequence token, "
                              "so the first completion token has nothing to be predicted from")
        if not completion:
            raise ConfigError(f"{where}: the completion is empty")
        if len(prompt) + len(completion) > self.max_length:
            raise ConfigError(f"{where}: {len(prompt) + len(completion)} tokens, the model takes at most "
                              f"{self.max_length}")
        return completion_item(prompt, completion, span)

    def _text_span(self, completion: str, ids: list[int], span: str) -> tuple[int, int]:
        at = completion.find(span) if span else -1
        if at < 0:
            raise ConfigError(f"span {span!r} does not occur in the completion {completion!r}")
        bounds = []
        for end in (at, at + len(span)):
            prefix = self.encode(completion[:end])
            if ids[: len(prefix)] != prefix:
                raise ConfigError(f"span {span!r} does not fall on token boundaries of the completion; "
                                  "give it as [start, stop] completion token positions")
            bounds.append(len(prefix))
        if bounds[0] == bounds[1]:
            raise ConfigError(f"span {span!r} covers no token")
        return bounds[0], bounds[1]

    # -- display --------------------------------------------------------------------------------
    def tokens(self, item: dict[str, torch.Tensor]) -> list[str]:
        """Each input token decoded alone: the positions of ``input_ids [L]``."""
        return [self.decode([token]) for token in item["input_ids"].tolist()]

    def describe(self, item: dict[str, torch.Tensor]) -> str:
        """The item's text with the scored tokens of a query in brackets."""
        ids = item["input_ids"].tolist()
        skip = len(self.bos_ids) if ids[: len(self.bos_ids)] == list(self.bos_ids) else 0
        scored = [t for t, flag in enumerate(item["targets"].tolist()) if flag]
        if not scored or scored == list(range(1, len(ids))):  # a training sequence: everything is scored
            return self.decode(ids[skip:])
        start, stop = scored[0], scored[-1] + 1
        parts = [self.decode(ids[skip:start]), "[" + self.decode(ids[start:stop]) + "]", self.decode(ids[stop:])]
        return " ".join(part for part in parts if part)


def _token_ids(record: dict[str, Any], key: str, vocab_size: int | None = None) -> list[int]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise ConfigError(f"{key!r} must be a list of non-negative token ids")
    if vocab_size is not None and any(v >= vocab_size for v in value):
        raise ConfigError(f"{key!r}: token id {max(value)} is outside the model's vocabulary (ids 0..{vocab_size - 1})")
    return value


def _span_positions(span: Any, length: int) -> tuple[int, int] | None:
    if span is None:
        return None
    integers = isinstance(span, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
    if not integers or len(span) != 2:
        raise ConfigError(f"span must be a substring of the completion or [start, stop] token positions, got {span!r}")
    start, stop = span
    if not 0 <= start < stop <= length:
        raise ConfigError(f"span {span} is outside the completion's {length} tokens "
                          f"(need 0 <= start < stop <= {length})")
    return start, stop
