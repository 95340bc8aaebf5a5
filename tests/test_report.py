"""PNG reports: the files exist, are PNGs, and have the layout's pixel size."""

from __future__ import annotations

import numpy as np
from matplotlib.image import imread

from gradindex.eval.report import PANEL_HEIGHT, PANEL_WIDTH, write_concept_grid, write_topk_grid

DPI = 110


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((16, 16, 3))


def _size(path) -> tuple[int, int]:
    pixels = imread(path)
    return pixels.shape[0], pixels.shape[1]


def test_topk_grid_has_one_row_per_query(tmp_path):
    rows = [(_image(q), f"query {q}", [(_image(10 * q + i), f"hit {i}") for i in range(4)]) for q in range(3)]
    path = write_topk_grid(tmp_path / "topk.png", rows)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _size(path) == (round(3 * PANEL_HEIGHT * DPI), round(5 * PANEL_WIDTH * DPI))


def test_concept_grid_has_one_row_per_query_and_concept(tmp_path):
    concepts = ("subject", "style", "background")
    rows = [(_image(q), f"circle stripes sky {q}",
             {c: [(_image(100 * q + i), f"hit {i}", i % 2 == 0) for i in range(5)] for c in concepts})
            for q in range(2)]
    path = write_concept_grid(tmp_path / "sub" / "concepts.png", rows, title="t")
    assert _size(path) == (round(2 * 3 * PANEL_HEIGHT * DPI), round(6 * PANEL_WIDTH * DPI))
    assert not list(path.parent.glob(".*tmp*"))  # written under a temporary name, then renamed
    fewer = write_concept_grid(tmp_path / "two.png", [(rows[0][0], "q", {"subject": rows[0][2]["subject"][:2]})])
    assert _size(fewer) == (round(PANEL_HEIGHT * DPI), round(3 * PANEL_WIDTH * DPI))
