"""Write a diffusion query file: generations of held-out subject × style combinations or of random prompts.

    python tools/make_diffusion_queries.py --out runs/heldout.npz [--heldout] [--count 40] [--seed 0]
        [--checkpoint PATH]

``--heldout``: every withheld combination × every background, cycled to --count (default
one each); otherwise --count random prompts. The file (images + subject/style/background
prompts) is what `gradindex query|eval precision|learn-weights --inputs` read.
"""

from __future__ import annotations

import argparse

from gradindex.task import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--heldout", action="store_true")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="default: the task's default checkpoint")
    args = parser.parse_args()
    task = load_task("diffusion")
    model = task.load_model(args.checkpoint)
    prompts = task.heldout_prompts(args.count) if args.heldout else task.random_prompts(args.count or 120, args.seed)
    path = task.save_queries(args.out, task.generate(model, prompts, seed=args.seed))
    print(f"wrote {path}: {len(prompts)} generations")


if __name__ == "__main__":
    main()
