"""Train built-in tasks on all and on half of their training data and report time and quality.

Per task: seconds to train on every training example and on a random half (what one LDS
model costs), on one torch thread — wall time and the process's CPU time (on a shared
machine the CPU time is the better guide to the time on an idle core) — and the quality of both models on the training set and
the default (held-out) queries: accuracy for classifiers, R² for the regression, per-token
perplexity of the scored tokens for language models. One untimed training on 8 examples
first takes the process's first-call overheads out of the times. Models go to a temporary
folder (the cached default checkpoints are not touched).

    OMP_NUM_THREADS=1 python tools/task_stats.py resnet lm-deep tabular-cancer tabular-wine tabular-diabetes
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gradindex.eval.lds import measure
from gradindex.task import load_task, make_batch
from gradindex.tasks.causal_lm import CausalLMTask, token_log_probs


def quality(task, model, dataset) -> str:
    """Accuracy, R² or perplexity of ``model`` on ``dataset``."""
    if isinstance(task, CausalLMTask):
        total = count = 0.0
        with torch.no_grad():
            for start in range(0, len(dataset), 256):
                batch = make_batch(task, dataset, range(start, min(len(dataset), start + 256)))
                picked, mask = token_log_probs(task.logits(model, batch), batch)
                total -= float((picked * mask).sum())
                count += float(mask.sum())
        return f"perplexity {np.exp(total / count):.1f}"
    x, y = dataset.tensors
    with torch.no_grad():
        out = model(x)
    if getattr(task, "regression", False):
        return f"R² {1 - float(((out[:, 0] - y) ** 2).mean() / y.var(unbiased=False)):.3f}"
    return f"accuracy {float((out.argmax(1) == y).float().mean()):.3f}, margin {measure(task, model, dataset).mean():.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tasks", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| task | training examples | train (all) | train (half) | all: train set | all: queries | half: train set | half: queries |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.tasks:
            task = load_task(name)
            count = len(task.train_dataset())
            half = np.sort(np.random.default_rng(0).permutation(count)[: count // 2])
            task.train(Path(folder) / "warm-up.pt", range(8), 0)  # untimed: first-call overheads of the process
            cells = []
            models = []
            for label, indices, seed in (("all", None, 0), ("half", half, 1)):
                started, cpu = time.perf_counter(), time.process_time()
                checkpoint = task.train(Path(folder) / f"{name}-{label}.pt", indices, seed)
                cells.append(f"{time.perf_counter() - started:.1f} s (CPU {time.process_time() - cpu:.1f} s)")
                models.append(task.load_model(checkpoint))
            for model in models:
                cells += [quality(task, model, task.train_dataset()), quality(task, model, task.query_dataset())]
            print(f"| {name} | {count} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
