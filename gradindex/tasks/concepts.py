"""Synthetic concept images: subject × style × background, seeded (the ``diffusion`` task's data).

In: a :class:`ConceptConfig` (``data/concepts.json``). Out: :class:`ConceptImages` —
``images [n, H, W, 3]`` uint8, ``labels [n, 3]`` int64 (subject, style, background
indices into the config's value lists), ``centers [n, 2]`` and ``radii [n]`` (the
jitter), so every image is fully determined by its factors plus its jitter.

* **subject**: a shape mask (circle, square, triangle, star, cross, diamond) in unit
  coordinates ``(u, v) = ((x − cx) / r, (y − cy) / r)`` at pixel centres; centre and
  radius are jittered per image.
* **style**: how the shape is painted (palette and pattern: solid, 1-px stripes,
  2×2 checker, dots, left-to-right gradient).
* **background**: how everything else is painted (solid, top-to-bottom gradient, noise).

Splits: ``train`` draws (subject, style) uniformly among the combinations that are
*not* withheld and the background uniformly; ``withheld`` draws only the withheld
subject × style combinations (what the model never saw together). Images come in
chunks of :data:`CHUNK` with seeds derived from ``(seed, split, chunk)``, so the
first ``n`` images do not depend on how many are generated (``N`` up to 10⁵⁺ in
bounded memory per chunk).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import ArtifactNotFoundError, ConfigError

FACTORS = ("subject", "style", "background")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
STYLE_PATTERNS = ("solid", "stripes", "checker", "dots", "gradient")
BACKGROUND_PATTERNS = ("solid", "gradient", "noise", "stripes", "checker", "dots")
SPLITS = ("train", "withheld")
CHUNK = 4096

_TRIANGLE = np.array([[0.0, -1.0], [0.866, 0.5], [-0.866, 0.5]])
_STAR_ANGLES = np.arange(10) * np.pi / 5
_STAR_RADII = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
_STAR = np.column_stack([_STAR_RADII * np.sin(_STAR_ANGLES), -_STAR_RADII * np.cos(_STAR_ANGLES)])


@dataclass(frozen=True)
class Paint:
    """A palette and a pattern: ``colors`` are RGB triples 0..255 (``amplitude``: noise ±)."""

    name: str
    pattern: str
    colors: tuple[tuple[int, int, int], ...]
    amplitude: int = 0

    def check(self, patterns: tuple[str, ...], what: str) -> None:
        if self.pattern not in patterns:
            raise ConfigError(f"{what} {self.name!r}: pattern must be one of {', '.join(patterns)}, got {self.pattern!r}")
        needed = 1 if self.pattern in ("solid", "noise") else 2
        if len(self.colors) < needed:
            raise ConfigError(f"{what} {self.name!r}: pattern {self.pattern!r} needs {needed} colors, got {len(self.colors)}")
        for color in self.colors:
            if len(color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in color):
                raise ConfigError(f"{what} {self.name!r}: colors must be [r, g, b] integers 0..255, got {list(color)}")


@dataclass(frozen=True)
class ConceptConfig:
    """What :func:`generate` draws from; read from JSON with :meth:`load`."""

    image_size: int
    subjects: tuple[str, ...]
    styles: tuple[Paint, ...]
    backgrounds: tuple[Paint, ...]
    radius: tuple[float, float]
    jitter: float
    withheld: tuple[tuple[str, str], ...]
    num_train: int
    seed: int

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or not 8 <= self.image_size <= 128:
            raise ConfigError(f"concepts image_size: expected an integer in 8..128, got {self.image_size!r}")
        for name in self.subjects:
            if name not in SHAPES:
                raise ConfigError(f"concepts subjects: {name!r} is not a known shape ({', '.join(SHAPES)})")
        for factor in FACTORS:
            names = self.values(factor)
            if len(names) < 2 or len(set(names)) != len(names):
                raise ConfigError(f"concepts {factor}: expected at least two distinct values, got {list(names)}")
        for paint in self.styles:
            paint.check(STYLE_PATTERNS, "style")
        for paint in self.backgrounds:
            paint.check(BACKGROUND_PATTERNS, "background")
        low, high = self.radius
        if not 1.0 <= low <= high <= self.image_size / 2:
            raise ConfigError(f"concepts radius: expected 1 <= min <= max <= image_size/2, got {list(self.radius)}")
        if not 0 <= self.jitter <= self.image_size / 2:
            raise ConfigError(f"concepts jitter: expected 0..image_size/2 pixels, got {self.jitter!r}")
        for subject, style in self.withheld:
            if subject not in self.subjects or style not in self.values("style"):
                raise ConfigError(f"concepts withheld: ({subject!r}, {style!r}) is not a subject × style pair")
        if not self.train_combos():
            raise ConfigError("concepts withheld: every subject × style combination is withheld")
        if isinstance(self.num_train, bool) or not isinstance(self.num_train, int) or self.num_train < 1:
            raise ConfigError(f"concepts num_train: expected a positive integer, got {self.num_train!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"concepts seed: expected a non-negative integer, got {self.seed!r}")

    # -- reading ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ConceptConfig":
        try:
            return cls(
                image_size=data["image_size"],
                subjects=tuple(data["subjects"]),
                styles=tuple(_paint(name, spec) for name, spec in data["styles"].items()),
                backgrounds=tuple(_paint(name, spec) for name, spec in data["backgrounds"].items()),
                radius=tuple(float(r) for r in data["radius"]),
                jitter=float(data["jitter"]),
                withheld=tuple((str(a), str(b)) for a, b in data.get("withheld", ())),
                num_train=data["num_train"],
                seed=data["seed"],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"concepts config: malformed ({type(err).__name__}: {err})") from None

    @classmethod
    def load(cls, path: str | Path) -> "ConceptConfig":
        path = Path(path)
        if not path.is_file():
            raise ArtifactNotFoundError(f"no concepts config at {path}")
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        def paints(items: tuple[Paint, ...]) -> dict[str, Any]:
            return {p.name: {"pattern": p.pattern, "colors": [list(c) for c in p.colors], "amplitude": p.amplitude}
                    for p in items}

        return {"image_size": self.image_size, "subjects": list(self.subjects), "styles": paints(self.styles),
                "backgrounds": paints(self.backgrounds), "radius": list(self.radius), "jitter": self.jitter,
                "withheld": [list(pair) for pair in self.withheld], "num_train": self.num_train, "seed": self.seed}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    # -- factor values ------------------------------------------------------------------------------
    def values(self, factor: str) -> tuple[str, ...]:
        """The value names of ``factor`` in label order."""
        if factor == "subject":
            return self.subjects
        if factor == "style":
            return tuple(p.name for p in self.styles)
        if factor == "background":
            return tuple(p.name for p in self.backgrounds)
        raise ConfigError(f"unknown factor {factor!r}; the factors are {', '.join(FACTORS)}")

    def index(self, factor: str, name: str) -> int:
        names = self.values(factor)
        if name not in names:
            raise ConfigError(f"{factor} {name!r}: expected one of {', '.join(names)}")
        return names.index(name)

    def train_combos(self) -> list[tuple[int, int]]:
        """(subject, style) index pairs that appear in training."""
        held = {(self.index("subject", a), self.index("style", b)) for a, b in self.withheld}
        return [(s, t) for s in range(len(self.subjects)) for t in range(len(self.styles)) if (s, t) not in held]

    def withheld_combos(self) -> list[tuple[int, int]]:
        return [(self.index("subject", a), self.index("style", b)) for a, b in self.withheld]


def _paint(name: str, spec: dict[str, Any]) -> Paint:
    return Paint(name, spec["pattern"], tuple(tuple(int(c) for c in color) for color in spec["colors"]),
                 int(spec.get("amplitude", 0)))


@dataclass(frozen=True)
class ConceptImages:
    """Generated images with their factors and jitter (see the module docstring)."""

    config: ConceptConfig
    images: np.ndarray  # [n, H, W, 3] uint8
    labels: np.ndarray  # [n, 3] int64: subject, style, background
    centers: np.ndarray  # [n, 2] float32: (cx, cy) in pixels
    radii: np.ndarray  # [n] float32

    def __len__(self) -> int:
        return len(self.labels)

    def names(self, factor: str) -> np.ndarray:
        """The value names of ``factor`` for every image ``[n]`` (str)."""
        values = np.array(self.config.values(factor))
        return values[self.labels[:, FACTORS.index(factor)]]

    def caption(self, i: int) -> str:
        return " ".join(self.config.values(f)[self.labels[i, j]] for j, f in enumerate(FACTORS))


# -- generation ------------------------------------------------------------------------------------
def generate(config: ConceptConfig, n: int | None = None, split: str = "train", seed: int | None = None) -> ConceptImages:
    """``n`` images (default ``config.num_train``) of ``split`` from ``seed`` (default ``config.seed``)."""
    if split not in SPLITS:
        raise ConfigError(f"concepts split: expected one of {', '.join(SPLITS)}, got {split!r}")
    n = config.num_train if n is None else n
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"concepts: expected a non-negative number of images, got {n!r}")
    seed = config.seed if seed is None else seed
    combos = np.array(config.train_combos() if split == "train" else config.withheld_combos(), dtype=np.int64)
    if len(combos) == 0:
        raise ConfigError(f"concepts split {split!r}: no subject × style combinations to draw from")
    parts = []
    size = config.image_size
    for chunk, start in enumerate(range(0, n, CHUNK)):
        # every draw is CHUNK-sized, then cut: the first images do not depend on n
        rng = np.random.default_rng([seed, SPLITS.index(split), chunk])
        count = min(CHUNK, n - start)
        pairs = combos[rng.integers(0, len(combos), size=CHUNK)][:count]
        background = rng.integers(0, len(config.backgrounds), size=CHUNK)[:count]
        radii = rng.uniform(*config.radius, size=CHUNK)[:count]
        centers = size / 2 + rng.uniform(-config.jitter, config.jitter, size=(CHUNK, 2))[:count]
        noise = rng.random(size=(CHUNK, size, size, 3))[:count]
        labels = np.column_stack([pairs, background])
        images = render(config, labels, centers, radii, noise)
        parts.append((images, labels, centers.astype(np.float32), radii.astype(np.float32)))
    if not parts:
        return ConceptImages(config, np.zeros((0, size, size, 3), np.uint8), np.zeros((0, 3), np.int64),
                             np.zeros((0, 2), np.float32), np.zeros(0, np.float32))
    images, labels, centers, radii = (np.concatenate(p) for p in zip(*parts))
    return ConceptImages(config, images, labels.astype(np.int64), centers, radii)


def render(config: ConceptConfig, labels: np.ndarray, centers: np.ndarray, radii: np.ndarray,
           noise: np.ndarray) -> np.ndarray:
    """Paint ``[n, H, W, 3]`` uint8 images from labels ``[n, 3]``, centers ``[n, 2]``, radii ``[n]`` and
    uniform ``noise [n, H, W, 3]`` in [0, 1) (used by noise patterns)."""
    n, size = len(labels), config.image_size
    ys, xs = np.mgrid[0:size, 0:size]
    u = (xs[None] + 0.5 - centers[:, 0, None, None]) / radii[:, None, None]
    v = (ys[None] + 0.5 - centers[:, 1, None, None]) / radii[:, None, None]
    mask = np.zeros((n, size, size), dtype=bool)
    for s, shape in enumerate(config.subjects):
        rows = labels[:, 0] == s
        mask[rows] = shape_mask(shape, u[rows], v[rows])
    background = np.zeros((n, size, size, 3))
    subject = np.zeros((n, size, size, 3))
    for b, paint in enumerate(config.backgrounds):
        rows = labels[:, 2] == b
        ramp = np.broadcast_to(ys[None] / max(1, size - 1), (int(rows.sum()), size, size))
        background[rows] = _paint_pixels(paint, xs, ys, ramp, noise[rows])
    for t, paint in enumerate(config.styles):
        rows = labels[:, 1] == t
        ramp = np.clip((u[rows] + 1) / 2, 0, 1)
        subject[rows] = _paint_pixels(paint, xs, ys, ramp, noise[rows])
    image = np.where(mask[..., None], subject, background)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether unit coordinates ``(u, v)`` (``v`` pointing down) lie inside ``shape``."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
    if shape == "triangle":
        return _inside_polygon(_TRIANGLE, u, v)
    if shape == "star":
        return _inside_polygon(_STAR, u, v)
    raise ConfigError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def _inside_polygon(vertices: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Even-odd ray casting of points ``(u, v)`` against a closed polygon ``[m, 2]``."""
    inside = np.zeros(np.shape(u), dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _paint_pixels(paint: Paint, xs: np.ndarray, ys: np.ndarray, ramp: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """RGB floats ``[m, H, W, 3]`` of ``paint`` at every pixel; ``ramp [m, H, W]`` in 0..1 drives gradients."""
    colors = np.asarray(paint.colors, dtype=np.float64)
    m = ramp.shape[0]
    shape = (m, *xs.shape)
    if paint.pattern == "solid":
        return np.broadcast_to(colors[0], (*shape, 3)).copy()
    if paint.pattern == "noise":
        return colors[0] + np.floor(noise * (2 * paint.amplitude + 1)) - paint.amplitude
    if paint.pattern == "gradient":
        return colors[0] + ramp[..., None] * (colors[1] - colors[0])
    if paint.pattern == "stripes":
        which = ys % 2
    elif paint.pattern == "checker":
        which = (xs // 2 + ys // 2) % 2
    elif paint.pattern == "dots":
        which = ((xs % 3 != 1) | (ys % 3 != 1)).astype(int)
    else:
        raise ConfigError(f"paint {paint.name!r}: unknown pattern {paint.pattern!r}")
    return np.broadcast_to(colors[which], (*shape, 3)).copy()
