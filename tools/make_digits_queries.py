"""Write data/digits-queries.npz: held-out digits (pixel values 0..16, as load_digits) and labels.

    python tools/make_digits_queries.py [--count 10] [--out data/digits-queries.npz]
"""

from __future__ import annotations

import argparse

import numpy as np

from gradindex.tasks.digits import load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--out", default="data/digits-queries.npz")
    args = parser.parse_args()
    split = load_split()
    x = np.rint(split["x_test"][: args.count] * 16).astype(np.float32).reshape(-1, 8, 8)
    np.savez(args.out, x=x, y=split["y_test"][: args.count])
    print(f"wrote {args.out}: {len(x)} digits")


if __name__ == "__main__":
    main()
