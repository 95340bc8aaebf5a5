"""The Hugging Face causal-LM adapter on a tiny random GPT-2 built from a config (no hub download):
Conv1D factorization, tied embeddings, LoRA-only and selected-module groups, per-example gradients."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from lm_reference import assert_features_close, brute_force_features
from lm_reference import single_thread  # noqa: F401  (autouse: the module runs on one thread)
from torch import nn

from reference import dense_block_matrix

from gradindex.config import GroupRule, ProjectionConfig, ProjectionKind
from gradindex.errors import ConfigError, MissingDependencyError
from gradindex.features.gradients import GradientProjector
from gradindex.features.groups import parameter_groups
from gradindex.task import load_task

transformers = pytest.importorskip("transformers")

HF_TASK = "gradindex.integrations.hf:HFCausalLMTask"
VOCAB = 40


def tiny_gpt2(seed: int = 0) -> nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=1, eos_token_id=1)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as in GPT-2
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A saved tiny GPT-2, a training file of token ids of mixed lengths, and the task over them."""
    root = tmp_path_factory.mktemp("hf")
    tiny_gpt2().save_pretrained(root / "model")
    generator = torch.Generator().manual_seed(1)
    lines = [{"input_ids": torch.randint(2, VOCAB, (int(n),), generator=generator).tolist()}
             for n in torch.randint(3, 12, (10,), generator=generator)]
    (root / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    queries = [{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9]},
               {"prompt_ids": [11], "completion_ids": [12, 13, 14], "span": [1, 2]},
               {"prompt_ids": [20, 21, 22, 23, 24], "completion_ids": [25]}]
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    options = {"model": str(root / "model"), "train_file": str(root / "train.jsonl"),
               "query_file": str(root / "queries.jsonl")}
    task = load_task(HF_TASK, options)
    return task, task.load_model(None), root


def _check_against_brute_force(task, model, groups, kind=ProjectionKind.IDENTITY):
    cases = [(task.train_dataset()[:5], task.compute_train_loss), (task.query_dataset(), task.compute_measurement)]
    with GradientProjector(model, groups, ProjectionConfig(kind=kind, proj_dim=48, seed=2)) as projector:
        for items, function in cases:
            batch = task.collate(list(items))
            got = projector(lambda: function(batch, model), verify=True)
            expected = brute_force_features(model, projector, items, lambda b: function(b, model), task.collate)
            assert_features_close(got, expected)
    return got


def test_gpt2_groups_conv1d_and_tied_embedding(hf):
    _, model, _ = hf
    groups = {g.name: g for g in parameter_groups(model)}
    assert "lm_head" not in groups
    tied = groups["transformer.wte"]
    assert [(b.module, b.kind, b.left, b.right, b.tie) for b in tied.blocks] == [
        ("transformer.wte", "embedding", VOCAB, 16, "transformer.wte.weight"),
        ("lm_head", "linear", VOCAB, 16, "transformer.wte.weight")]
    assert tied.numel == model.transformer.wte.weight.numel()  # counted once
    c_attn = groups["transformer.h.0.attn.c_attn"].blocks[0]
    assert (c_attn.kind, c_attn.left, c_attn.right) == ("conv1d", 48, 17)  # [d_out, d_in + bias]
    with GradientProjector(model, list(groups.values()), ProjectionConfig(proj_dim=64)) as projector:
        assert projector.group_dims()["transformer.wte"] == 64  # one shared projector, not two


@pytest.mark.parametrize("kind", [ProjectionKind.IDENTITY, ProjectionKind.GAUSSIAN])
def test_hf_per_example_gradients_match_brute_force(hf, kind):
    """Every group of GPT-2, tied embedding included, for the training loss and the measurement."""
    task, model, _ = hf
    _check_against_brute_force(task, model, parameter_groups(model), kind)


