"""The diffusion-text task: prompts, the frozen encoder, cross-attention and LoRA gradients, concept measurements."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gradindex.config import FeaturizeConfig, IndexConfig, ProjectionConfig, ProjectionKind
from gradindex.errors import ConfigError
from gradindex.eval.evaluate import concept_precision
from gradindex.features.run import featurize, resolve_groups
from gradindex.features.gradients import GradientProjector
from gradindex.index import build_index
from gradindex.query.attributor import Attributor
from gradindex.task import load_task, make_batch
from gradindex.tasks.checkpoints import load_checkpoint
from gradindex.tasks.concepts import ConceptConfig
from gradindex.tasks.lora import LoRALinear, add_lora
from gradindex.tasks.prompts import BOS, NEUTRAL_WORDS, PAD, TEMPLATES, Prompter
from gradindex.tasks.text_diffusion_model import TextEncoder, TextPatchMixer
from test_concepts import CONFIG
from test_diffusion import engine_and_autograd, trained_tiny

TINY = {"num_train": 64, "steps": 150, "width": 16, "depth": 1, "draws": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return trained_tiny("diffusion-text", TINY, tmp_path_factory.mktemp("diffusion-text"))


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    return trained_tiny("diffusion-text-lora", {**TINY, "num_train": 96, "lora_steps": 60},
                        tmp_path_factory.mktemp("diffusion-text-lora"))


def test_prompts_write_each_value_in_words_and_neutral_words_in_its_slot():
    prompter = Prompter(ConceptConfig.load(CONFIG))
    assert prompter.vocabulary[:2] == ("<pad>", "<bos>") and prompter.vocabulary == Prompter(prompter.config).vocabulary
    labels = np.array([[0, 1, 3]])  # circle, stripes, grass
    texts = [prompter.text(labels[0], t) for t in range(len(TEMPLATES))]
    assert texts[0] == "a yellow striped circle on grass"
    assert texts[1] == "grass background , circle , yellow striped"
    assert len(set(texts)) == len(TEMPLATES)
    variants = prompter.variants(labels, np.array([1]))[0]  # full, subject/style/background neutral
    words = [[prompter.vocabulary[i] for i in row if i != PAD] for row in variants]
    assert words[0] == ["<bos>", "grass", "background", ",", "circle", ",", "yellow", "striped"]
    assert words[1] == ["<bos>", "grass", "background", ",", NEUTRAL_WORDS["subject"], ",", "yellow", "striped"]
    assert words[2] == ["<bos>", "grass", "background", ",", "circle", ",", NEUTRAL_WORDS["style"]]
    assert words[3] == ["<bos>", NEUTRAL_WORDS["background"], "background", ",", "circle", ",", "yellow", "striped"]
    table = prompter.dropout_table(labels, np.array([1]))[0]
    np.testing.assert_array_equal(table[0], variants[0])
    np.testing.assert_array_equal(table[2], variants[2])  # bit 1: style neutral
    np.testing.assert_array_equal(table[8], prompter.empty(1)[0])
    assert table[8][0] == BOS and (table[8][1:] == PAD).all()
    with pytest.raises(ConfigError, match="value index"):
        prompter.text([0, 9, 0], 0)


def test_encoder_is_frozen_and_never_a_group(tiny):
    task, model = tiny
    assert not any(p.requires_grad for p in model.encoder.parameters())
    groups = resolve_groups(task, model, FeaturizeConfig())
    assert not any(b.module.startswith("encoder") for g in groups for b in g.blocks)
    assert {"blocks.0.cross.key.0", "blocks.0.cross.value.3", "blocks.0.cross.query"} <= {g.name for g in groups}
    c = task.model_config
    fresh = TextEncoder(c.vocab_size, c.max_len, c.text_dim, c.text_layers, c.text_heads, c.text_seed)
    for name, tensor in fresh.state_dict().items():  # training left it exactly as seeded
        torch.testing.assert_close(model.encoder.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("variant", ["text", "lora"])
@pytest.mark.parametrize("measure", ["loss", "subject", "style", "background"])
def test_engine_equals_per_example_autograd(tiny, tiny_lora, variant, measure):
    """Per-head cross-attention groups (and LoRA factors) on R / 2R rows per example → exact gradients."""
    groups, features, expected = engine_and_autograd(*(tiny if variant == "text" else tiny_lora), measure)
    for group in groups:
        assert expected[group.name].abs().sum() > 0, group.name
        torch.testing.assert_close(features[group.name], expected[group.name], rtol=1e-4, atol=1e-6,
                                   msg=group.name)


def test_concept_measurement_sign(tiny):
    """The concept's words help: neutral words for c raise the loss of training images (m_c > 0 on
    average); a query that leaves c unspecified has m_c = 0."""
    task, model = tiny
    batch = make_batch(task, task.train_dataset(), range(48))
    with torch.no_grad():
        for concept in task.concepts:
            values = task.concept_measurement(batch, model, concept)
            assert values.mean() > 0 and (values > 0).float().mean() > 0.6, (concept, values)
        queries = task.generate(model, task.concept_prompts("style", 4), seed=0)
        only_style = make_batch(task, queries, range(4))
        assert torch.all(task.concept_measurement(only_style, model, "subject") == 0)
        assert torch.all(task.concept_measurement(only_style, model, "style") != 0)


def test_precision_above_chance_on_a_tiny_run(tmp_path):
    task = load_task("diffusion-text", {"num_train": 300, "steps": 300, "width": 32, "depth": 1, "draws": 2})
    checkpoint = task.train(tmp_path / "model.pt")
    store = featurize(task, tmp_path / "store", FeaturizeConfig(projection=ProjectionConfig(proj_dim=64)),
                      checkpoint=checkpoint, show_progress=False)
    queries = task.generate(task.load_model(checkpoint), task.heldout_prompts(), seed=0)
    train_ids, train_meta = store.read_metadata()
    for concept in task.concepts:
        build_index(store, IndexConfig(concept=concept), show_progress=False)
        attributor = Attributor.open(store, concept=concept)
        top = attributor.attribute(queries, k=10)
        attributor.close()
        precision, chance = concept_precision(top, train_ids, train_meta[concept], task.metadata(queries)[concept])
        assert precision.mean() > chance.mean() + 0.05, (concept, precision.mean(), chance.mean())


def test_lora_variant_attributes_only_the_adapters_of_the_fine_tuning_set(tiny_lora):
    task, model = tiny_lora
    groups = resolve_groups(task, model, FeaturizeConfig())
    names = {b.module for g in groups for b in g.blocks}
    assert names and all(name.endswith((".lora_a", ".lora_b")) for name in names)
    assert all(".cross." in name for name in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.weight" for name in names}
    base_arch = {key: value for key, value in task.arch().items() if key != "lora"}
    base = load_checkpoint(TextPatchMixer(task.model_config), task.base_checkpoint(), base_arch, "base", "")
    adapted = dict(model.named_parameters())
    for name, tensor in base.named_parameters():  # fine-tuning left every base weight as pretrained
        lora_name = name if name in adapted else name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        torch.testing.assert_close(adapted[lora_name], tensor, rtol=0, atol=0, msg=name)
    assert any(bool(p.abs().sum() > 0) for n, p in adapted.items() if n.endswith("lora_b.weight"))
    pretrain, finetune = task.halves()
    labels = task.data.labels
    assert len(task.train_dataset()) == len(finetune) and not set(pretrain) & set(finetune)
    combos = [{tuple(p) for p in labels[rows, :2].tolist()} for rows in (pretrain, finetune)]
    assert not combos[0] & combos[1]
    for rows in (pretrain, finetune):
        for column in (0, 1):
            assert len(np.unique(labels[rows, column])) == len(task.concept_config.values(("subject", "style")[column]))


def test_lora_linear_starts_at_its_base_and_needs_a_target():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    x = torch.randn(7, 5)
    before = model(x)
    assert add_lora(model, ["2"], rank=2) == ["2"]
    assert isinstance(model[2], LoRALinear) and not model[0].weight.requires_grad
    torch.testing.assert_close(model(x), before)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["2.lora_a.weight", "2.lora_b.weight"]
    with pytest.raises(ConfigError, match="no nn.Linear"):
        add_lora(model, ["nothing.*"], rank=2)


def test_queries_round_trip(tiny, tmp_path):
    task, model = tiny
    queries = task.generate(model, [("circle", None, "grass"), ("star", "dots", "")], seed=3)
    path = task.save_queries(tmp_path / "q.npz", queries)
    loaded = task.load_queries(path)
    np.testing.assert_array_equal(loaded.images, queries.images)
    np.testing.assert_array_equal(loaded.prompts, queries.prompts)
    meta = task.metadata(loaded)
    assert list(meta["style"]) == ["", "dots"] and list(meta["background"]) == ["grass", ""]
    assert task.describe(loaded[0]) == meta["prompt"][0] and "colored" in meta["prompt"][0]
    inputs = {"images": loaded.images.tolist(), "template": loaded.templates.tolist(),
              **{f: [str(v) for v in meta[f]] for f in ("subject", "style", "background")}}
    from_json = task.queries_from_json(json.loads(json.dumps(inputs)))  # `gradindex serve`'s inputs
    np.testing.assert_array_equal(from_json.prompts, loaded.prompts)
    np.testing.assert_array_equal(from_json.images, loaded.images)
    with pytest.raises(ConfigError, match="template"):
        task.queries_from_json({key: value for key, value in inputs.items() if key != "template"})
    np.savez(tmp_path / "bad.npz", images=queries.images, subject=["circle"] * 2, style=["dots"] * 2,
             background=["night"] * 2, template=[0, 9])
    with pytest.raises(ConfigError, match="template"):
        task.load_queries(tmp_path / "bad.npz")


def test_isolated_words_change_only_the_key_and_value_gradients(tiny):
    """``isolate_words`` detaches the other words' keys and values: m_c's value and every other group's
    gradient stay; the key/value groups keep only the concept words' terms."""
    task, model = tiny
    plain = load_task("diffusion-text", {**TINY, "isolate_words": False})
    groups = resolve_groups(task, model, FeaturizeConfig())
    batch = make_batch(task, task.train_dataset(), [3, 4, 5])
    with torch.no_grad():
        torch.testing.assert_close(task.concept_measurement(batch, model, "style"),
                                   plain.concept_measurement(batch, model, "style"), rtol=0, atol=0)
    with GradientProjector(model, groups, ProjectionConfig(kind=ProjectionKind.IDENTITY)) as projector:
        isolated = projector(lambda: task.concept_measurement(batch, model, "style"))
        full = projector(lambda: plain.concept_measurement(batch, model, "style"))
    for group in groups:
        if ".cross.key." in group.name or ".cross.value." in group.name:
            assert not torch.allclose(isolated[group.name], full[group.name]), group.name
        else:
            torch.testing.assert_close(isolated[group.name], full[group.name], msg=group.name)


