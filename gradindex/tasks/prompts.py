"""Prompts of the ``diffusion-text`` task: factor values → word sequences → token ids.

In: a :class:`~gradindex.tasks.concepts.ConceptConfig`. Out: a :class:`Prompter` that renders
``labels [n, 3]`` (subject, style, background value indices; ``-1`` = unspecified) in one of
:data:`TEMPLATES` as words, and as token ids ``[n, max_len]`` (``BOS`` first, ``PAD`` after).

* Every value is written with its own words (:data:`VALUE_WORDS`, else its name): a style is
  two words, colour then pattern ("yellow striped"), so a concept can span several tokens.
* An unspecified factor is written with its **neutral word** (:data:`NEUTRAL_WORDS`), in the
  same slot of the same template: ``m_c`` compares a prompt with the one whose concept-``c``
  words are neutral, and training drops a factor the same way (classifier-free dropout per
  factor).
* The **empty prompt** (``BOS`` alone) is the unconditional input classifier-free guidance needs.
* Templates differ in word order ("a yellow striped circle on grass", "grass background ,
  circle , yellow striped"), so a concept's words sit at different positions.

The vocabulary is every word of the templates, values and neutral words, sorted, after
``PAD = 0`` and ``BOS = 1``: the same config always gives the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np

from gradindex.errors import ConfigError
from gradindex.tasks.concepts import FACTORS, ConceptConfig

PAD, BOS = 0, 1
SPECIAL = ("<pad>", "<bos>")
TEMPLATES = (
    "a {style} {subject} on {background}",
    "{background} background , {subject} , {style}",
    "{subject} painted {style} in front of {background}",
    "{style} {subject} over a {background} scene",
    "picture of {background} with a {style} {subject}",
)
#: words of a value where they are not its name (the default config's styles: colour, pattern)
VALUE_WORDS = {
    "style": {"solid": "red solid", "stripes": "yellow striped", "checker": "pink checkered",
              "dots": "white dotted", "gradient": "orange gradient"},
}
NEUTRAL_WORDS = {"subject": "shape", "style": "colored", "background": "somewhere"}


class Prompter:
    """Renders factor labels as prompts in words and token ids (see the module docstring)."""

    def __init__(self, config: ConceptConfig):
        self.config = config
        self.words = {factor: [VALUE_WORDS.get(factor, {}).get(name, name).split()
                               for name in config.values(factor)] for factor in FACTORS}
        vocabulary = {word for template in TEMPLATES for word in template.split() if not word.startswith("{")}
        vocabulary |= {word for factor in FACTORS for value in self.words[factor] for word in value}
        vocabulary |= set(NEUTRAL_WORDS.values())
        clash = vocabulary & set(SPECIAL)
        if clash:
            raise ConfigError(f"prompt words must not be special tokens, got {sorted(clash)}")
        for factor, other in combinations(FACTORS, 2):
            shared = {w for v in self.words[factor] for w in v} & {w for v in self.words[other] for w in v}
            if shared:
                raise ConfigError(f"prompt words {sorted(shared)} name values of both {factor} and {other}")
        self.vocabulary = (*SPECIAL, *sorted(vocabulary))
        self.ids = {word: i for i, word in enumerate(self.vocabulary)}
        longest = {factor: max(len(v) for v in self.words[factor]) for factor in FACTORS}
        self.max_len = 1 + max(sum(longest[w[1:-1]] if w.startswith("{") else 1 for w in t.split())
                               for t in TEMPLATES)

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def text(self, labels: Sequence[int], template: int) -> str:
        """The prompt of one ``(subject, style, background)`` label triple (``-1`` = neutral word)."""
        if not 0 <= int(template) < len(TEMPLATES):
            raise ConfigError(f"prompt template: expected 0..{len(TEMPLATES) - 1}, got {template}")
        slots = {}
        for factor, value in zip(FACTORS, labels):
            value = int(value)
            if value == -1:
                slots[factor] = NEUTRAL_WORDS[factor]
            elif 0 <= value < len(self.words[factor]):
                slots[factor] = " ".join(self.words[factor][value])
            else:
                raise ConfigError(f"prompt {factor}: value index {value} outside -1..{len(self.words[factor]) - 1}")
        return TEMPLATES[int(template)].format(**slots)

    def encode(self, labels: np.ndarray, templates: np.ndarray) -> np.ndarray:
        """Token ids ``[n, max_len]`` (int64) of ``labels [n, 3]`` in ``templates [n]``."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1, 3)
        templates = np.asarray(templates, dtype=np.int64).reshape(-1)
        out = np.full((len(labels), self.max_len), PAD, dtype=np.int64)
        out[:, 0] = BOS
        for i, (row, template) in enumerate(zip(labels, templates)):
            words = self.text(row, template).split()
            out[i, 1 : 1 + len(words)] = [self.ids[w] for w in words]
        return out

    def variants(self, labels: np.ndarray, templates: np.ndarray) -> np.ndarray:
        """``[n, 4, max_len]``: the full prompt, then the prompt with subject, style, background neutral."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1, 3)
        out = [self.encode(labels, templates)]
        for column in range(3):
            neutral = labels.copy()
            neutral[:, column] = -1
            out.append(self.encode(neutral, templates))
        return np.stack(out, axis=1)

    def dropout_table(self, labels: np.ndarray, templates: np.ndarray) -> np.ndarray:
        """``[n, 9, max_len]``: entry ``m < 8`` has factor ``j`` neutral where bit ``j`` of ``m`` is set;
        entry 8 is the empty prompt. Training picks one per step (classifier-free dropout)."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1, 3)
        table = []
        for mask in range(8):
            dropped = labels.copy()
            for column in range(3):
                if mask >> column & 1:
                    dropped[:, column] = -1
            table.append(self.encode(dropped, templates))
        table.append(self.empty(len(labels)))
        return np.stack(table, axis=1)

    def concept_ids(self, factor: str) -> np.ndarray:
        """Token ids of every word that writes a value of ``factor``, and of its neutral word (sorted)."""
        words = {w for value in self.words[factor] for w in value} | {NEUTRAL_WORDS[factor]}
        return np.array(sorted(self.ids[w] for w in words), dtype=np.int64)

    def empty(self, n: int) -> np.ndarray:
        """``[n, max_len]`` empty prompts (``BOS`` alone)."""
        out = np.full((n, self.max_len), PAD, dtype=np.int64)
        out[:, 0] = BOS
        return out
