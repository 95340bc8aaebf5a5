"""Featurization throughput on CPU: gradindex against a naive loop, traker and a training step.

For each model, on the digits training data, at one total projected dimension
(the sum of gradindex's per-group dims, given to every method):

* ``gradindex``    — ``gradindex.features.run.featurize_rows`` with a ``GradientProjector``
                     (batch collation and the copy to numpy included);
* ``train step``   — one plain training step per batch: forward + backward of the mean
                     loss, gradients set to None first, **no optimizer step**;
* ``naive``        — one forward + ``autograd.grad`` per example, the full gradient
                     flattened, then one GEMM of the batch's ``[B, D]`` rows with a dense
                     Gaussian ``[D, k]`` matrix held in memory (generated once, not timed;
                     the same matrix as ``traker-cached``'s, so only one copy is in memory);
* ``traker``       — ``trak.TRAKer(..., device='cpu').featurize`` (float32; its CPU path:
                     ``BasicProjector``, Gaussian, which regenerates its matrix in blocks of
                     100 columns on every call) — only ``featurize`` is timed;
* ``traker-cached`` — the same with a ``BasicProjector`` whose one block is the whole
                     ``[D, k]`` matrix, generated once (traker's fastest CPU configuration).

Every method gets the same batches (gradindex its dataset rows, since collating them
is part of ``featurize_rows``), one warm-up call, then ``--repeats`` rounds that run
every method once; ratios are taken inside a round and the tables show medians over
rounds. The machine this runs on is shared, so by default every method runs on one
thread and is timed by the process's CPU time (``--clock cpu``; other processes do not
inflate it, and on an idle machine it equals wall time), and glibc's malloc thresholds
are pinned (see :func:`pin_malloc_thresholds`). A sanity check (not timed) compares
the inner-product structure of gradindex's features with the naive dense projection
and with exact full-gradient inner products on one batch; it fails the run (exit 1)
if gradindex's pairwise scores correlate below 0.9 with the exact ones.

Run the timed benchmark alone on the machine::

    flock /tmp/gradindex-bench.lock python tools/bench_featurize.py          # a few minutes
    flock /tmp/gradindex-bench.lock python tools/bench_featurize.py --quick  # smoke run
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gradindex.config import FeaturizeConfig, ProjectionConfig
from gradindex.features.run import featurize_rows, resolve_groups
from gradindex.features.gradients import GradientProjector
from gradindex.task import load_task, make_batch
from gradindex.tasks.digits import fit

MODELS = ("digits-mlp", "wide-mlp", "digits-cnn")
METHODS = ("train step", "gradindex", "naive", "traker", "traker-cached")
SLOW_METHODS = ("naive", "traker", "traker-cached")
#: the sanity check fails below this correlation of pairwise gradindex and exact scores
MIN_CORRELATION = 0.9


@dataclass
class Case:
    """One model on the digits data, with everything its methods need."""

    name: str
    model: nn.Module
    task: object
    total_dim: int = 0
    params: int = 0
    seconds: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    examples: dict[str, int] = field(default_factory=dict)
    correlation: dict[str, float] = field(default_factory=dict)
    checked: int = 0  # examples in the sanity check


def wide_mlp(seed: int = 0) -> nn.Module:
    """A 64-1024-1024-10 ReLU MLP (1.13M parameters)."""
    torch.manual_seed(seed)
    layers = [("fc1", nn.Linear(64, 1024)), ("relu1", nn.ReLU()), ("fc2", nn.Linear(1024, 1024)),
              ("relu2", nn.ReLU()), ("fc3", nn.Linear(1024, 10))]
    return nn.Sequential(OrderedDict(layers))


def make_case(name: str) -> Case:
    if name == "digits-mlp":
        task = load_task("digits")
        return Case(name, task.load_model(None), task)
    if name == "digits-cnn":
        task = load_task("digits-cnn")
        return Case(name, task.load_model(None), task)
    if name == "wide-mlp":
        task = load_task("digits")  # data and per-example loss; the model is ours
        return Case(name, fit(wide_mlp(), task.split["x_train"], task.split["y_train"], epochs=3, lr=1e-3), task)
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


# -- the methods -------------------------------------------------------------------------------------
def flat_gradient(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return torch.cat([g.reshape(-1) for g in grads])


def naive_features(model: nn.Module, task, batch, matrix: torch.Tensor, scale: float, keep_full: bool = False):
    """One backward per example, full gradient flattened, times a dense ``[D, k]`` matrix (and ``scale``)."""
    x, y = batch
    full = torch.stack([flat_gradient(model, task.compute_train_loss((x[i : i + 1], y[i : i + 1]), model)[0])
                        for i in range(len(x))])
    features = (full @ matrix) * scale
    return (features, full) if keep_full else features


def train_step(model: nn.Module, task, batch) -> None:
    model.zero_grad(set_to_none=True)
    task.compute_train_loss(batch, model).mean().backward()


def make_traker(model: nn.Module, proj_dim: int, capacity: int, save_dir: str, projector=None):
    """A float32 CPU TRAKer with ``model`` loaded as checkpoint 0 (its own BasicProjector unless given)."""
    from trak import TRAKer

    traker = TRAKer(model=model, task="image_classification", train_set_size=capacity, save_dir=save_dir,
                    device="cpu", proj_dim=proj_dim, projector=projector, use_half_precision=False,
                    logging_level=logging.WARNING)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    return traker


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def timed(function: Callable[[], object], clock: Callable[[], float]) -> float:
    start = clock()
    function()
    return clock() - start


# -- one model -----------------------------------------------------------------------------------------
def run_case(case: Case, args: argparse.Namespace) -> None:
    task, model = case.task, case.model
    dataset = task.train_dataset()
    projection = ProjectionConfig(proj_dim=args.proj_dim, factor_dim=args.factor_dim, seed=0)
    config = FeaturizeConfig(projection=projection, batch_size=args.batch_size)
    groups = resolve_groups(task, model, config)
    case.params = sum(p.numel() for p in model.parameters())
    fast_rows = list(range(min(args.examples, len(dataset))))
    slow_rows = fast_rows[: args.slow_examples]
    fast_batches, slow_batches = ([make_batch(task, dataset, rows[i : i + args.batch_size])
                                   for i in range(0, len(rows), args.batch_size)] for rows in (fast_rows, slow_rows))
    warm_batch = make_batch(task, dataset, range(4))
    case.examples = {m: len(slow_rows if m in SLOW_METHODS else fast_rows) for m in METHODS}
    baseline = copy.deepcopy(model)  # the peers run on a model without gradindex's (idle) hooks

    with GradientProjector(model, groups, config.projection) as projector, tempfile.TemporaryDirectory() as tmp:
        k = case.total_dim = sum(projector.group_dims().values())
        trakers = {}
        if args.no_traker:
            matrix = torch.randn(case.params, k, generator=torch.Generator().manual_seed(1))
        else:
            from trak.projectors import BasicProjector, ProjectionType

            capacity = (args.repeats + 1) * len(slow_rows) + len(warm_batch[0])
            one_block = BasicProjector(case.params, k, 0, ProjectionType.normal, "cpu", block_size=k)
            trakers["traker"] = make_traker(copy.deepcopy(model), k, capacity, f"{tmp}/default")
            trakers["traker-cached"] = make_traker(copy.deepcopy(model), k, capacity, f"{tmp}/cached", one_block)
            matrix = one_block.proj_matrix  # [D, k] N(0, 1): the naive loop shares it (one copy in memory)
        matrix_scale = k ** -0.5

        def run_gradindex(rows):
            return featurize_rows(task, model, dataset, rows, projector, args.batch_size, torch.device("cpu"))

        def run_naive(batches, keep_full=False):
            return [naive_features(baseline, task, b, matrix, matrix_scale, keep_full) for b in batches]

        methods: dict[str, Callable[[list], object]] = {
            "train step": lambda batches: [train_step(baseline, task, b) for b in batches],
            "gradindex": run_gradindex,
            "naive": run_naive,
        }
        for label, traker in trakers.items():
            methods[label] = lambda batches, t=traker: [t.featurize(batch=list(b), num_samples=len(b[0]))
                                                         for b in batches]
        inputs = {"train step": fast_batches, "gradindex": fast_rows, "naive": slow_batches,
                  "traker": slow_batches, "traker-cached": slow_batches}
        warm_inputs = {"gradindex": list(range(4))}

        for label, method in methods.items():  # warm-up: allocations, vmap tracing, first-touch pages
            method(warm_inputs.get(label, [warm_batch]))
        for _ in range(args.repeats):
            for label, method in methods.items():
                case.seconds[label].append(timed(lambda: method(inputs[label]), CLOCKS[args.clock]))

        # sanity check, not timed: inner-product structure against the naive and the exact one
        check_rows = slow_rows[: args.batch_size]
        case.checked = len(check_rows)
        phi = run_gradindex(check_rows)
        ours = torch.from_numpy(np.concatenate([phi[g.name] for g in groups], axis=1)).double()
        [(dense, full)] = run_naive([make_batch(task, dataset, check_rows)], keep_full=True)
        del matrix, trakers
        case.correlation = {
            "gradindex~exact": pair_correlation(ours, full.double()),
            "naive~exact": pair_correlation(dense.double(), full.double()),
            "gradindex~naive": pair_correlation(ours, dense.double()),
        }


def pair_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the pairwise inner products ``a_i·a_j`` and ``b_i·b_j`` (i ≤ j)."""
    rows, cols = torch.triu_indices(len(a), len(a))
    x, y = (a @ a.T)[rows, cols], (b @ b.T)[rows, cols]
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def pin_malloc_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds (64 MiB, 256 MiB) for the whole process.

    By default glibc serves every allocation over 128 KiB with a fresh ``mmap`` (page
    faults on first touch) until a large free raises that threshold, so a method's speed
    depended on what ran before it (gradindex on the digits CNN: 3.6× a training step
    before the naive loop had run, 2.4× after). Pinned, every method runs in the same
    allocator state. Returns False where glibc is not the C library.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 64 << 20)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):
        return False