def test_sparse_captions_name_the_subject_always_and_the_rest_at_their_rates():
    task = load_task("diffusion-text-sparse", {"num_train": 2000})
    assert task.options["caption_style"] == 0.3 and task.options["caption_background"] == 0.2
    named = task.named
    assert named[:, 0].all()
    assert abs(named[:, 1].mean() - 0.3) < 0.04 and abs(named[:, 2].mean() - 0.2) < 0.04
    assert abs((named[:, 1] & named[:, 2]).mean() - 0.06) < 0.02  # drawn independently
    dataset = task.train_dataset()
    meta = task.metadata(dataset)
    np.testing.assert_array_equal(meta["style_named"], named[:, 1])
    values = task.concept_config.values("style")
    np.testing.assert_array_equal(meta["style"], np.array(values)[task.data.labels[:, 1]])  # the true values
    prompter = task.prompter
    for i in np.flatnonzero(~named[:, 1])[:20]:
        assert NEUTRAL_WORDS["style"] in meta["prompt"][i].split()
        assert not set(" ".join(prompter.words["style"][task.data.labels[i, 1]]).split()) & set(meta["prompt"][i].split())
        # the full prompt and the style-neutral one are the same ids
        np.testing.assert_array_equal(dataset.prompts[i, 0], dataset.prompts[i, 2])
    for i in np.flatnonzero(named[:, 1])[:20]:
        assert " ".join(prompter.words["style"][task.data.labels[i, 1]]) in meta["prompt"][i]
    # the default task: every caption names every factor, no new columns or options, same checkpoint name
    plain = load_task("diffusion-text", {"num_train": 2000})
    assert plain.named.all() and "style_named" not in plain.metadata(plain.train_dataset())
    assert "caption_style" not in plain.options and plain.default_checkpoint() != task.default_checkpoint()
    sparse_lora = load_task("diffusion-text-sparse-lora", {"num_train": 2000})
    assert sparse_lora.lora_rank == 4 and sparse_lora.base_checkpoint() != load_task(
        "diffusion-text-lora", {"num_train": 2000}).base_checkpoint()
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(ConfigError, match="caption_style"):
            load_task("diffusion-text", {"caption_style": bad})
    with pytest.raises(ConfigError, match="concept_measure"):
        load_task("diffusion-text", {"concept_measure": "other"})


