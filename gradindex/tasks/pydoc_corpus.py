"""Real English that ships with Python: the language reference's topics (``pydoc_data.topics``).

In: :class:`PydocCorpusConfig`. Out: :class:`PydocCorpus` — training sequences of
``length`` token ids, held-out query spans (prompt + completion ids), the topic of
each, and the :class:`VocabTokenizer`.

* Text: the 79 (Python 3.11; the count and text follow the interpreter's version) help
  topics of ``pydoc_data.topics.topics`` — the language reference's prose, grammar and
  examples — taken in sorted topic order, lower-cased, without the lines that only draw
  (heading underlines, table borders: :data:`RULE_LINE`), which would otherwise become
  chunks of 32 identical symbols.
* Tokens (:data:`TOKEN_PATTERN`): runs of letters, runs of digits, and every other
  non-space character alone. Deterministic; no training, no download.
* Chunks: each topic's token stream is cut into consecutive chunks of ``length``
  tokens (the rest dropped), at most ``max_chunks_per_topic`` of them (the first ones)
  so that the few long topics do not swamp the short ones. Chunk ``i`` of a topic is
  **held out** when ``i % holdout_every == holdout_offset``; the others are the
  training sequences.
* Vocabulary: the tokens seen at least ``min_count`` times in the training chunks
  (most frequent first, ties by text), after ``<pad>``, ``<bos>`` and ``<unk>``; any other
  token is ``<unk>``.
* Queries: a held-out chunk's first ``prompt_length`` tokens are the prompt and the rest
  the completion; the measurement is the completion's log-probability.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from gradindex.config import require_positive
from gradindex.errors import ConfigError

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
SPECIALS = (PAD, BOS, UNK)
TOKEN_PATTERN = re.compile(r"<unk>|[a-z]+|[0-9]+|[^\sa-z0-9]")
RULE_LINE = re.compile(r"^\s*[-=+*|~^]{3,}[-=+*|~^\s]*$", re.MULTILINE)


def pydoc_topics() -> dict[str, str]:
    """``{topic: text}`` of the interpreter's bundled language reference topics."""
    from pydoc_data.topics import topics

    return dict(topics)


def split_tokens(text: str) -> list[str]:
    """Lower-cased tokens of ``text`` (:data:`TOKEN_PATTERN`)."""
    return TOKEN_PATTERN.findall(text.lower())


def prose(text: str) -> str:
    """``text`` without its drawing-only lines (:data:`RULE_LINE`: underlines, table borders)."""
    return RULE_LINE.sub("", text)


class VocabTokenizer:
    """Regex tokenizer over a fixed vocabulary; tokens outside it become ``<unk>``."""

    def __init__(self, vocabulary: Sequence[str]):
        self.vocabulary = tuple(vocabulary)
        if self.vocabulary[: len(SPECIALS)] != SPECIALS:
            raise ConfigError(f"vocabulary must start with {SPECIALS}")
        self.ids = {token: i for i, token in enumerate(self.vocabulary)}
        self.pad_id, self.bos_id, self.unk_id = (self.ids[s] for s in SPECIALS)

    def __len__(self) -> int:
        return len(self.vocabulary)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VocabTokenizer) and other.vocabulary == self.vocabulary

    def __hash__(self) -> int:
        return hash(self.vocabulary)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(token, self.unk_id) for token in split_tokens(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocabulary[int(i)] for i in ids)


@dataclass(frozen=True)
class PydocCorpusConfig:
    length: int = 32
    max_chunks_per_topic: int = 48
    holdout_every: int = 8
    holdout_offset: int = 4
    min_count: int = 8
    prompt_length: int = 16

    def __post_init__(self) -> None:
        for name in ("length", "max_chunks_per_topic", "holdout_every", "min_count", "prompt_length"):
            require_positive(getattr(self, name), f"pydoc corpus {name}")
        if not 0 <= self.holdout_offset < self.holdout_every:
            raise ConfigError(f"pydoc corpus holdout_offset: expected 0..{self.holdout_every - 1}, "
                              f"got {self.holdout_offset}")
        if self.prompt_length >= self.length:
            raise ConfigError(f"pydoc corpus prompt_length: expected fewer than length ({self.length}) tokens, "
                              f"got {self.prompt_length}")


@dataclass(frozen=True)
class PydocCorpus:
    """Training sequences and held-out query spans as token ids, with their topics (see the module docstring)."""

    config: PydocCorpusConfig
    topic_names: tuple[str, ...]  # sorted; topic ids index it
    tokenizer: VocabTokenizer
    sequences: tuple[tuple[int, ...], ...]  # [N] x length
    sequence_topics: tuple[int, ...]  # [N]
    queries: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # [Q] (prompt ids, completion ids)
    query_topics: tuple[int, ...]  # [Q]

    def unknown_rate(self) -> float:
        """Fraction of training tokens that are ``<unk>``."""
        tokens = [t for s in self.sequences for t in s]
        return sum(t == self.tokenizer.unk_id for t in tokens) / max(1, len(tokens))


def build_corpus(config: PydocCorpusConfig = PydocCorpusConfig(), topics: dict[str, str] | None = None) -> PydocCorpus:
    """Chunk, hold out and tokenize the topics (default: :func:`pydoc_topics`); deterministic."""
    topics = pydoc_topics() if topics is None else topics
    names = tuple(sorted(topics))
    train_chunks: list[tuple[int, list[str]]] = []
    held_chunks: list[tuple[int, list[str]]] = []
    for topic, name in enumerate(names):
        tokens = split_tokens(prose(topics[name]))
        count = min(config.max_chunks_per_topic, len(tokens) // config.length)
        for i in range(count):
            chunk = tokens[i * config.length : (i + 1) * config.length]
            held = i % config.holdout_every == config.holdout_offset
            (held_chunks if held else train_chunks).append((topic, chunk))
    if not train_chunks or not held_chunks:
        raise ConfigError(f"pydoc corpus: {len(train_chunks)} training and {len(held_chunks)} held-out chunks; "
                          "use a shorter length or a smaller holdout_every")
    counts = Counter(token for _, chunk in train_chunks for token in chunk)
    kept = sorted((t for t, c in counts.items() if c >= config.min_count and t not in SPECIALS),
                  key=lambda t: (-counts[t], t))
    tokenizer = VocabTokenizer((*SPECIALS, *kept))

    def ids(tokens: list[str]) -> tuple[int, ...]:
        return tuple(tokenizer.ids.get(t, tokenizer.unk_id) for t in tokens)

    cut = config.prompt_length
    return PydocCorpus(
        config=config,
        topic_names=names,
        tokenizer=tokenizer,
        sequences=tuple(ids(chunk) for _, chunk in train_chunks),
        sequence_topics=tuple(topic for topic, _ in train_chunks),
        queries=tuple((ids(chunk[:cut]), ids(chunk[cut:])) for _, chunk in held_chunks),
        query_topics=tuple(topic for topic, _ in held_chunks),
    )
