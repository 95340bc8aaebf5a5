"""Digit query sets *unlike* the stored data of tools/enlarged_digits.py (index-recall checks).

The enlarged store holds held-in digits under mild jitter (±15°, scale 0.85–1.15, contrast
0.7–1.3, noise σ 0.05) measured at their own label. Each set below leaves that distribution
in another way, so its query gradients ∇m(q) point where few stored gradients do:

* ``clean``     held-out digits, no jitter and no noise (the store has no noise-free image);
* ``warped``    held-out digits rotated 25–50°, scaled 0.6–0.75 or 1.3–1.6, sheared ±0.4
                (all outside the store's jitter ranges);
* ``inverted``  1 − x: white digits on a black background inverted (no stored image is);
* ``blend``     the mean of two held-out digits of different classes, labelled as the first;
* ``noise``     uniform random pixels, measured at the model's own prediction (label −1);
* ``wrong``     held-out digits measured at a wrong label (the margin of another class);
* ``occluded``  held-out digits with a random 4×4 quarter or a half blanked out;
* ``noisy``     held-out digits plus Gaussian pixel noise σ 0.25 (the store's is σ 0.05), no jitter:
                real digits pushed off the stored distribution by noise alone (the set issue 22
                measured on; not part of ``mixed``, and unlike every calibration family).

``mixed`` takes an equal share of every set but ``noisy``. Writes ``OUT/<set>.npz`` (``x`` ``[n, 8, 8]``
in 0..16 as sklearn's load_digits, ``y`` labels, −1 = the model's prediction) for
``gradindex query/eval recall --inputs``::

    python tools/unlike_digits.py --out /tmp/unlike --count 300 [--seed 7]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gradindex.tasks.digits import load_split

SETS = ("clean", "warped", "inverted", "blend", "noise", "wrong", "occluded")
EXTRA = ("noisy",)
NOISY_SIGMA = 0.25


def _affine(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    n = len(x)
    angle = rng.choice([-1, 1], n) * rng.uniform(np.pi * 25 / 180, np.pi * 50 / 180, n)
    scale = np.where(rng.random(n) < 0.5, rng.uniform(0.6, 0.75, n), rng.uniform(1.3, 1.6, n))
    shear = rng.uniform(-0.4, 0.4, n)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    theta = np.zeros((n, 2, 3), np.float32)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin + shear
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    images = torch.from_numpy(np.ascontiguousarray(x, np.float32)).reshape(-1, 1, 8, 8)
    grid = F.affine_grid(torch.from_numpy(theta), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(n, 64).numpy()


def make_set(name: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x [count, 64] in [0, 1], y [count])`` of one set (see the module docstring)."""
    split = load_split()
    xs, ys = split["x_test"], split["y_test"]
    position = (SETS + EXTRA).index(name) if name in SETS + EXTRA else len(SETS)
    rng = np.random.default_rng([seed, position if name not in EXTRA else position + 1])
    pick = rng.integers(0, len(xs), count)
    x, y = xs[pick].copy(), ys[pick].copy()
    if name == "warped":
        x = _affine(x, rng)
    elif name == "inverted":
        x = 1.0 - x
    elif name == "blend":
        other = rng.integers(0, len(xs), count)
        for i in np.flatnonzero(ys[other] == y):
            candidates = np.flatnonzero(ys != y[i])
            other[i] = candidates[rng.integers(len(candidates))]
        x = 0.5 * (x + xs[other])
    elif name == "noise":
        x, y = rng.random((count, 64)).astype(np.float32), np.full(count, -1)
    elif name == "wrong":
        y = (y + rng.integers(1, 10, count)) % 10
    elif name == "occluded":
        images = x.reshape(count, 8, 8)
        for i in range(count):
            r, c = rng.integers(0, 2, 2) * 4
            if rng.random() < 0.5:
                images[i, r:r + 4, c:c + 4] = 0  # a quarter
            elif rng.random() < 0.5:
                images[i, r:r + 4] = 0  # the top or bottom half
            else:
                images[i, :, c:c + 4] = 0  # the left or right half
        x = images.reshape(count, 64)
    elif name == "noisy":
        x = x + rng.normal(0.0, NOISY_SIGMA, x.shape).astype(np.float32)
    elif name == "mixed":
        parts = [make_set(s, count // len(SETS) + (i < count % len(SETS)), seed) for i, s in enumerate(SETS)]
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    elif name != "clean":
        raise ValueError(f"unknown query set {name!r}: expected one of {SETS + EXTRA + ('mixed',)}")
    return np.clip(x, 0.0, 1.0).astype(np.float32), y.astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--sets", default=",".join(SETS + EXTRA + ("mixed",)))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.sets.split(","):
        x, y = make_set(name, args.count, args.seed)
        np.savez(args.out / f"{name}.npz", x=(x * 16).reshape(-1, 8, 8), y=y)
        print(f"wrote {args.out / name}.npz: {len(x)} queries")


if __name__ == "__main__":
    main()
