"""GradindexCallback's overhead: the wall time of a ``transformers.Trainer`` run with and without it, same
model, data, batch size and seed, in one process; prints both and their ratio.

The callback featurizes the whole training set at each event (one extra forward and backward per
example, plus projection), so its overhead is about ``events × (featurize pass / training epoch)``:
``every="epoch"`` roughly doubles an epoch of plain training; fewer events cost proportionally less.

    python tools/bench_callback.py --out /tmp/cb [--examples 256] [--epochs 2] [--every epoch|N|save]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch


def main() -> None:
    import datasets
    import transformers

    from gradindex.integrations.hf import GradindexCallback

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--every", default="epoch")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--proj-dim", type=int, default=256)
    args = parser.parse_args()
    every = int(args.every) if args.every.isdigit() else args.every
    generator = torch.Generator().manual_seed(0)
    table = datasets.Dataset.from_dict(
        {"input_ids": torch.randint(0, 512, (args.examples, args.length), generator=generator).tolist()})

    def collate(rows):
        ids = torch.tensor([row["input_ids"] for row in rows])
        return {"input_ids": ids, "labels": ids}

    def run(callbacks) -> float:
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=512, n_positions=args.length, n_embd=args.width, n_layer=args.layers, n_head=4))
        training = transformers.TrainingArguments(
            output_dir=str(args.out / "trainer"), per_device_train_batch_size=16, num_train_epochs=args.epochs,
            save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
        trainer = transformers.Trainer(model=model, args=training, train_dataset=table, data_collator=collate,
                                       callbacks=callbacks)
        started = time.perf_counter()
        trainer.train()
        return time.perf_counter() - started

    shutil.rmtree(args.out / "gi", ignore_errors=True)
    plain = run([])
    with_callback = run([GradindexCallback(args.out / "gi", every=every, proj_dim=args.proj_dim, batch_size=16)])
    print(f"GPT-2 {args.layers} layers x {args.width}, {args.examples} examples of {args.length} tokens, "
          f"{args.epochs} epochs, batch 16, every={every}, {torch.get_num_threads()} threads")
    print(f"plain Trainer {plain:.1f} s; with GradindexCallback {with_callback:.1f} s; "
          f"ratio {with_callback / plain:.2f}")


if __name__ == "__main__":
    main()