# -- report ---------------------------------------------------------------------------------------------
def throughput(case: Case, method: str, repeat: int) -> float:
    return case.examples[method] / case.seconds[method][repeat]


def median_ratio(case: Case, top: str, bottom: str) -> float:
    """Median over repeats of ``throughput(top) / throughput(bottom)`` measured in the same repeat."""
    repeats = len(case.seconds[top])
    return statistics.median(throughput(case, top, r) / throughput(case, bottom, r) for r in range(repeats))


def print_tables(cases: list[Case], args: argparse.Namespace) -> bool:
    ran = [m for m in METHODS if all(case.seconds[m] for case in cases)]
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock, "
          f"malloc {args.malloc}, batch {args.batch_size}, proj_dim {args.proj_dim} per block, "
          f"factor_dim {args.factor_dim}, "
          f"{args.repeats} repeats (medians)\n")
    header = ["model", "params", "k total"] + [f"{m} ex/s" for m in ran]
    rows = [[case.name, f"{case.params:,}", str(case.total_dim)]
            + [f"{statistics.median(throughput(case, m, r) for r in range(args.repeats)):,.0f}" for m in ran]
            for case in cases]
    print_markdown(header, rows)

    peers = [m for m in ("naive", "traker", "traker-cached") if m in ran]
    header = ["model", "gradindex ÷ train step (cost)"] + [f"speed-up vs {m}" for m in peers]
    rows = [[case.name, f"{median_ratio(case, 'train step', 'gradindex'):.2f}×"]
            + [f"{median_ratio(case, 'gradindex', m):,.1f}×" for m in peers] for case in cases]
    print()
    print_markdown(header, rows)

    ok = True
    header = ["model", "pairs", *cases[0].correlation]
    rows = []
    for case in cases:
        n = case.checked
        rows.append([case.name, str(n * (n + 1) // 2), *(f"{v:.3f}" for v in case.correlation.values())])
        ok &= case.correlation["gradindex~exact"] >= MIN_CORRELATION
    print("\nsanity check (not timed): Pearson correlation of pairwise inner products on one batch")
    print_markdown(header, rows)
    print(f"\nsanity check {'passed' if ok else 'FAILED'}: gradindex~exact ≥ {MIN_CORRELATION} for every model")
    return ok


def print_markdown(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).rjust(w) for x, w in zip(row, widths)) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer examples and repeats, smaller dims")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--proj-dim", type=int, default=256, help="gradindex target dimension per module block")
    parser.add_argument("--factor-dim", type=int, default=ProjectionConfig().factor_dim,
                        help="gradindex Kronecker head size per side (16 with proj_dim 256: one LoGra head)")
    parser.add_argument("--examples", type=int, default=1024, help="examples per repeat for gradindex and train step")
    parser.add_argument("--slow-examples", type=int, default=64, help="examples per repeat for naive and traker")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-traker", action="store_true", help="skip the traker rows")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's adaptive malloc thresholds alone (timings then depend on run order)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every method (default 1: on a shared machine, more OpenMP "
                             "threads than free cores make timings collapse; use 2+ on an idle machine)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: the process's CPU time (user + system), which other load on a shared "
                             "machine does not inflate; equals wall time on an idle machine with one thread. "
                             "wall: elapsed time (needed with --threads > 1)")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads > 1:
        parser.error("--clock cpu adds up the CPU time of all threads; use --clock wall with --threads > 1")
    if args.quick:
        args.examples, args.slow_examples, args.repeats, args.proj_dim = 256, 64, 2, 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    args.malloc = "glibc default" if args.default_malloc else (
        "pinned thresholds" if pin_malloc_thresholds() else "not glibc, untouched")
    if not args.no_traker:
        try:
            import trak  # noqa: F401
        except ImportError:
            print("traker is not installed (pip install traker); running without it", file=sys.stderr)
            args.no_traker = True
    cases = []
    for name in args.models.split(","):
        started = time.perf_counter()
        case = make_case(name.strip())
        run_case(case, args)
        print(f"{case.name}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        cases.append(case)
    return 0 if print_tables(cases, args) else 1


if __name__ == "__main__":
    sys.exit(main())
