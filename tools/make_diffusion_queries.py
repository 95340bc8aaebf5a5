"""Write a diffusion query file: generations of held-out subject × style combinations, of random
prompts, or of prompts that name only one concept.

    python tools/make_diffusion_queries.py --out runs/heldout.npz [--task diffusion|diffusion-text|diffusion-text-lora]
        [--heldout | --only CONCEPT] [--count 40] [--seed 0] [--checkpoint PATH]

``--heldout``: every withheld combination × every background, cycled to --count (default
one each); ``--only subject``: --count prompts (default 120) that specify only the subject
(the queries ``learn-weights --concept subject`` learns from by default); otherwise --count
random prompts. The file (images + subject/style/background prompts, and the prompt
template for the text tasks) is what `gradindex query|eval precision|learn-weights --inputs` read.
"""

from __future__ import annotations

import argparse

from gradindex.task import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", default="diffusion", choices=("diffusion", "diffusion-text", "diffusion-text-lora"))
    parser.add_argument("--heldout", action="store_true")
    parser.add_argument("--only", default=None, help="a concept: prompts that specify only it")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="default: the task's default checkpoint")
    args = parser.parse_args()
    task = load_task(args.task)
    model = task.load_model(args.checkpoint)
    if args.heldout:
        prompts = task.heldout_prompts(args.count)
    elif args.only:
        prompts = task.concept_prompts(args.only, args.count or 120, args.seed)
    else:
        prompts = task.random_prompts(args.count or 120, args.seed)
    path = task.save_queries(args.out, task.generate(model, prompts, seed=args.seed))
    print(f"wrote {path}: {len(prompts)} generations")


if __name__ == "__main__":
    main()
