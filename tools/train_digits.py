"""Train a digits checkpoint deterministically (seconds on a CPU).

    python tools/train_digits.py --arch mlp --out runs/digits-mlp.pt [--seed 0]
"""

from __future__ import annotations

import argparse

from gradindex.tasks.digits import ARCHS, DigitsTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHS, default="mlp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="checkpoint path to write")
    args = parser.parse_args()
    path = DigitsTask(arch=args.arch, seed=args.seed).train(args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
