"""Token heatmaps vs a plain lookup on a GPT-2 built from its config (124M parameters by default, random
weights, no download): the time of ``query -k K`` and of ``query -k K --tokens`` for documents of
``--length`` tokens, in one process on the same warm attributor, and their ratio.

    python tools/bench_token_heatmaps.py --out /tmp/heat [--docs 16] [--length 512] [-k 10] [--layers 12]

The store is featurized once into ``--out`` (``--docs`` random token documents); the query is a
64-token prompt with an 8-token completion. Prints seconds per lookup (best of ``--repeats``) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gradindex.config import FeaturizeConfig, IndexConfig, ProjectionConfig
from gradindex.features.run import featurize
from gradindex.index.build import build_index
from gradindex.integrations.hf import HFCausalLMTask
from gradindex.query.attributor import Attributor
from gradindex.query.tokens import attribute_tokens
from gradindex.store.feature_store import FeatureStore


def prepare(out: Path, docs: int, length: int, layers: int, proj_dim: int) -> Path:
    import transformers

    store = out / "store"
    if (store / "manifest.json").is_file():
        return store
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_positions=max(1024, length))
    transformers.GPT2LMHeadModel(config).save_pretrained(out / "model")
    generator = torch.Generator().manual_seed(1)
    lines = [json.dumps({"input_ids": torch.randint(0, config.vocab_size, (length - 1,), generator=generator).tolist()})
             for _ in range(docs)]
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    task = HFCausalLMTask(model=str(out / "model"), train_file=str(out / "train.jsonl"))
    started = time.perf_counter()
    featurize(task, store, FeaturizeConfig(projection=ProjectionConfig(proj_dim=proj_dim), batch_size=4),
              show_progress=False)
    print(f"featurized {docs} documents of {length} tokens in {time.perf_counter() - started:.1f} s")
    build_index(FeatureStore.open(store, trust_task=True), IndexConfig(kind="flat"), show_progress=False)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--proj-dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    store = prepare(args.out, args.docs, args.length, args.layers, args.proj_dim)
    attributor = Attributor.open(store, trust_task=True, device=args.device)
    queries = attributor.task.queries_from_json([{"prompt_ids": list(range(100, 164)),
                                                  "completion_ids": list(range(200, 208))}])
    params = sum(p.numel() for p in attributor.model.parameters())
    plain, heat = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        attributor.attribute(queries, k=args.k)
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        attribute_tokens(attributor, queries, k=args.k)
        heat.append(time.perf_counter() - started)
    print(f"GPT-2 {params / 1e6:.0f}M parameters, {args.docs} stored documents of {args.length} tokens, "
          f"k = {args.k}, device {args.device}, {torch.get_num_threads()} threads")
    print(f"plain lookup {min(plain):.2f} s; with token heatmaps {min(heat):.2f} s; ratio {min(heat) / min(plain):.1f}")


if __name__ == "__main__":
    main()
