"""query --tokens: token scores of each retrieved document add up to its sequence score (identity and Gram),
the JSON/table/HTML outputs, and the top span."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from gradindex.cli import main
from gradindex.query.tokens import top_span

transformers = pytest.importorskip("transformers")

HF_TASK = "gradindex.integrations.hf:HFCausalLMTask"
VOCAB = 40


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory):
    """A tiny GPT-2 and a Llama-style model built from configs, featurized (float32 rows)."""
    root = tmp_path_factory.mktemp("tokens")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1))
    gpt2.save_pretrained(root / "gpt2")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, bos_token_id=1, eos_token_id=1))
    llama.save_pretrained(root / "llama")
    generator = torch.Generator().manual_seed(1)
    lines = [{"input_ids": torch.randint(2, VOCAB, (int(n),), generator=generator).tolist()}
             for n in torch.randint(4, 12, (12,), generator=generator)]
    (root / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    queries = [{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9]},
               {"prompt_ids": [11], "completion_ids": [12, 13, 14], "span": [1, 2]}]
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    runner = CliRunner()
    for name in ("gpt2", "llama"):
        options = ["--task-option", f"model={root / name}", "--task-option", f"train_file={root / 'train.jsonl'}"]
        result = runner.invoke(main, ["-q", "featurize", HF_TASK, *options, "--out", str(root / f"store-{name}"),
                                      "--proj-dim", "16"])
        assert result.exit_code == 0, result.output
    return root


def _query(store, queries, *extra):
    result = CliRunner().invoke(main, ["-q", "query", str(store), "--inputs", str(queries), "-k", "4", "--tokens",
                                       "--trust-task", *extra])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("model", ["gpt2", "llama"])
@pytest.mark.parametrize("preconditioner", ["gram", "identity"])
def test_token_scores_add_up_to_the_sequence_score(lm_store, model, preconditioner):
    store = lm_store / f"store-{model}"
    built = CliRunner().invoke(main, ["-q", "build-index", str(store), "--preconditioner", preconditioner])
    assert built.exit_code == 0, built.output
    lines = [json.loads(line) for line in _query(store, lm_store / "queries.jsonl", "--json").splitlines()]
    assert len(lines) == 2
    lengths = [len(json.loads(line)["input_ids"]) for line in (lm_store / "train.jsonl").read_text().splitlines()]
    for line in lines:
        assert len(line["results"]) == 4
        # float32 rounding of the index's dot product is relative to the query's score scale (its top score):
        # a score near 0 by cancellation carries the same absolute error
        scale = max(abs(result["score"]) for result in line["results"])
        for result in line["results"]:
            tokens = result["tokens"]
            assert [t["pos"] for t in tokens] == list(range(lengths[result["sample_id"]] + 1))  # + the BOS token
            total = sum(t["score"] for t in tokens)
            assert abs(total - result["score"]) <= 1e-4 * scale, (total, result["score"], scale)
            assert len({round(t["score"], 12) for t in tokens}) > 1  # not spread evenly
            start, stop = result["top_span"]
            assert 0 <= start < stop <= len(tokens)


def test_table_marks_the_top_span_and_html_page(lm_store, tmp_path):
    store = lm_store / "store-gpt2"
    assert CliRunner().invoke(main, ["-q", "build-index", str(store)]).exit_code == 0
    page = tmp_path / "tokens.html"
    out = _query(store, lm_store / "queries.jsonl", "--html", str(page))
    assert "top span" in out and "[[" in out and "]]" in out
    text = page.read_text()
    assert text.count("<div class='doc'>") == 8 and "rgba(" in text and "class='top'" in text
    result = CliRunner().invoke(main, ["-q", "query", str(store), "--inputs", str(lm_store / "queries.jsonl"),
                                       "--html", str(page), "--trust-task"])
    assert result.exit_code == 2 and "add --tokens" in result.output


def test_top_span_is_the_maximum_sum_run():
    assert top_span([0.1, -1.0, 0.5, 0.7, -0.2, 0.3, -2.0]) == (2, 6)
    assert top_span([-3.0, -1.0, -2.0]) == (1, 2)
    scores = torch.randn(30, generator=torch.Generator().manual_seed(3)).tolist()
    best = max((sum(scores[a:b]), (a, b)) for a in range(30) for b in range(a + 1, 31))
    assert top_span(scores) == best[1]


def test_tasks_without_a_token_axis_are_one_clear_error(toy_store, tmp_path):
    import shutil

    from gradindex.errors import ConfigError
    from gradindex.index.build import build_index
    from gradindex.query.attributor import Attributor
    from gradindex.query.tokens import attribute_tokens
    from gradindex.store.feature_store import FeatureStore

    shutil.copytree(str(toy_store.path), tmp_path / "store")  # the session fixture stays without an index
    store = FeatureStore.open(tmp_path / "store", trust_task=True)
    build_index(store, show_progress=False)
    attributor = Attributor.open(store, trust_task=True)
    with pytest.raises(ConfigError, match="ToyTask has no token axis"):
        attribute_tokens(attributor, attributor.task.query_dataset()[:2], k=2)