def test_image_queries_name_nothing_and_keep_their_true_values():
    task = load_task("diffusion-text-sparse", {"num_train": 50})
    queries = task.image_queries(6, seed=3)
    meta = task.metadata(queries)
    assert not queries.named.any() and all(v != "" for f in ("subject", "style", "background") for v in meta[f])
    words = set(NEUTRAL_WORDS.values())
    assert all(words <= set(p.split()) for p in meta["prompt"])
    assert not np.array_equal(queries.images, task.data.images[:6])  # not training images


def test_denoise_measure_is_the_mean_loss_under_both_prompts(tiny):
    """``concept_measure=denoise``: m_c = −½(ℓ(full prompt) + ℓ(c neutral)) with the same draws, so it is
    defined (and non-zero) for a query whose prompt does not name c, where ``contrast`` is 0."""
    task, model = tiny
    denoise = load_task("diffusion-text", {**TINY, "concept_measure": "denoise"})
    queries = task.image_queries(4, seed=0)
    for dataset in (task.train_dataset(), queries):
        images, prompts, keys = make_batch(task, dataset, range(4))
        with torch.no_grad():
            for column, concept in enumerate(task.concepts):
                got = denoise.concept_measurement((images, prompts, keys), model, concept)
                full = task._errors((images, prompts[:, 0], keys), model).mean(1)
                neutral = task._errors((images, prompts[:, 1 + column], keys), model).mean(1)
                torch.testing.assert_close(got, -(full + neutral) / 2, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        batch = make_batch(task, queries, range(4))
        assert torch.all(task.concept_measurement(batch, model, "style") == 0)
        assert torch.all(denoise.concept_measurement(batch, model, "style") < 0)


def test_denoise_measure_gradients_equal_per_example_autograd_on_sparse_captions(tiny):
    """``denoise`` on training images whose captions name only some concepts: exact per-example gradients,
    and the key/value gradients of an unnamed caption still reach c's neutral word (non-zero)."""
    _, model = tiny
    task = load_task("diffusion-text", {**TINY, "concept_measure": "denoise", "caption_style": 0.3})
    rows = [int(i) for i in np.flatnonzero(~task.named[:, 1])[:3]]
    groups, features, expected = engine_and_autograd(task, model, "style", rows=rows)
    for group in groups:
        torch.testing.assert_close(features[group.name], expected[group.name], rtol=1e-4, atol=1e-6,
                                   msg=group.name)
        if ".cross.key." in group.name or ".cross.value." in group.name:
            assert expected[group.name].abs().sum() > 0, group.name
