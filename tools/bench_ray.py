"""Featurization throughput on Ray: 1 vs 2 workers, and the Ray path's overhead vs one process.

On a local Ray cluster bound to 127.0.0.1 with ``--cpus`` CPU slots (started once,
not timed), each round times, on the same training set and config:

* **single** — ``gradindex.features.run`` in this process (1 torch thread);
* **ray-1** / **ray-2** — ``gradindex.features.distributed.featurize_ray`` with 1 and 2 workers
  (1 CPU slot and 1 torch thread each); the wall time includes starting the actors,
  each loading the task, its model and its data, and the driver's verification and
  manifest — everything a user waits for after the cluster is up. The *shard phase*
  (first shard sent → last shard back, from the manifest's ``ray`` record) is the
  steady-state part that grows with the data; *worker start* is the fixed part.

Every Ray store is checked to equal the single-process store shard for shard
(sha256). Ratios are taken within each round; medians over rounds are printed.
Task: the enlarged digits training set (``tools/enlarged_digits.py``) with the digits
CNN. Hold the bench lock when the numbers are reported::

    flock /tmp/gradindex-bench.lock python tools/bench_ray.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gradindex.config import FeaturizeConfig
from gradindex.features.distributed import featurize_ray, local_ray
from gradindex.features.run import featurize
from gradindex.task import load_task

ENLARGED = Path(__file__).resolve().parent / "enlarged_digits.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40_000, help="training examples")
    parser.add_argument("--arch", default="cnn", help="digits architecture (mlp, cnn)")
    parser.add_argument("--shard-size", type=int, default=2_500, help="examples per shard")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2, help="CPU slots of the local Ray cluster")
    parser.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    scratch = args.out or Path(tempfile.mkdtemp(prefix="bench-ray-"))
    task = load_task(f"{ENLARGED}:EnlargedDigits", {"size": args.size, "arch": args.arch})
    config = FeaturizeConfig(batch_size=args.batch_size, shard_size=args.shard_size)
    task.load_model(None), task.train_dataset()  # train/cache the checkpoint and build the data once, untimed
    shards = -(-args.size // args.shard_size)
    print(f"torch {torch.__version__}, 1 thread per process, local Ray cluster with {args.cpus} CPU slots on "
          f"127.0.0.1; enlarged digits {args.arch}, {args.size:,} examples in {shards} shards of {args.shard_size:,}, "
          f"batch {args.batch_size}, {args.rounds} rounds (medians); {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}")
    times: dict[str, list[float]] = {"single": [], "ray-1": [], "ray-2": []}
    work: dict[str, list[float]] = {"ray-1": [], "ray-2": []}  # first shard sent -> last shard back
    startup: dict[str, list[float]] = {"ray-1": [], "ray-2": []}  # actors created -> model and data loaded
    with local_ray(num_cpus=args.cpus, log_to_driver=False):
        for round_ in range(args.rounds):
            started = time.perf_counter()
            reference = featurize(task, scratch / "single", config, overwrite=True, show_progress=False)
            times["single"].append(time.perf_counter() - started)
            expected = [s["sha256"] for s in reference.manifest["shards"]]
            for workers in (1, 2):
                started = time.perf_counter()
                store = featurize_ray(task, scratch / f"ray-{workers}", config, overwrite=True, workers=workers,
                                      show_progress=False)
                times[f"ray-{workers}"].append(time.perf_counter() - started)
                work[f"ray-{workers}"].append(store.manifest["ray"]["work_seconds"])
                startup[f"ray-{workers}"].append(store.manifest["ray"]["startup_seconds"])
                if [s["sha256"] for s in store.manifest["shards"]] != expected:
                    raise SystemExit(f"ray-{workers}: the store differs from the single-process store")
            print(f"round {round_ + 1}: " + ", ".join(f"{name} {t[-1]:.2f}s" for name, t in times.items()),
                  flush=True)
    if args.out is None:
        shutil.rmtree(scratch, ignore_errors=True)
    print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))

    def median(values: list[float]) -> float:
        return statistics.median(values)

    rate = {name: args.size / median(t) for name, t in times.items()}
    steady = {name: args.size / median(t) for name, t in work.items()}
    scaling = median([one / two for one, two in zip(times["ray-1"], times["ray-2"])])
    steady_scaling = median([one / two for one, two in zip(work["ray-1"], work["ray-2"])])
    overhead = median([ray / single for ray, single in zip(times["ray-1"], times["single"])])
    steady_overhead = median([ray / single for ray, single in zip(work["ray-1"], times["single"])])
    print()
    print("| path   | workers | wall s | ex/s (wall) | worker start s | shard phase s | ex/s (shard phase) |")
    print("|--------|---------|--------|-------------|----------------|---------------|--------------------|")
    for name, workers in (("single", "-"), ("ray-1", "1"), ("ray-2", "2")):
        extra = (f"{median(startup[name]):14.2f} | {median(work[name]):13.2f} | {steady[name]:18,.0f}"
                 if name in work else f"{'-':>14} | {median(times[name]):13.2f} | {rate[name]:18,.0f}")
        print(f"| {name:<6} | {workers:>7} | {median(times[name]):6.2f} | {rate[name]:11,.0f} | {extra} |")
    print()
    print(f"throughput 2 workers / 1 worker: {scaling:.2f}x wall, {steady_scaling:.2f}x shard phase (ideal 2.00x)")
    print(f"Ray path at 1 worker / single process (time): {overhead:.2f}x wall "
          f"({median(times['ray-1']) - median(times['single']):+.2f}s), {steady_overhead:.2f}x shard phase")


if __name__ == "__main__":
    main()
