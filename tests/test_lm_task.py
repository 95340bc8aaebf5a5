"""The built-in ``lm`` task: corpus, model anatomy, training, losses, measurements, query files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lm_reference import (
    assert_features_close, assert_projector_matches_brute_force, brute_force_features, tiny_lm, write_tiny_corpus,
)
from lm_reference import single_thread  # noqa: F401  (autouse: the module runs on one thread)

from gradindex.config import GroupRule, ProjectionConfig, ProjectionKind
from gradindex.errors import ArtifactNotFoundError, ConfigError, StoreMismatchError
from gradindex.features.gradients import GradientProjector
from gradindex.features.groups import parameter_groups
from gradindex.task import model_fingerprint
from gradindex.tasks.causal_lm import token_log_probs
from gradindex.tasks.lm import DEFAULT_CORPUS, LMTask
from gradindex.tasks.lm_corpus import CorpusConfig, WordTokenizer, generate_corpus


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny lm task (width 16, 2 layers) and a briefly trained checkpoint."""
    task, checkpoint = tiny_lm(tmp_path_factory.mktemp("lm"), epochs=40)
    return task, task.load_model(checkpoint), checkpoint


# -- corpus -----------------------------------------------------------------------------------------
def test_default_corpus_states_facts_in_known_sequences():
    corpus = generate_corpus(CorpusConfig.load(DEFAULT_CORPUS))
    assert generate_corpus(CorpusConfig.load(DEFAULT_CORPUS)) == corpus  # deterministic
    relations = {r.name: r for r in corpus.config.relations}
    for fact in corpus.facts:
        assert fact.sequences, fact
        for index in fact.sequences:  # each stating sequence holds one of the relation's sentences
            text = f" {corpus.sequences[index]} "
            sentences = [t.format(s=fact.subject, o=fact.object) for t in relations[fact.relation].templates]
            assert any(f" {s} " in text for s in sentences), (fact, text)
    single = [f for f in corpus.facts if len(f.sequences) == 1]
    assert len(single) > 100  # enough for the fact-retrieval check
    # no other sequence states a single-mention fact, in any template
    for fact in single[:50]:
        sentences = [t.format(s=fact.subject, o=fact.object) for t in relations[fact.relation].templates]
        holders = [i for i, text in enumerate(corpus.sequences) if any(f" {s} " in f" {text} " for s in sentences)]
        assert holders == list(fact.sequences)
    assert len(corpus.query_facts()) == corpus.config.num_queries


def test_bundled_example_queries_ask_facts_of_the_default_corpus():
    """data/lm-queries.jsonl (the query example in docs/tasks.md) loads and asks facts the corpus states."""
    task = LMTask()
    path = DEFAULT_CORPUS.parent / "lm-queries.jsonl"
    items = task.load_queries(path)
    facts = {(task.corpus.query(f)["prompt"], f.object): f for f in task.corpus.facts}
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(items) == len(records) == 4
    for record, item in zip(records, items):
        fact = facts[(record["prompt"], record["completion"].split()[0])]
        scored = task.decode(item["input_ids"][item["targets"]].tolist())
        assert scored == (fact.object if "span" in record else record["completion"])
    assert [len(facts[(r["prompt"], r["completion"].split()[0])].sequences) for r in records[:3]] == [1, 1, 1]


def test_corpus_seed_changes_the_corpus(tmp_path):
    a = generate_corpus(CorpusConfig.load(write_tiny_corpus(tmp_path / "a.json")))
    b = generate_corpus(CorpusConfig.load(write_tiny_corpus(tmp_path / "b.json", seed=4)))
    assert a.sequences != b.sequences


