"""GradindexCallback in a real transformers.Trainer run (GPT-2- and Llama-style models built from configs, a
peft LoRA adapter, a datasets.Dataset of the local Python language reference): each block equals a post-hoc
featurize of the same checkpoint and data; build-index and query --tokens work on it; DDP is refused."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gradindex.cli import main
from gradindex.config import FeaturizeConfig, ProjectionConfig
from gradindex.errors import ConfigError
from gradindex.features.run import featurize
from gradindex.integrations.hf import HFCausalLMTask
from gradindex.store.feature_store import FeatureStore

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

VOCAB = 48


def _dataset():
    """12 short passages of pydoc_data.topics, character-level token ids (no tokenizer download)."""
    from pydoc_data.topics import topics

    texts = [" ".join(topics[name].split())[:int(10 + 3 * i)] for i, name in enumerate(sorted(topics)[:12])]
    table = datasets.Dataset.from_dict({"text": texts})
    return table.map(lambda row: {"input_ids": [1] + [2 + ord(c) % (VOCAB - 2) for c in row["text"]]})


def _collate(rows):
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        mask[i, : len(row["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _model(kind, root):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=64, bos_token_id=1, eos_token_id=1)
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=1, eos_token_id=1)
    model = transformers.GPT2LMHeadModel(config)
    if kind == "lora":
        peft = pytest.importorskip("peft")
        model.save_pretrained(root / "base")  # the adapter names its base model's local directory
        model = transformers.GPT2LMHeadModel.from_pretrained(root / "base")
        lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                               lora_dropout=0.0)
        model = peft.get_peft_model(model, lora)
        for module in model.modules():  # LoRA's B starts at zero; make every adapter matter from step 0
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    return model


def _train(model, root, callback, epochs=2, save_steps=0):
    args = transformers.TrainingArguments(
        output_dir=str(root / "out"), per_device_train_batch_size=4, num_train_epochs=epochs, learning_rate=5e-3,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(), data_collator=_collate,
                                   callbacks=[callback])
    trainer.train()
    return trainer


@pytest.mark.parametrize("kind", ["gpt2", "llama", "lora"])
def test_blocks_equal_a_post_hoc_featurize(kind, tmp_path):
    from gradindex.integrations.hf import GradindexCallback

    model = _model(kind, tmp_path)
    callback = GradindexCallback(store=tmp_path / "gi", every="epoch", proj_dim=16)
    _train(model, tmp_path, callback)
    listing = json.loads((tmp_path / "gi" / "checkpoints.json").read_text())
    assert [block["step"] for block in listing] == [3, 6]  # 12 examples, batch 4, 2 epochs
    assert listing[0]["learning_rate"] > listing[1]["learning_rate"] >= 0  # the linear schedule, recorded
    lines = (tmp_path / "gi" / "train.jsonl").read_text().splitlines()
    assert [json.loads(line)["input_ids"] for line in lines] == _dataset()["input_ids"]
    previous = None
    for block in listing:
        store = FeatureStore.open(tmp_path / "gi" / block["store"] / "store", trust_task=True)
        task = HFCausalLMTask(model=str(tmp_path / "gi" / block["model"]), train_file=str(tmp_path / "gi" / "train.jsonl"),
                              bos_id=-1)
        post_hoc = featurize(task, tmp_path / f"post-{block['step']}", FeaturizeConfig(
            projection=ProjectionConfig(proj_dim=16)), show_progress=False)
        ids, got = store.read()
        post_ids, want = post_hoc.read()
        assert list(ids) == list(post_ids) == list(range(12))  # training-set indices are the sample ids
        assert store.groups == post_hoc.groups
        if kind == "lora":
            assert all("lora_" in group for group in store.groups)  # only the trainable adapters
        for group in store.groups:
            np.testing.assert_allclose(got[group], want[group], rtol=1e-4, atol=1e-5 * np.abs(want[group]).max())
        if previous is not None:
            assert not np.allclose(previous, got[store.groups[0]])  # the model moved between checkpoints
        previous = got[store.groups[0]]
    if kind == "gpt2":  # TracIn over the checkpoints: Σ_b lr_b · (gradient dot products at block b)
        from gradindex.config import IndexConfig, Preconditioner
        from gradindex.features.query import load_store_task, query_group_features
        from gradindex.index.build import build_index
        from gradindex.integrations.hf_callback import checkpoint_scores

        queries = tmp_path / "q2.jsonl"
        queries.write_text(json.dumps({"prompt_ids": [1, 30, 31], "completion_ids": [32, 33]}) + "\n")
        expected = 0
        for block in listing:
            store = FeatureStore.open(tmp_path / "gi" / block["store"] / "store", trust_task=True)
            build_index(store, IndexConfig(kind="flat", preconditioner=Preconditioner.IDENTITY), show_progress=False)
            store_task = load_store_task(store)
            items = store_task.load_queries(queries)
            psi = query_group_features(store, items, preconditioner=Preconditioner.IDENTITY)  # −P∇m(q)
            _, phi = store.read()
            expected = expected + block["learning_rate"] * sum(psi[g] @ phi[g].T for g in store.groups)
        ids, tracin = checkpoint_scores(tmp_path / "gi", queries)
        assert list(ids) == list(range(12)) and tracin.shape == (1, 12)
        np.testing.assert_allclose(tracin, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    last = tmp_path / "gi" / listing[-1]["store"] / "store"
    runner = CliRunner()
    assert runner.invoke(main, ["-q", "build-index", str(last)]).exit_code == 0
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt_ids": [1, 30, 31], "completion_ids": [32, 33]}) + "\n")
    result = runner.invoke(main, ["-q", "query", str(last), "--inputs", str(tmp_path / "q.jsonl"), "-k", "3",
                                  "--json", "--tokens", "--trust-task"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert len(record["results"]) == 3 and all(r["tokens"] for r in record["results"])


def test_every_n_steps_and_resumed_blocks_are_kept(tmp_path):
    from gradindex.integrations.hf import GradindexCallback

    callback = GradindexCallback(store=tmp_path / "gi", every=2, proj_dim=8)
    _train(_model("gpt2", tmp_path), tmp_path, callback, epochs=1)
    assert [b["step"] for b in callback.blocks] == [2]
    again = GradindexCallback(store=tmp_path / "gi", every=1, proj_dim=8)
    _train(_model("gpt2", tmp_path), tmp_path, again, epochs=1)
    assert [b["step"] for b in again.blocks] == [2, 1, 3]  # step 2 kept from the first run
    assert len(again.stores()) == 3
    saves = GradindexCallback(store=tmp_path / "saves", every="save", proj_dim=8)
    _train(_model("gpt2", tmp_path), tmp_path, saves, epochs=1, save_steps=2)
    assert [b["step"] for b in saves.blocks] == [2, 3]  # the Trainer saves at step 2 and at the end


def test_refuses_distributed_training_and_bad_options(tmp_path):
    from gradindex.integrations.hf import GradindexCallback

    callback = GradindexCallback(store=tmp_path / "gi")
    with pytest.raises(ConfigError, match="distributed data parallel"):
        callback.on_train_begin(SimpleNamespace(world_size=2), None, None)
    with pytest.raises(ConfigError, match="every"):
        GradindexCallback(store=tmp_path / "gi", every="sometimes")
    with pytest.raises(ConfigError, match="input_ids"):
        GradindexCallback(store=tmp_path / "gi", dataset=[{"text": "x"}]).on_train_begin(
            SimpleNamespace(world_size=1), None, None)
