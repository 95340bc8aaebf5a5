"""The built-in ``lm-deep`` task: the pydoc corpus, tokenizer, held-out topic spans, 6-layer anatomy,
seeded training, per-example gradients against brute force, query files, featurization."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lm_reference import assert_projector_matches_brute_force
from lm_reference import single_thread  # noqa: F401  (autouse: the module runs on one thread)

from gradindex.config import FeaturizeConfig, ProjectionConfig, ProjectionKind
from gradindex.errors import ConfigError
from gradindex.features.run import featurize
from gradindex.features.groups import parameter_groups
from gradindex.task import load_task, make_batch
from gradindex.tasks.lm import TinyTransformer
from gradindex.tasks.pydoc_corpus import (
    SPECIALS,
    PydocCorpusConfig,
    VocabTokenizer,
    build_corpus,
    pydoc_topics,
    split_tokens,
)

TINY = {"width": 16, "layers": 2, "heads": 2, "epochs": 4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny lm-deep model (width 16, 2 layers) trained briefly on the first 192 sequences."""
    task = load_task("lm-deep", TINY)
    checkpoint = task.train(tmp_path_factory.mktemp("lm-deep") / "model.pt", indices=range(192))
    return task, task.load_model(checkpoint), checkpoint


# -- corpus ------------------------------------------------------------------------------------------------------
def test_tokens_are_lowercase_words_numbers_and_single_symbols():
    assert split_tokens('The "assert" statement: x += 42!') == ["the", '"', "assert", '"', "statement", ":", "x",
                                                                 "+", "=", "42", "!"]
    tokenizer = VocabTokenizer((*SPECIALS, "the", "x"))
    assert tokenizer.encode("The y x") == [3, tokenizer.unk_id, 4]
    assert tokenizer.decode(tokenizer.encode("the <unk> x")) == "the <unk> x"
    with pytest.raises(ConfigError, match="start with"):
        VocabTokenizer(("the", *SPECIALS))


def test_corpus_of_given_topics_holds_out_every_kth_chunk():
    topics = {"b": " ".join(f"w{i % 3}" for i in range(40)), "a": "one two " * 20, "c": "too short"}
    config = PydocCorpusConfig(length=4, max_chunks_per_topic=6, holdout_every=3, holdout_offset=1, min_count=2,
                               prompt_length=2)
    corpus = build_corpus(config, topics)
    assert corpus.topic_names == ("a", "b", "c")
    # a: 10 chunks, capped at 6, chunks 1 and 4 held out; b: the same; c: no whole chunk
    assert corpus.sequence_topics == (0, 0, 0, 0, 1, 1, 1, 1) and corpus.query_topics == (0, 0, 1, 1)
    assert corpus.tokenizer.decode(corpus.sequences[0]) == "one two one two"
    prompt, completion = corpus.queries[0]
    assert len(prompt) == 2 and len(completion) == 2
    # counts in the training chunks: one, two, w 8 each; 1: 4; 0, 2: 2 each — by count, then text
    assert corpus.tokenizer.vocabulary[3:] == ("one", "two", "w", "1", "0", "2")
    assert "short" not in corpus.tokenizer.ids  # only training chunks count
    assert build_corpus(config, topics) == corpus  # deterministic
    frequent = build_corpus(PydocCorpusConfig(**{**config.__dict__, "min_count": 5}), topics)
    assert frequent.tokenizer.vocabulary == (*SPECIALS, "one", "two", "w")
    assert frequent.unknown_rate() == 0.25  # the 8 digits of the 32 training tokens
    with pytest.raises(ConfigError, match="held-out"):
        build_corpus(PydocCorpusConfig(length=4, holdout_every=2, holdout_offset=1, prompt_length=2), {"a": "x y"})


@pytest.mark.parametrize("change, message", [({"length": 0}, "length"), ({"holdout_offset": 8}, "holdout_offset"),
                                             ({"prompt_length": 32}, "prompt_length")])
def test_bad_corpus_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        PydocCorpusConfig(**change)