@pytest.mark.parametrize("change, message", [
    ({"mentions": [[1, 0.5], [2, 0.4]]}, "probabilities summing to 1"),
    ({"mentions": [[3, 1.0]]}, "at most once per template"),
    ({"subject": "city2"}, "subject"),
    ({"names": {"person": {"count": 500, "syllables": 2}}}, "cannot be drawn"),
    ({"relations": [{"name": "x", "object": "pet", "templates": ["{s} likes ."], "query": "{s} likes"}]},
     "{s} and {o}"),
    ({"syllables": "ab"}, "syllables"),
])
def test_bad_corpus_config_is_one_clear_error(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        CorpusConfig.load(write_tiny_corpus(tmp_path / "c.json", **change))


def test_corpus_config_file_errors(tmp_path):
    with pytest.raises(ArtifactNotFoundError):
        CorpusConfig.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid corpus config"):
        CorpusConfig.load(tmp_path / "broken.json")


def test_word_tokenizer_round_trip_and_unknown_words():
    tokenizer = WordTokenizer(["<pad>", "<bos>", "a", "b"])
    assert tokenizer.decode(tokenizer.encode("a b a")) == "a b a"
    with pytest.raises(ConfigError, match="unknown words"):
        tokenizer.encode("a zz")


# -- model and training ---------------------------------------------------------------------------------
def test_builtin_registration_and_anatomy_groups(tiny):
    task, model, _ = tiny
    assert isinstance(task, LMTask) and task.spec() == {"task": "lm", "options": task.options}
    names = [g.name for g in parameter_groups(model)]
    per_layer = ["ln1", "attn.q", "attn.k", "attn.v", "attn.out", "ln2", "mlp.up", "mlp.down"]
    assert names == ["tok_emb", "pos_emb", *(f"blocks.{i}.{n}" for i in range(2) for n in per_layer), "ln_f", "head"]
    kinds = {g.name: g.blocks[0].kind for g in parameter_groups(model)}
    assert kinds["tok_emb"] == kinds["pos_emb"] == "embedding"
    assert kinds["blocks.0.attn.q"] == kinds["head"] == "linear" and kinds["ln_f"] == "generic"


def test_training_is_deterministic_and_uses_the_subset(tiny, tmp_path):
    task, model, _ = tiny
    again = task.load_model(task.train(tmp_path / "again.pt"))
    assert model_fingerprint(again) == model_fingerprint(model)
    half = task.load_model(task.train(tmp_path / "half.pt", indices=range(0, len(task.train_dataset()), 2)))
    assert model_fingerprint(half) != model_fingerprint(model)
    with pytest.raises(ConfigError, match="no training examples"):
        task.train(tmp_path / "none.pt", indices=[])


def test_checkpoint_of_another_architecture_is_refused(tiny, tmp_path):
    task, _, checkpoint = tiny
    wider = LMTask(corpus=task.options["corpus"], width=32, layers=2, heads=2)
    with pytest.raises(StoreMismatchError, match="the lm task needs"):
        wider.load_model(checkpoint)
    with pytest.raises(ArtifactNotFoundError):
        task.load_model(tmp_path / "missing.pt")


def test_training_lowers_the_loss(tiny):
    task, model, _ = tiny
    fresh = type(model)(task.model_config)
    batch = task.collate(task.train_dataset())
    with torch.no_grad():
        assert task.compute_train_loss(batch, model).mean() < task.compute_train_loss(batch, fresh).mean() - 0.5


# -- losses and measurements ------------------------------------------------------------------------------
def _manual_log_probs(task, model, ids):
    """log p(x_t | x_<t) for t = 1..L-1 of one unpadded sequence, by hand."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    return torch.log_softmax(logits[:-1], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_loss_and_measurements_match_a_hand_computation(tiny):
    task, model, _ = tiny
    fact = task.corpus.facts[0]
    record = task.corpus.query(fact)
    prompt = [task.tokenizer.bos_id, *task.encode(record["prompt"])]
    completion = task.encode(record["completion"])
    manual = _manual_log_probs(task, model, prompt + completion)
    sequence = task.query_item(record | {"span": None})
    token = task.query_item(record)
    assert token["targets"].sum() == 1 and sequence["targets"].sum() == len(completion)
    train_item = task.train_dataset()[3]
    # batch them with a long training sequence so padding is exercised
    batch = task.collate([sequence, token, train_item])
    with torch.no_grad():
        measured = task.compute_measurement(batch, model)
        losses = task.compute_train_loss(batch, model)
    n = len(prompt)
    assert torch.allclose(measured[0], manual[n - 1 :].sum(), atol=1e-5)
    assert torch.allclose(measured[1], manual[n - 1], atol=1e-5)  # the object word only
    train_manual = _manual_log_probs(task, model, train_item["input_ids"].tolist())
    assert torch.allclose(losses[2], -train_manual.mean(), atol=1e-5)
    assert measured[0] < measured[1] < 0  # sum over more tokens is lower; log-probabilities are negative


def test_query_file_forms_agree(tiny, tmp_path):
    task, model, _ = tiny
    record = task.corpus.query(task.corpus.facts[1])
    ids = {"prompt_ids": task.encode(record["prompt"]), "completion_ids": task.encode(record["completion"])}
    lines = [record, {**record, "span": [0, 1]}, {**ids, "span": [0, 1]}, {**ids, "id": 7, "meta": {"x": 1}}]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    items = task.load_queries(path)
    assert len(items) == 4
    for item in items[1:3]:
        assert torch.equal(item["input_ids"], items[0]["input_ids"])
        assert torch.equal(item["targets"], items[0]["targets"])
    assert items[3]["targets"].sum() == 2
    assert task.describe(items[0]) == f"{record['prompt']} [{record['span']}] ."
    assert task.describe(task.train_dataset()[0]) == task.corpus.sequences[0]


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "x"', ":1: not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "a", "completon": "b"}', "unknown keys"),
    ('{"prompt": "a"}', "needs a string 'completion'"),
    ('{"prompt": "zzz lives in", "completion": "cat ."}', "unknown words"),
    ('{"prompt": "lives in", "completion": "cat .", "span": "dog"}', "does not occur"),
    ('{"prompt": "lives in", "completion": "cat .", "span": [1, 5]}', "outside the completion"),
    ('{"prompt": "lives in", "completion": "cat .", "span": 3}', "span must be"),
    ('{"prompt": "lives in", "completion": ""}', "completion is empty"),
    ('{"prompt_ids": [3, -1], "completion_ids": [4]}', "non-negative token ids"),
    ('{"prompt": "' + "cat " * 40 + '", "completion": "cat"}', "at most"),
])
def test_bad_query_files_are_one_clear_error(tiny, tmp_path, text, message):
    task, _, _ = tiny
    path = tmp_path / "bad.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        task.load_queries(path)


def test_missing_and_empty_query_files(tiny, tmp_path):
    task, _, _ = tiny
    with pytest.raises(ArtifactNotFoundError):
        task.load_queries(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="no queries"):
        task.load_queries(tmp_path / "empty.jsonl")


# -- per-example gradients against brute force ---------------------------------------------------------------
@pytest.mark.parametrize("kind", [ProjectionKind.IDENTITY, ProjectionKind.GAUSSIAN])
def test_per_example_gradients_match_brute_force(tiny, kind):
    """Training loss, sequence-level and token-level measurements: batched hooks == one backward per example."""
    task, model, _ = tiny
    groups = parameter_groups(model)
    queries = task.query_dataset()[:3]
    sequence_level = [{**q, "targets": q["targets"].clone()} for q in queries]
    for item in sequence_level:  # score the whole completion ("obj .") instead of the span
        item["targets"][int(item["targets"].nonzero()[0]) + 1] = True
    cases = [
        (task.train_dataset()[:4], task.compute_train_loss),
        (sequence_level, task.compute_measurement),
        (queries, task.compute_measurement),
    ]
    assert_projector_matches_brute_force(task, model, groups, ProjectionConfig(kind=kind, proj_dim=64, seed=5), cases)


def test_selected_module_groups_by_rules(tiny):
    task, model, _ = tiny
    rules = [GroupRule("blocks.1.mlp.*", "mlp1"), GroupRule("head.weight", "head"), GroupRule("*", None)]
    groups = parameter_groups(model, rules)
    assert [(g.name, [b.module for b in g.blocks]) for g in groups] == [
        ("mlp1", ["blocks.1.mlp.up", "blocks.1.mlp.down"]), ("head", ["head"])]
    items = task.query_dataset()[:3]
    with GradientProjector(model, groups, ProjectionConfig(kind=ProjectionKind.IDENTITY)) as projector:
        got = projector(lambda: task.compute_measurement(task.collate(list(items)), model))
        expected = brute_force_features(model, projector, items, lambda b: task.compute_measurement(b, model),
                                        task.collate)
    assert_features_close(got, expected)
    assert got["head"].shape[1] == model.head.weight.numel()


def test_token_log_probs_mask_alignment():
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 4] = 10.0  # position 0 predicts token 4
    batch = {"input_ids": torch.tensor([[1, 4, 2]]), "targets": torch.tensor([[False, True, False]])}
    picked, mask = token_log_probs(logits, batch)
    assert mask.tolist() == [[1.0, 0.0]]
    assert float(picked[0, 0]) > -1e-3


def test_featurize_query_end_to_end(tiny, tmp_path):
    """featurize → build-index → query through the public functions; the index is exact, so the top-1 of
    a query equals the arg-max of the brute-force scores."""
    from gradindex.config import FeaturizeConfig, IndexConfig
    from gradindex.features.run import featurize
    from gradindex.index import build_index
    from gradindex.query.attributor import Attributor

    task, model, checkpoint = tiny
    config = FeaturizeConfig(projection=ProjectionConfig(proj_dim=32), batch_size=16)
    store = featurize(task, tmp_path / "store", config, checkpoint=checkpoint, show_progress=False)
    assert store.metadata_columns == ["text"]
    build_index(store, IndexConfig(preconditioner="identity"), show_progress=False)
    attributor = Attributor.open(store)  # rebuilds the task from the manifest
    queries = task.query_dataset()[:4]
    top = attributor.attribute(queries, k=3)
    vectors = attributor.query_vectors(queries)
    ids, feats = store.read()
    stored = np.concatenate([feats[g] for g in store.groups], axis=1)
    best = ids[np.argmax(vectors @ stored.T, axis=1)]
    assert (top.sample_ids[:, 0] == best).all()
    attributor.close()
