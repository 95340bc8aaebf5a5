"""A seeded synthetic language for the built-in ``lm`` task: entities, relations, facts.

In: a :class:`CorpusConfig` (``data/lm_corpus.json``). Out: a :class:`Corpus` —
training sequences (space-separated words), the facts they state and which
sequences state each fact, a word vocabulary, and fact queries
``{prompt, completion, span}``.

Generation (all from ``seed``): names of people and cities are drawn from
syllables without repetition; every subject gets one object per relation, drawn
uniformly; each fact is stated ``m`` times (``m`` drawn from ``mentions``, at
most one sentence per template of its relation); the sentences are shuffled and
packed into sequences of ``sentences_per_sequence`` sentences. Objects are
independent of subjects, so the completion of the query ``"mira lives in"`` is
determined only by the training sequences that state that fact; a fact with
``m = 1`` is stated in exactly one training sequence (the fact-retrieval check).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import ArtifactNotFoundError, ConfigError

PAD = "<pad>"
BOS = "<bos>"
SPECIAL_TOKENS = (PAD, BOS)


@dataclass(frozen=True)
class Relation:
    """A relation ``subject -> object``: training sentence templates and the query prompt.

    Templates hold ``{s}`` and ``{o}``; ``query`` holds ``{s}`` and is completed by ``"{o} ."``.
    """

    name: str
    object: str
    templates: tuple[str, ...]
    query: str


@dataclass(frozen=True)
class CorpusConfig:
    """What :func:`generate_corpus` draws from; read from JSON with :meth:`load`."""

    seed: int
    syllables: tuple[str, ...]
    names: tuple[tuple[str, int, int], ...]  # (kind, count, syllables per name)
    subject: str
    objects: tuple[tuple[str, tuple[str, ...]], ...]  # (kind, words)
    relations: tuple[Relation, ...]
    mentions: tuple[tuple[int, float], ...]  # (times a fact is stated, probability)
    sentences_per_sequence: tuple[int, int]  # inclusive range
    num_queries: int

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"corpus seed: expected a non-negative integer, got {self.seed!r}")
        if len(self.syllables) < 2 or len(set(self.syllables)) != len(self.syllables):
            raise ConfigError("corpus syllables: expected at least two distinct syllables")
        kinds = {kind for kind, _, _ in self.names} | {kind for kind, _ in self.objects}
        for kind, count, length in self.names:
            if count < 1 or length < 1 or count > len(self.syllables) ** length:
                raise ConfigError(
                    f"corpus names[{kind!r}]: {count} names of {length} syllables cannot be drawn from "
                    f"{len(self.syllables)} syllables"
                )
        if self.subject not in dict((k, c) for k, c, _ in self.names):
            raise ConfigError(f"corpus subject: {self.subject!r} is not one of the generated name kinds")
        if not self.relations:
            raise ConfigError("corpus relations: expected at least one relation")
        for relation in self.relations:
            if relation.object not in kinds:
                raise ConfigError(f"corpus relation {relation.name!r}: unknown object kind {relation.object!r}")
            if not relation.templates or any("{s}" not in t or "{o}" not in t for t in relation.templates):
                raise ConfigError(f"corpus relation {relation.name!r}: every template needs {{s}} and {{o}}")
            if "{s}" not in relation.query or "{o}" in relation.query:
                raise ConfigError(f"corpus relation {relation.name!r}: the query needs {{s}} and no {{o}}")
        counts = [m for m, _ in self.mentions]
        probs = np.array([p for _, p in self.mentions], dtype=float)
        if not counts or min(counts) < 1 or (probs < 0).any() or not np.isclose(probs.sum(), 1.0):
            raise ConfigError(
                "corpus mentions: expected [count >= 1, probability] pairs with probabilities summing to 1"
            )
        if max(counts) > min(len(r.templates) for r in self.relations):
            raise ConfigError("corpus mentions: a fact is stated at most once per template of its relation")
        low, high = self.sentences_per_sequence
        if not 1 <= low <= high:
            raise ConfigError(f"corpus sentences_per_sequence: expected 1 <= low <= high, got {[low, high]}")
        if self.num_queries < 1:
            raise ConfigError(f"corpus num_queries: expected a positive integer, got {self.num_queries}")

    @classmethod
    def load(cls, path: str | Path) -> "CorpusConfig":
        path = Path(path)
        if not path.is_file():
            raise ArtifactNotFoundError(f"no corpus config at {path}")
        try:
            data = json.loads(path.read_text())
            return cls(
                seed=data["seed"],
                syllables=tuple(data["syllables"]),
                names=tuple((kind, int(v["count"]), int(v["syllables"])) for kind, v in data["names"].items()),
                subject=data["subject"],
                objects=tuple((kind, tuple(words)) for kind, words in data["objects"].items()),
                relations=tuple(
                    Relation(r["name"], r["object"], tuple(r["templates"]), r["query"]) for r in data["relations"]
                ),
                mentions=tuple((int(m), float(p)) for m, p in data["mentions"]),
                sentences_per_sequence=tuple(int(v) for v in data["sentences_per_sequence"]),
                num_queries=int(data["num_queries"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{path}: not a valid corpus config ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class Fact:
    """``subject --relation--> object``, stated by the training sequences at ``sequences``."""

    subject: str
    relation: str
    object: str
    sequences: tuple[int, ...]


@dataclass(frozen=True)
class Corpus:
    config: CorpusConfig
    sequences: tuple[str, ...]
    facts: tuple[Fact, ...]
    vocabulary: tuple[str, ...]  # special tokens first

    def query(self, fact: Fact) -> dict[str, Any]:
        """The query record of a fact: ``{prompt, completion, span}`` (span = the object word)."""
        relation = {r.name: r for r in self.config.relations}[fact.relation]
        return {"prompt": relation.query.format(s=fact.subject), "completion": f"{fact.object} .",
                "span": fact.object}

    def query_facts(self) -> list[int]:
        """Positions in :attr:`facts` of the default queries (a seeded sample of ``num_queries`` facts)."""
        rng = np.random.default_rng([self.config.seed, 1])
        count = min(self.config.num_queries, len(self.facts))
        return sorted(int(i) for i in rng.choice(len(self.facts), size=count, replace=False))


def generate_corpus(config: CorpusConfig) -> Corpus:
    """The corpus of ``config`` (deterministic)."""
    rng = np.random.default_rng(config.seed)
    entities = _draw_names(config, rng)
    entities.update({kind: list(words) for kind, words in config.objects})
    counts = np.array([m for m, _ in config.mentions])
    probs = np.array([p for _, p in config.mentions], dtype=float)
    sentences: list[tuple[int, str]] = []  # (fact index, sentence)
    facts: list[tuple[str, str, str]] = []
    for subject in entities[config.subject]:
        for relation in config.relations:
            obj = entities[relation.object][rng.integers(len(entities[relation.object]))]
            mentions = int(rng.choice(counts, p=probs / probs.sum()))
            for template in rng.choice(len(relation.templates), size=mentions, replace=False):
                sentences.append((len(facts), relation.templates[template].format(s=subject, o=obj)))
            facts.append((subject, relation.name, obj))
    order = rng.permutation(len(sentences))
    low, high = config.sentences_per_sequence
    sequences: list[str] = []
    stated_in: list[list[int]] = [[] for _ in facts]
    start = 0
    while start < len(order):
        size = int(rng.integers(low, high + 1))
        chunk = [sentences[i] for i in order[start : start + size]]
        for fact_index, _ in chunk:
            if len(sequences) not in stated_in[fact_index]:
                stated_in[fact_index].append(len(sequences))
        sequences.append(" ".join(text for _, text in chunk))
        start += size
    words = set(itertools.chain.from_iterable(entities.values()))
    for relation in config.relations:
        for text in (*relation.templates, relation.query):
            words.update(w for w in text.split() if w not in ("{s}", "{o}"))
    clash = words & set(SPECIAL_TOKENS)
    if clash:
        raise ConfigError(f"corpus: the words {sorted(clash)} are reserved special tokens")
    return Corpus(
        config=config,
        sequences=tuple(sequences),
        facts=tuple(Fact(s, r, o, tuple(stated_in[i])) for i, (s, r, o) in enumerate(facts)),
        vocabulary=(*SPECIAL_TOKENS, *sorted(words)),
    )


def _draw_names(config: CorpusConfig, rng: np.random.Generator) -> dict[str, list[str]]:
    """Unique names per kind (no name shared between kinds or with an object word)."""
    taken = {word for _, words in config.objects for word in words}
    names: dict[str, list[str]] = {}
    for kind, count, length in config.names:
        space = len(config.syllables) ** length
        picked: list[str] = []
        for code in rng.permutation(space):
            digits = np.unravel_index(int(code), (len(config.syllables),) * length)
            name = "".join(config.syllables[d] for d in digits)
            if name not in taken:
                taken.add(name)
                picked.append(name)
                if len(picked) == count:
                    break
        if len(picked) < count:
            raise ConfigError(f"corpus names[{kind!r}]: only {len(picked)} unique names, {count} requested")
        names[kind] = picked
    return names


class WordTokenizer:
    """Whitespace tokenizer over a fixed vocabulary; unknown words are an error, not ``<unk>``."""

    def __init__(self, vocabulary: Sequence[str]):
        self.vocabulary = tuple(vocabulary)
        self.ids = {word: i for i, word in enumerate(self.vocabulary)}
        self.pad_id = self.ids[PAD]
        self.bos_id = self.ids[BOS]

    def __len__(self) -> int:
        return len(self.vocabulary)

    def encode(self, text: str) -> list[int]:
        words = text.split()
        unknown = sorted({w for w in words if w not in self.ids})
        if unknown:
            raise ConfigError(f"unknown words {unknown[:10]} (the built-in lm task's vocabulary has {len(self)} words)")
        return [self.ids[w] for w in words]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocabulary[int(i)] for i in ids)