def test_default_corpus_is_real_english_with_held_out_spans():
    task = load_task("lm-deep")
    corpus = task.corpus
    assert len(pydoc_topics()) >= 70
    assert 1000 <= len(corpus.sequences) <= 3000 and len(corpus.queries) >= 150
    assert all(len(s) == 32 for s in corpus.sequences)
    assert 500 <= len(task.tokenizer) <= 2000 and corpus.unknown_rate() < 0.08
    for word in ("the", "statement", "function", "return"):
        assert word in task.tokenizer.ids
    train = {tuple(s) for s in corpus.sequences}
    assert not any(tuple(p + c) in train for p, c in corpus.queries)  # held-out chunks are not trained on
    assert len(set(corpus.query_topics)) >= 40  # the queries span most topics


# -- model and training -------------------------------------------------------------------------------------------
def test_default_model_has_six_layers_and_52_groups():
    task = load_task("lm-deep")
    model = TinyTransformer(task.model_config)
    names = [g.name for g in parameter_groups(model)]
    assert len(model.blocks) == 6 and len(names) == 52
    assert names[:2] == ["tok_emb", "pos_emb"] and names[-2:] == ["ln_f", "head"]
    assert "blocks.5.mlp.down" in names and task.max_length == 33


def test_training_is_seeded_uses_the_subset_and_learns(tiny, tmp_path):
    task, model, _ = tiny
    again = task.load_model(task.train(tmp_path / "again.pt", indices=range(192)))
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    other = task.load_model(task.train(tmp_path / "other.pt", indices=range(192, 384)))
    assert not torch.equal(other.head.weight, model.head.weight)
    torch.manual_seed(0)
    untrained = TinyTransformer(task.model_config).eval()
    batch = make_batch(task, task.train_dataset(), range(64))
    with torch.no_grad():
        assert task.compute_train_loss(batch, model).mean() < task.compute_train_loss(batch, untrained).mean() - 0.4


@pytest.mark.parametrize("kind", [ProjectionKind.IDENTITY, ProjectionKind.GAUSSIAN])
def test_per_example_gradients_match_brute_force(tiny, kind):
    """Training loss and completion log-prob: batched hooks == one backward per example."""
    task, model, _ = tiny
    groups = parameter_groups(model)
    config = ProjectionConfig(kind=kind, proj_dim=64, seed=5)
    cases = [(task.train_dataset()[:4], task.compute_train_loss), (task.query_dataset()[:4], task.compute_measurement)]
    assert_projector_matches_brute_force(task, model, groups, config, cases)


# -- queries ------------------------------------------------------------------------------------------------------
def test_default_queries_round_trip_through_a_query_file(tiny, tmp_path):
    task, _, _ = tiny
    path = tmp_path / "queries.jsonl"
    records = task.query_records()
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = task.load_queries(path)
    defaults = task.query_dataset()
    assert len(loaded) == len(defaults) == len(records)
    for a, b in zip(loaded, defaults):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"])
    first = defaults[0]
    assert int(first["targets"].sum()) == 16 and len(first["input_ids"]) == 33  # <bos> + 16 prompt + 16 scored
    assert task.describe(first).count("[") == 1


def test_topics_are_metadata_of_sequences_and_queries():
    task = load_task("lm-deep")
    train_meta = task.metadata(task.train_dataset())
    query_meta = task.metadata(task.query_dataset())
    assert sorted(train_meta) == ["text", "topic"] and list(query_meta) == ["topic"]
    assert len(train_meta["topic"]) == len(task.train_dataset())
    assert set(query_meta["topic"]) <= set(train_meta["topic"])
    assert train_meta["text"][0] == task.decode(task.corpus.sequences[0])
    assert task.metadata(task.query_dataset()[:3]) == {}


def test_featurize_stores_topics(tiny, tmp_path):
    task, _, checkpoint = tiny
    config = FeaturizeConfig(projection=ProjectionConfig(proj_dim=16), batch_size=32)
    store = featurize(task, tmp_path / "store", config, checkpoint=checkpoint, limit=48, show_progress=False)
    assert store.num_samples == 48 and len(store.groups) == 20
    _, meta = store.read_metadata()
    assert np.array_equal(meta["topic"], task.metadata(task.train_dataset())["topic"][:48])
