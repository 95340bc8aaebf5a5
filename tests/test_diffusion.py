"""The diffusion task: DDPM training, fixed noise draws, the engine on R·B rows, concept measurements."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradindex.config import ProjectionConfig, ProjectionKind
from gradindex.errors import ConfigError
from gradindex.features.run import resolve_groups
from gradindex.config import FeaturizeConfig
from gradindex.features.gradients import GradientProjector
from gradindex.task import load_task, make_batch
from gradindex.tasks.diffusion_model import PatchMixer, TrainConfig, fixed_draws, sample, train_model
from reference import per_example_gradients

TINY = {"num_train": 48, "steps": 150, "width": 16, "depth": 1, "draws": 2}


def trained_tiny(spec: str, options: dict, folder):
    """``(task, model)``: the ``spec`` task with ``options`` trained into ``folder/tiny.pt`` and loaded."""
    task = load_task(spec, options)
    return task, task.load_model(task.train(folder / "tiny.pt"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return trained_tiny("diffusion", TINY, tmp_path_factory.mktemp("diffusion"))


def _mean_loss(task, model, dataset):
    batch = make_batch(task, dataset, range(len(dataset)))
    with torch.no_grad():
        return float(task.compute_train_loss(batch, model).mean())


def test_ddpm_loss_decreases_on_a_tiny_run(tiny):
    task, trained = tiny
    torch.manual_seed(0)
    untrained = PatchMixer(task.model_config).eval()
    dataset = task.train_dataset()
    before, after = _mean_loss(task, untrained, dataset), _mean_loss(task, trained, dataset)
    assert before == pytest.approx(1.0, abs=0.1)  # zero-initialised output: predicts ε = 0
    assert after < 0.9 * before, (before, after)


def test_training_is_seeded(tiny, tmp_path):
    task, trained = tiny
    again = task.load_model(task.train(tmp_path / "again.pt", seed=task.seed))
    for (name, a), (_, b) in zip(trained.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_fixed_draws_depend_only_on_the_key_and_are_stratified():
    t_pair, noise_pair = fixed_draws([5, 7], 4, 200, (3, 2, 2), seed=0)
    t_one, noise_one = fixed_draws([7], 4, 200, (3, 2, 2), seed=0)
    assert t_pair.shape == (8,) and noise_pair.shape == (8, 3, 2, 2)
    torch.testing.assert_close(t_pair[4:], t_one)
    torch.testing.assert_close(noise_pair[4:], noise_one)
    assert [int(t) // 50 for t in t_pair[:4]] == [0, 1, 2, 3]  # one draw per stratum of 200/4 steps
    assert not torch.equal(noise_pair[:4], noise_pair[4:])


def engine_and_autograd(task, model, measure: str, rows=(0, 1, 2)):
    """``(groups, engine features, per-example autograd gradients)`` of the loss or ``m_c`` on training ``rows``."""
    groups = resolve_groups(task, model, FeaturizeConfig())
    dataset = task.train_dataset()

    def compute(batch):
        if measure == "loss":
            return task.compute_train_loss(batch, model)
        return task.concept_measurement(batch, model, measure)

    batch = make_batch(task, dataset, list(rows))
    with GradientProjector(model, groups, ProjectionConfig(kind=ProjectionKind.IDENTITY)) as projector:
        features = projector(lambda: compute(batch), verify=True)
    expected = per_example_gradients(model, groups, compute, [make_batch(task, dataset, [i]) for i in rows])
    return groups, features, expected


@pytest.mark.parametrize("measure", ["loss", "subject", "style", "background"])
def test_engine_on_r_draws_equals_per_example_autograd(tiny, measure):
    """R contiguous rows per example (2R for concept measurements) → exact per-example gradients."""
    groups, features, expected = engine_and_autograd(*tiny, measure)
    for group in groups:
        torch.testing.assert_close(features[group.name], expected[group.name], rtol=1e-4, atol=1e-6,
                                   msg=group.name)


def test_concept_measurement_gradients_differ_between_concepts(tiny):
    task, model = tiny
    queries = task.generate(model, task.heldout_prompts(6), seed=1)
    groups = resolve_groups(task, model, FeaturizeConfig())
    batch = make_batch(task, queries, range(len(queries)))
    gradients = {}
    with GradientProjector(model, groups, ProjectionConfig(kind=ProjectionKind.IDENTITY)) as projector:
        for concept in task.concepts:
            gradients[concept] = projector(lambda: task.concept_measurement(batch, model, concept))
        again = projector(lambda: task.concept_measurement(batch, model, "subject"))
    torch.testing.assert_close(again["subject"], gradients["subject"]["subject"])  # deterministic draws
    # only concept c's token is nulled in m_c: its own null row gets gradient, the other factors' null rows none
    for concept in task.concepts:
        for factor in task.concepts:
            rows = gradients[concept][factor].reshape(len(queries), -1, task.model_config.embed_dim)
            null_row = rows[:, -1].abs().sum()
            assert (null_row > 0) if factor == concept else (null_row == 0), (concept, factor)
    flat = {c: torch.cat([g[group.name] for group in groups], 1) for c, g in gradients.items()}
    for a, b in [("subject", "style"), ("subject", "background"), ("style", "background")]:
        cosine = torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=1)
        assert cosine.abs().max() < 0.9, (a, b, cosine)


def test_sampler_is_deterministic_and_shaped(tiny):
    task, model = tiny
    tokens = torch.from_numpy(task.tokens(task.heldout_prompts(3)))
    a, b = sample(model, tokens, steps=5, seed=2), sample(model, tokens, steps=5, seed=2)
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b) and a.abs().max() <= 1
    assert not torch.equal(a, sample(model, tokens, steps=5, seed=3))


def test_queries_round_trip_and_metadata(tiny, tmp_path):
    task, model = tiny
    queries = task.generate(model, task.heldout_prompts(4))
    path = task.save_queries(tmp_path / "q.npz", queries)
    loaded = task.load_queries(path)
    np.testing.assert_array_equal(loaded.images, queries.images)
    meta = task.metadata(loaded)
    assert list(zip(meta["subject"], meta["style"], meta["background"])) == task.heldout_prompts(4)
    assert task.describe(loaded[0]) == " ".join(task.heldout_prompts(1)[0])
    assert task.render(loaded[0]).shape == (16, 16, 3)
    withheld = {tuple(pair) for pair in task.concept_config.withheld}
    assert all((s, y) in withheld for s, y, _ in task.heldout_prompts())
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 8, 8, 3), np.uint8), subject=["circle"] * 2,
             style=["solid"] * 2, background=["night"] * 2)
    with pytest.raises(ConfigError, match="16, 16, 3"):
        task.load_queries(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", images=queries.images, subject=["blob"] * 4, style=["solid"] * 4,
             background=["night"] * 4)
    with pytest.raises(ConfigError, match="subject 'blob'"):
        task.load_queries(tmp_path / "bad2.npz")


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="draws"):
        load_task("diffusion", {"draws": 0})
    with pytest.raises(ConfigError, match="concept must be one of"):
        task = load_task("diffusion", TINY)
        task.concept_measurement(None, None, "colour")


def test_train_config_default_is_the_documented_one():
    assert TrainConfig().steps == load_task("diffusion").train_config.steps
    assert callable(train_model)


def test_concept_prompts_specify_only_their_concept(tiny):
    task, model = tiny
    prompts = task.concept_prompts("style", 10, seed=3)
    assert all(s is None and b is None for s, _, b in prompts)
    assert sorted({y for _, y, _ in prompts}) == sorted(task.concept_config.values("style"))
    assert prompts == task.concept_prompts("style", 10, seed=3) != task.concept_prompts("style", 10, seed=4)
    queries = task.generate(model, prompts[:4], seed=0)
    np.testing.assert_array_equal(queries.labels[:, [0, 2]], [list(task.model_config.num_values[::2])] * 4)
    meta = task.metadata(queries)
    assert list(meta["subject"]) == [""] * 4 and list(meta["style"]) == [p[1] for p in prompts[:4]]
    batch = make_batch(task, queries, range(4))
    with torch.no_grad():  # the subject is already null: nulling it changes nothing
        assert torch.all(task.concept_measurement(batch, model, "subject") == 0)
    with pytest.raises(ConfigError, match="concept must be one of"):
        task.concept_prompts("colour", 3)


def test_queries_from_json_equal_the_query_file(tiny, tmp_path):
    """`gradindex serve`'s inputs: the .npz's arrays as JSON give the same dataset as the file."""
    import json

    task, model = tiny
    queries = task.generate(model, task.heldout_prompts(3))
    loaded = task.load_queries(task.save_queries(tmp_path / "q.npz", queries))
    meta = task.metadata(loaded)
    inputs = {"images": loaded.images.tolist(), **{f: [str(v) for v in meta[f]] for f in ("subject", "style", "background")}}
    from_json = task.queries_from_json(json.loads(json.dumps(inputs)))
    for field in ("images", "labels", "keys"):
        np.testing.assert_array_equal(getattr(from_json, field), getattr(loaded, field))
    with pytest.raises(ConfigError, match="0..255"):
        task.queries_from_json({**inputs, "images": (loaded.images.astype(int) + 300).tolist()})
    with pytest.raises(ConfigError, match="expected an object with images"):
        task.queries_from_json({"images": inputs["images"]})
    with pytest.raises(ConfigError, match="subject 'blob'"):
        task.queries_from_json({**inputs, "subject": ["blob"] * 3})