def test_conv1d_factorized_equals_dense_kronecker_projection(hf):
    task, model, _ = hf
    groups = [g for g in parameter_groups(model) if g.name == "transformer.h.1.mlp.c_fc"]
    module = model.transformer.h[1].mlp.c_fc
    items = task.train_dataset()[:3]
    with GradientProjector(model, groups, ProjectionConfig(proj_dim=24, seed=9)) as projector:
        got = projector(lambda: task.compute_train_loss(task.collate(list(items)), model))["transformer.h.1.mlp.c_fc"]
        bp = projector.projectors["transformer.h.1.mlp.c_fc"][0]
        kron = dense_block_matrix(bp)  # stacked P_lⁱ ⊗ P_rⁱ / √r: [k, d_out·(d_in+1)]
        assert kron.shape[0] < kron.shape[1]  # really projected
        for row, item in enumerate(items):
            loss = task.compute_train_loss(task.collate([item]), model)[0]
            weight, bias = torch.autograd.grad(loss, [module.weight, module.bias])
            gradient = torch.cat([weight.T, bias[:, None]], dim=1)  # y = x W + b, W is [d_in, d_out]
            expected = kron @ gradient.reshape(-1)
            assert torch.allclose(got[row], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_tied_tensor_rules(hf):
    _, model, _ = hf
    both = parameter_groups(model, [GroupRule("transformer.wte.weight", "vocab"), GroupRule("lm_head.weight", "vocab")])
    assert [b.module for b in next(g for g in both if g.name == "vocab").blocks] == ["transformer.wte", "lm_head"]
    with pytest.raises(ConfigError, match="one tied tensor"):
        parameter_groups(model, [GroupRule("lm_head.weight", "head")])
    with pytest.raises(ConfigError, match="one tied tensor"):
        parameter_groups(model, [GroupRule("lm_head.weight", None)])  # excluding one alias only
    gone = parameter_groups(model, [GroupRule("transformer.wte.weight", None), GroupRule("lm_head.weight", None)])
    assert all(b.module not in ("transformer.wte", "lm_head") for g in gone for b in g.blocks)


class _Readout(nn.Module):
    """Uses a tied matrix outside nn.Linear (so its block is generic)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x @ self.weight.T


class _TiedToy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.readout = _Readout(self.emb.weight)

    def forward(self, ids):
        return self.readout(torch.tanh(self.mix(self.emb(ids))))


def test_tied_tensor_of_mixed_layouts_falls_back_to_generic():
    torch.manual_seed(0)
    model = _TiedToy()
    groups = parameter_groups(model)
    tied = next(g for g in groups if g.name == "emb")
    assert [(b.module, b.kind, b.tie) for b in tied.blocks] == [("emb", "generic", "emb.weight"),
                                                                 ("readout", "generic", "emb.weight")]
    items = [torch.randint(0, 11, (5,)) for _ in range(3)]

    def value(batch):
        return torch.log_softmax(model(batch), -1)[:, :, 3].mean(1)

    for kind in (ProjectionKind.IDENTITY, ProjectionKind.GAUSSIAN):
        with GradientProjector(model, groups, ProjectionConfig(kind=kind, proj_dim=20)) as projector:
            got = projector(lambda: value(torch.stack(items)), verify=True)
            expected = brute_force_features(model, projector, items, value, torch.stack)
        assert_features_close(got, expected)


class _LoRA(nn.Module):
    """``base(x) + B(A(x))`` around a frozen HF Conv1D, as peft does."""

    def __init__(self, base: nn.Module, rank: int = 2):
        super().__init__()
        d_in, d_out = base.weight.shape
        self.base = base
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


def test_lora_only_attribution(hf):
    task, _, _ = hf
    model = tiny_gpt2()
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in model.transformer.h:
        layer.attn.c_attn = _LoRA(layer.attn.c_attn)
    groups = parameter_groups(model)
    assert [g.name for g in groups] == [f"transformer.h.{i}.attn.c_attn.lora_{s}" for i in range(2) for s in "AB"]
    _check_against_brute_force(task, model, groups)


def test_selected_modules_by_rules(hf):
    task, model, _ = hf
    rules = [GroupRule("transformer.h.1.mlp.*", "mlp1"), GroupRule("transformer.ln_f.*", "ln_f"), GroupRule("*", None)]
    groups = parameter_groups(model, rules)
    assert [g.name for g in groups] == ["mlp1", "ln_f"]
    _check_against_brute_force(task, model, groups)


def test_text_training_file_and_queries_with_a_local_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<s>", "<pad>", "the", "cat", "sat", "on", "mat", "a", "dog", "."]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", pad_token="<pad>")
    tiny_gpt2().save_pretrained(tmp_path / "model")
    fast.save_pretrained(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text('{"text": "the cat sat on the mat ."}\n{"text": "a dog sat ."}\n')
    (tmp_path / "q.jsonl").write_text('{"prompt": "the cat sat on", "completion": "the mat .", "span": "mat"}\n')
    task = load_task(HF_TASK, {"model": str(tmp_path / "model"), "train_file": str(tmp_path / "train.jsonl")})
    assert task.bos_ids == (0,)
    assert task.train_dataset()[1]["input_ids"].tolist() == [0, 7, 8, 4, 9]
    (query,) = task.load_queries(tmp_path / "q.jsonl")
    assert query["input_ids"].tolist() == [0, 2, 3, 4, 5, 2, 6, 9]
    assert query["targets"].nonzero().flatten().tolist() == [6]
    assert task.describe(query) == "the cat sat on the [mat] ."
    assert task.metadata(task.train_dataset())["text"].tolist() == ["the cat sat on the mat .", "a dog sat ."]


def test_hf_task_errors(hf, tmp_path, monkeypatch):
    task, _, root = hf
    with pytest.raises(ConfigError, match="'model'"):
        load_task(HF_TASK, {"train_file": "x"})
    (tmp_path / "bad.jsonl").write_text('{"input_ids": [1, 2, 999]}\n')
    with pytest.raises(ConfigError, match="ids below 40"):
        load_task(HF_TASK, {"model": str(root / "model"), "train_file": str(tmp_path / "bad.jsonl")})
    (tmp_path / "text.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(ConfigError, match="has no tokenizer"):
        load_task(HF_TASK, {"model": str(root / "model"), "train_file": str(tmp_path / "text.jsonl")})
    (tmp_path / "q.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(ConfigError, match="q.jsonl:1: .*no tokenizer"):
        task.load_queries(tmp_path / "q.jsonl")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match=r"gradindex\[hf\]"):
        load_task(HF_TASK, {"model": str(root / "model"), "train_file": str(root / "train.jsonl")})


def test_hf_cli_featurize_index_query(hf, tmp_path):
    from click.testing import CliRunner

    from gradindex.cli import main

    _, _, root = hf
    options = ["--task-option", f"model={root / 'model'}", "--task-option", f"train_file={root / 'train.jsonl'}"]
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "featurize", HF_TASK, *options, "--out", str(tmp_path / "store"),
                                  "--proj-dim", "32"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(main, ["-q", "build-index", str(tmp_path / "store")]).exit_code == 0
    result = runner.invoke(main, ["-q", "query", str(tmp_path / "store"), "--inputs", str(root / "queries.jsonl"),
                                  "-k", "3", "--json", "--trust-task"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]  # nothing but JSON, even with stderr mixed in
    assert [line["query"] for line in lines] == [0, 1, 2] and all(len(line["results"]) == 3 for line in lines)
    (tmp_path / "bad.jsonl").write_text('{"prompt_ids": [1], "completion_ids": []}\n')
    result = runner.invoke(main, ["-q", "query", str(tmp_path / "store"), "--inputs", str(tmp_path / "bad.jsonl"),
                                  "--trust-task"])
    assert result.exit_code == 2 and "completion is empty" in result.output
