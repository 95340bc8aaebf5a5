"""The synthetic concept generator: deterministic, labels that match the pixels, withheld combinations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath

from gradindex.errors import ConfigError
from gradindex.tasks.concepts import ConceptConfig, generate

CONFIG = Path(__file__).parents[1] / "data" / "concepts.json"


@pytest.fixture(scope="module")
def config() -> ConceptConfig:
    return ConceptConfig.load(CONFIG)


def _reference_outline(shape: str) -> np.ndarray:
    """Independent outlines in unit coordinates (v down), drawn as polygons for matplotlib."""
    angles = np.linspace(0, 2 * np.pi, 97)[:-1]
    if shape == "circle":
        return np.column_stack([np.cos(angles), np.sin(angles)])
    if shape == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if shape == "triangle":
        return np.array([[0, -1], [np.sqrt(3) / 2, 0.5], [-np.sqrt(3) / 2, 0.5]])
    if shape == "star":
        radius = np.where(np.arange(10) % 2, 0.45, 1.0)
        a = np.arange(10) * np.pi / 5
        return np.column_stack([radius * np.sin(a), -radius * np.cos(a)])
    if shape == "cross":
        w = 0.32
        return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w], [-1, w],
                         [-1, -w], [-w, -w]])
    raise AssertionError(shape)


def _reference_mask(shape: str, center: np.ndarray, radius: float, size: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size]
    points = np.column_stack([(xs.ravel() + 0.5 - center[0]) / radius, (ys.ravel() + 0.5 - center[1]) / radius])
    return PolygonPath(_reference_outline(shape)).contains_points(points).reshape(size, size)


def test_generator_is_deterministic_and_prefix_stable(config):
    a, b = generate(config, 50), generate(config, 50)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    longer = generate(config, 5000)  # crosses a chunk boundary
    np.testing.assert_array_equal(longer.images[:50], a.images)
    assert not np.array_equal(generate(config, 50, seed=1).images, a.images)
    assert a.images.shape == (50, 16, 16, 3) and a.images.dtype == np.uint8


def test_labels_match_the_pixels(config):
    data = generate(config, 400)
    size = config.image_size
    solid = {i: np.array(p.colors[0]) for i, p in enumerate(config.backgrounds) if p.pattern == "solid"}
    checked = 0
    for i in range(len(data)):
        subject, style, background = data.labels[i]
        if background not in solid:
            continue
        drawn = (data.images[i] != solid[background]).any(-1)  # pixels not painted with the background
        ious = {}
        for s, shape in enumerate(config.subjects):
            ref = _reference_mask(shape, data.centers[i], float(data.radii[i]), size)
            ious[s] = (drawn & ref).sum() / max(1, (drawn | ref).sum())
        assert max(ious, key=ious.get) == subject, (i, data.caption(i), ious)
        assert ious[subject] >= 0.85, (i, data.caption(i), ious[subject])
        paint = config.styles[style]
        if paint.pattern != "gradient":  # the shape is painted only with the style's palette
            colors = {tuple(c) for c in data.images[i][drawn]}
            assert colors <= {tuple(c) for c in paint.colors}, (data.caption(i), colors)
        checked += 1
    assert checked > 100


def test_withheld_combinations_never_in_training(config):
    train = generate(config, 3000)
    pairs = {tuple(p) for p in train.labels[:, :2].tolist()}
    withheld = set(config.withheld_combos())
    assert withheld and not pairs & withheld
    assert pairs == set(config.train_combos())
    held = generate(config, 200, split="withheld")
    assert {tuple(p) for p in held.labels[:, :2].tolist()} == withheld
    for j in range(3):  # every value of every factor occurs in training
        assert len(np.unique(train.labels[:, j])) == len(config.values(("subject", "style", "background")[j]))


def test_bad_configs_are_refused(tmp_path, config):
    data = json.loads(CONFIG.read_text())
    for change, match in [({"subjects": ["circle", "blob"]}, "not a known shape"),
                          ({"withheld": [["circle", "plaid"]]}, "withheld"),
                          ({"radius": [5, 20]}, "radius"),
                          ({"num_train": 0}, "num_train")]:
        path = tmp_path / "c.json"
        path.write_text(json.dumps({**data, **change}))
        with pytest.raises(ConfigError, match=match):
            ConceptConfig.load(path)
    with pytest.raises(ConfigError, match="split"):
        generate(config, 3, split="test")
