"""The ``gradindex`` command line (click): parse → config → call the stage functions.

Every :class:`~gradindex.errors.GradIndexError` becomes one line on stderr and
exit status 2. Progress bars go to stderr; results to stdout.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import click

from gradindex.config import AUTO_DAMPING, DEFAULT_DAMPING, ExampleNorm, GroupNorm, LDSConfig, LearnConfig, LearnMethod
from gradindex.errors import ConfigError, GradIndexError


_LEARN, _LDS = LearnConfig(), LDSConfig()  # defaults shown by the flags


class _Group(click.Group):
    """Turns expected errors into one line on stderr and exit status 2: gradindex's own
    (:class:`GradIndexError`), click's usage errors, errors raised inside a user's task code
    (naming the hook and the user's file:line) and operating-system errors (a read-only folder,
    a full disk). Anything else is a bug in gradindex and keeps its traceback."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as err:
            if isinstance(err, _HELP):
                raise
            _fail(_usage_line(err))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GradIndexError as err:
            _fail(str(err))
        except click.UsageError as err:
            if isinstance(err, _HELP):
                raise
            _fail(_usage_line(err))
        except (click.exceptions.Exit, click.Abort):
            raise
        except (Exception, SystemExit) as err:
            task_module = sys.modules.get("gradindex.task")  # not imported: no task code ran (and no torch)
            message = task_module.task_code_error(err) if task_module is not None else None
            if message is None and isinstance(err, OSError) and err.errno != errno.EPIPE:  # click handles EPIPE
                message = _os_error_line(err)
            if message is None and isinstance(err, ValueError) and "null byte" in str(err):
                message = "a path or argument contains a NUL byte (\\x00)"
            if message is None and isinstance(err, EOFError):
                message = f"unexpected end of data ({err or 'a truncated or empty input file?'})"
            if message is None:
                raise
            _fail(message)


class StoreLocation(click.Path):
    """A store: a local path (a ``Path``, click's checks) or a URI such as ``s3://bucket/prefix``,
    passed on as the string it is (``Path`` would fold ``s3://`` into ``s3:/``)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and re.match(r"[a-zA-Z][a-zA-Z0-9+.-]+://", value):
            return value
        return super().convert(value, param, ctx)


STORE_LOCATION = StoreLocation(path_type=Path)


def _fail(message: str) -> None:
    click.echo("error: " + " ".join(message.split()), err=True)
    sys.exit(2)


_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # a bare group prints its help (click >= 8.2)


def _usage_line(err: click.UsageError) -> str:
    where = err.ctx.command_path if err.ctx is not None else "gradindex"
    return f"{where}: {err.format_message()} (see {where} --help)"


def _os_error_line(err: OSError) -> str:
    """``PATH: No space left on device`` and the like (the error's own text when it names no file)."""
    target = err.filename if err.filename is not None else ""
    reason = err.strerror or str(err) or type(err).__name__
    return f"{target}: {reason}" if target else f"{type(err).__name__}: {reason}"


def _parse_pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    pairs = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what}: expected KEY=VALUE, got {text!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def _task_options(values: tuple[str, ...]) -> dict[str, Any]:
    options = {}
    for key, value in _parse_pairs(values, "--task-option").items():
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _group_dims(values: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    dims = []
    for group, value in _parse_pairs(values, "--group-dim").items():
        try:
            dims.append((group, int(value)))
        except ValueError:
            raise ConfigError(f"--group-dim: expected GROUP=INTEGER, got {group}={value}") from None
    return tuple(dims)


def _progress(ctx: click.Context) -> bool:
    return not ctx.find_root().params.get("quiet", False)


task_option = click.option("--task-option", "task_options", multiple=True, metavar="KEY=VALUE",
                           help="Option passed to the task's constructor (JSON values allowed); repeatable.")
checkpoint_option = click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
                                 help="Model checkpoint (default: the task's own; built-in tasks train one on first use).")
group_rule_option = click.option("--group-rule", "group_rules", multiple=True, metavar="PATTERN=GROUP",
                                 help="Assign parameters matching a glob to GROUP (GROUP '-' excludes them); "
                                      "first match wins; repeatable.")
proj_options = [
    click.option("--proj-dim", type=int, default=256, show_default=True,
                  help="Target projected dimension of each module block."),
    click.option("--group-dim", "group_dims", multiple=True, metavar="GROUP=DIM",
                  help="Per-group override of --proj-dim; repeatable."),
    click.option("--proj-kind", type=click.Choice(["gaussian", "rademacher", "identity"]), default="gaussian",
                  show_default=True, help="Random projection matrix (identity: store full gradients)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Projection seed."),
    click.option("--factor-dim", type=int, default=2, show_default=True,
                 help="Side of each stacked Kronecker head for linear/conv/embedding blocks "
                      "(√proj-dim: one LoGra Kronecker product)."),
]


def _device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from gradindex.config import parse_device

    return parse_device(value, "--device", allow_auto=True)


device_option = click.option("--device", default="cpu", show_default=True, callback=_device,
                             help="Torch device for gradients (cpu, cuda, cuda:1, mps, auto = cuda if present).")


class _Damping(click.ParamType):
    """A relative Gram damping on the command line: a number or ``auto``."""

    name = "NUMBER|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) or value == AUTO_DAMPING:
            return value
        text = str(value).strip().lower()
        if text == AUTO_DAMPING:
            return AUTO_DAMPING
        try:
            return float(text)
        except ValueError:
            self.fail(f"expected a non-negative number or 'auto', got {value!r}", param, ctx)


DAMPING = _Damping()
_DAMPING_HELP = ("Gram damping, relative to each group's mean eigenvalue; 'auto' chooses it from the stored "
                 "training features (cross-validated likelihood, no labels; recorded in the manifest per group, "
                 "`info` shows it).")

preconditioner_options = [
    click.option("--preconditioner", type=click.Choice(["gram", "identity"]), default="gram", show_default=True,
                 help="Query-side preconditioner: per-group Gram inverse (TRAK-style) or none (grad-dot)."),
    click.option("--damping", type=DAMPING, default=DEFAULT_DAMPING, show_default=True, help=_DAMPING_HELP),
]
inputs_option = click.option("--inputs", type=click.Path(path_type=Path), default=None,
                             help="Query inputs file (the task's format; default: the task's own queries of --split).")
split_option = click.option("--split", type=click.Choice(["fit", "eval", "all"]), default=None,
                            help="Which of the task's default queries (without --inputs): fit (learn-weights' "
                                 "default), eval (eval lds' default; disjoint from fit) or all.")
concept_option = click.option("--concept", default="all", show_default=True,
                              help="Concept: 'all' (the task's measurement) or one of the task's concepts.")
shared_option = click.option("--shared/--no-shared", "shared", default=None,
                              help="Search the shared index (build-index --shared) with the concept's weights on the "
                                   "query side, or the concept's own partition (default: its own when built).")
trust_options = [
    click.option("--trust-task", is_flag=True,
                 help="Run the task code the store's manifest names even if it is not built in (only for stores "
                      "you trust: a store's task is code)."),
    click.option("--task", "task_spec", default=None, metavar="SPEC",
                 help="The store's task spec (file.py:Class or module:Class): consent to run exactly that code."),
]
ray_option = click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
                          metavar="[ADDRESS]",
                          help="Run on Ray (pip install 'gradindex[ray]'): bare --ray starts a local cluster bound "
                               "to 127.0.0.1; ADDRESS (auto, HOST:PORT, ray://HOST:PORT) joins a running one. "
                               "Put it after the positional arguments.")


def _timeout(ctx: click.Context, param: click.Parameter, value: float) -> float:
    from gradindex.config import require_number

    return require_number(value, "--ray-timeout", above=0)


ray_timeout_option = click.option("--ray-timeout", type=float, default=30.0, show_default=True, metavar="SECONDS",
                                  callback=_timeout,
                                  help="With --ray ADDRESS: give up when nothing answers there within this time.")


def _connect_ray(address: str | None, timeout: float) -> None:
    """The install hint and an unreachable address as one line, before any work."""
    from gradindex.distributed import check_ray_address, import_ray

    import_ray()
    check_ray_address(address, timeout)


def _apply(options):
    def decorator(func):
        for option in reversed(options):
            func = option(func)
        return func
    return decorator


def _featurize_config(proj_dim, group_dims, proj_kind, seed, factor_dim, group_rules, **fields):
    from gradindex.config import FeaturizeConfig, GroupRule, ProjectionConfig

    projection = ProjectionConfig(kind=proj_kind, proj_dim=proj_dim, group_dims=_group_dims(group_dims), seed=seed,
                                  factor_dim=factor_dim)
    return FeaturizeConfig(projection=projection, group_rules=tuple(GroupRule.parse(r) for r in group_rules), **fields)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or log messages.")
@click.option("-v", "--verbose", is_flag=True, help="Debug log messages.")
@click.version_option(package_name="gradindex")
def main(quiet: bool, verbose: bool) -> None:
    """gradindex: which training examples made my model produce this?

    Per-example projected gradients → Parquet feature store → FAISS index →
    top-k attribution lookups. Start with `gradindex demo`.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_logger = logging.getLogger("gradindex")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO))


@main.command()
@click.option("--task", "task_spec", default="digits", show_default=True,
              help="Built-in task to demo (digits, diffusion, ...).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("gradindex-demo"),
              show_default=True, help="Output folder (checkpoint, store, PNG report).")
@click.option("-k", type=click.IntRange(min=1), default=5, show_default=True, help="Training examples per query.")
@click.option("--queries", "num_queries", type=click.IntRange(min=1), default=6, show_default=True,
              help="Number of held-out queries.")
@task_option
@device_option
@click.pass_context
def demo(ctx, task_spec: str, out: Path, k: int, num_queries: int, task_options, device: str) -> None:
    """Run the whole pipeline end to end on bundled data and print the top-k
    (per concept too, for a task with concepts: `--task diffusion`)."""
    from gradindex.demo import run_demo

    result = run_demo(task_spec, out, k=k, num_queries=num_queries, device=device, show_progress=_progress(ctx),
                      task_options=_task_options(task_options))
    for query in result.queries:
        caption = f" ({query['caption']})" if query["caption"] else ""
        click.echo(f"\nquery {query['query']}{caption}: top-{k} training examples")
        captions = any(r["caption"] for r in query["results"])
        _echo_table([{"rank": r["rank"], "sample_id": r["sample_id"], "score": r["score"],
                      **({"example": r["caption"]} if captions else {})} for r in query["results"]])
    if result.concept_precision:
        click.echo(f"\nper concept: fraction of each query's top-{k} sharing its value")
        _echo_table([{"concept": c, f"precision@{k}": p} for c, p in result.concept_precision.items()])
    click.echo("")
    click.echo("timings: " + ", ".join(f"{name} {secs:.2f}s" for name, secs in result.seconds.items()))
    click.echo(f"store:   {result.store}")
    if result.png:
        click.echo(f"report:  {result.png}")
    if result.concept_png:
        click.echo(f"concept report: {result.concept_png}")


@main.command()
@click.argument("task_spec", metavar="TASK")
@task_option
@checkpoint_option
@group_rule_option
@_apply(proj_options)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def groups(task_spec, task_options, checkpoint, group_rules, proj_dim, group_dims, proj_kind, seed, factor_dim,
           as_json) -> None:
    """List the parameter groups of TASK's model, with sizes and projected dims."""
    from gradindex.featurize import resolve_groups
    from gradindex.groups import unused_rules
    from gradindex.projection import make_block_projector
    from gradindex.task import load_task

    config = _featurize_config(proj_dim, group_dims, proj_kind, seed, factor_dim, group_rules)
    task = load_task(task_spec, _task_options(task_options))
    model = task.load_model(checkpoint)
    resolved = resolve_groups(task, model, config)
    rows = []
    for group in resolved:
        projectors = [make_block_projector(group.name, block, config.projection) for block in group.blocks]
        rows.append({
            "group": group.name,
            "modules": ",".join(b.module or "(root)" for b in group.blocks),
            "kind": ",".join(sorted({b.kind for b in group.blocks})),
            "params": group.numel,
            "proj_dim": sum(p.out_dim for p in projectors),
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    _echo_table(rows)
    click.echo(f"{len(rows)} groups, {sum(r['params'] for r in rows)} parameters, "
               f"{sum(r['proj_dim'] for r in rows)} projected dimensions")
    for rule in unused_rules(model, config.group_rules):
        click.echo(f"warning: group rule {rule.pattern}={rule.group or '-'} matches no trainable parameter", err=True)


@main.command()
@click.argument("task_spec", metavar="TASK")
@click.option("--out", required=True, type=StoreLocation(file_okay=False, path_type=Path),
              help="Store directory (or s3://BUCKET/PREFIX) to write.")
@task_option
@checkpoint_option
@group_rule_option
@_apply(proj_options)
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage precision of the features.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Examples per backward pass.")
@click.option("--shard-size", type=int, default=100_000, show_default=True, help="Examples per Parquet shard.")
@device_option
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Featurize only the first N examples.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@click.option("--resume", is_flag=True, help="Keep shards a previous identical run completed.")
@click.option("--append", is_flag=True,
              help="Add TASK's training examples missing from the existing store at --out as new shards (store's "
                   "config and checkpoint; projection options are ignored); then `build-index --update`.")
@ray_option
@ray_timeout_option
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="With --ray: at most this many workers (default: one per GPU, or per --cpus-per-worker CPUs).")
@click.option("--cpus-per-worker", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: CPU slots (and torch threads) of each worker.")
@click.option("--max-retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="With --ray: times a shard is redone on a fresh worker after its worker died.")
@click.pass_context
def featurize(ctx, task_spec, out, task_options, checkpoint, group_rules, proj_dim, group_dims, proj_kind, seed,
              factor_dim, dtype, batch_size, shard_size, device, limit, overwrite, resume, append, ray_address,
              ray_timeout, workers, cpus_per_worker, max_retries) -> None:
    """Compute per-example projected gradients of TASK's training set into a store.

    With --ray the shards are computed by Ray workers (--device auto: one per GPU when
    the cluster has GPUs) and the store is identical to a single-process run's.
    """
    from gradindex.task import load_task

    if append:
        from gradindex.featurize_append import featurize_append

        if overwrite or resume or ray_address is not None:
            raise ConfigError("--append excludes --overwrite, --resume and --ray")
        store, added = featurize_append(load_task(task_spec, _task_options(task_options)), out, checkpoint=checkpoint,
                                        device=device, limit=limit, show_progress=_progress(ctx))
        click.echo(f"{store.path}: appended {added} examples, now {store.num_samples} in "
                   f"{len(store.manifest['shards'])} shard(s)")
        return

    config = _featurize_config(proj_dim, group_dims, proj_kind, seed, factor_dim, group_rules, dtype=dtype,
                               batch_size=batch_size, shard_size=shard_size)
    if ray_address is None:
        from gradindex.featurize import featurize as run_featurize

        task = load_task(task_spec, _task_options(task_options))
        store = run_featurize(task, out, config, checkpoint=checkpoint, device=device, overwrite=overwrite,
                              resume=resume, limit=limit, show_progress=_progress(ctx))
    else:
        from gradindex.distributed import featurize_ray

        _connect_ray(ray_address, ray_timeout)
        task = load_task(task_spec, _task_options(task_options))
        store = featurize_ray(task, out, config, checkpoint=checkpoint, device=device, overwrite=overwrite,
                              resume=resume, limit=limit, address=ray_address, workers=workers,
                              cpus_per_worker=cpus_per_worker, max_retries=max_retries,
                              show_progress=_progress(ctx))
    click.echo(f"{store.path}: {store.num_samples} examples, {len(store.groups)} groups, dimension {store.dim}, "
               f"{len(store.manifest['shards'])} shard(s), {store.manifest['featurize_seconds']:.2f}s")


def _parse_shards(text: str | None) -> list[int] | None:
    """``"0,3,5-7"`` → ``[0, 3, 5, 6, 7]``."""
    if text is None:
        return None
    shards: list[int] = []
    try:
        for piece in text.split(","):
            lo, sep, hi = piece.strip().partition("-")
            shards.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise ConfigError(f"--shards: expected shard numbers like 0,3,5-7, got {text!r}") from None
    return shards


search_options = [
    click.option("--nprobe", type=int, default=0, show_default=True,
                 help="ivf/ivfpq: scan budget, in directions' worth of vectors (N/nlist each), cells taken in "
                      "order of estimated best score (0 = the partition's default: calibrated, else 16)."),
    click.option("--ef-search", type=int, default=0, show_default=True,
                 help="hnsw: beam width (0 = the partition's default: calibrated, else 256)."),
    click.option("--rerank", type=int, default=0, show_default=True,
                 help="ivfpq: best candidates by PQ score re-scored exactly (0 = the partition's default: "
                      "calibrated, else 20·k)."),
    click.option("--no-prune", "no_prune", is_flag=True,
                 help="ivf/ivfpq: scan the whole budget (no ‖q‖·max‖x‖ bound per cell)."),
]


def _search_config(nprobe, ef_search, rerank, no_prune):
    from gradindex.config import SearchConfig

    return SearchConfig(nprobe=nprobe, ef_search=ef_search, rerank=rerank, prune=not no_prune)


@main.command("build-index")
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--concept", default="all", show_default=True, help="Concept partition (its weights are used).")
@click.option("--kind", type=click.Choice(["auto", "flat", "ivf", "ivfpq", "hnsw"]), default="auto", show_default=True,
              help="Index kind; auto = flat while N·D ≤ 1e8, else ivfpq.")
@_apply(preconditioner_options)
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where FAISS searches (cuda needs a GPU build of FAISS; falls back to the CPU with a message).")
@click.option("--balance", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Store Gram-whitened blocks (G+λI)^-1/2 φ and map queries back (auto: on for approximate kinds).")
@click.option("--nlist", type=int, default=0, show_default=True,
              help="ivf/ivfpq: direction cells per norm band (0 = power of two nearest √N/2, 4..2048).")
@click.option("--bands", type=int, default=0, show_default=True,
              help="ivf/ivfpq: norm bands (0 = 8 from N ≥ 200k, else 4).")
@click.option("--pq-bytes", type=int, default=0, show_default=True,
              help="ivfpq: bytes per code, must divide D (0 = largest divisor of D ≤ min(96, D/8)).")
@click.option("--hnsw-m", type=int, default=32, show_default=True, help="hnsw: graph degree.")
@click.option("--ef-construction", type=int, default=80, show_default=True, help="hnsw: build beam width.")
@click.option("--train-size", type=int, default=0, show_default=True,
              help="Rows of the seeded training sample (0 = min(N, max(64·nlist, 20000))).")
@click.option("--index-seed", type=int, default=0, show_default=True, help="Seed of the training sample and k-means.")
@click.option("--shards-per-part", type=int, default=0, show_default=True,
              help="Store shards per index part (0 = one part for the whole store).")
@click.option("--keep-vectors/--no-keep-vectors", default=None,
              help="Keep float16 vectors beside each part for exact re-ranking (default: ivfpq only).")
@click.option("--shards", default=None, metavar="LIST",
              help="Build only the part of these store shards (e.g. 0-4), e.g. one machine each, after --train-only.")
@click.option("--update", is_flag=True, help="Add parts for store shards no part covers yet (after featurize --append).")
@click.option("--train-only", is_flag=True, help="Train a fresh partition and build no parts (then --shards per machine).")
@click.option("--shared", is_flag=True,
              help="Build the one index of φ serving every concept (its weights applied on the query side) "
                   "instead of --concept's own partition.")
@click.option("--target-recall", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Calibrate the approximate kinds' query knobs left at 0 to the cheapest setting reaching this "
                   "recall@10 on calibration queries (0 = no calibration).")
@_apply(search_options)
@_apply(trust_options)
@click.pass_context
def build_index_command(ctx, store_path, concept, kind, preconditioner, damping, device, balance, nlist, bands,
                        pq_bytes, hnsw_m, ef_construction, train_size, index_seed, shards_per_part, keep_vectors,
                        shards, update, train_only, shared, target_recall, nprobe, ef_search, rerank, no_prune,
                        trust_task, task_spec) -> None:
    """Build the FAISS partition of a concept from STORE's features and weights.

    The query knobs given here (--nprobe, --ef-search, --rerank, --no-prune) become the
    partition's defaults; the ones left at 0 are calibrated (--target-recall) on stored rows made
    into queries and, when the store's task may run (built in, or --trust-task / --task), the
    task's own queries. `query` and `eval recall` can override them.
    """
    from gradindex.config import IndexConfig
    from gradindex.index import build_index
    from gradindex.index.shared import SHARED
    from gradindex.store import FeatureStore
    from gradindex.weights import GroupWeights

    if shared and concept != "all":
        raise ConfigError("--shared builds one index for every concept; drop --concept")
    concept = SHARED if shared else concept
    config = IndexConfig(concept=concept, kind=kind, preconditioner=preconditioner, damping=damping, device=device,
                         balance=balance, nlist=nlist, bands=bands, pq_bytes=pq_bytes, hnsw_m=hnsw_m,
                         ef_construction=ef_construction, train_size=train_size, seed=index_seed,
                         shards_per_part=shards_per_part, keep_vectors=keep_vectors)
    if sum([update, train_only, shards is not None]) > 1:
        raise ConfigError("--update, --train-only and --shards exclude each other")
    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    index = build_index(store, config, weights=GroupWeights.uniform(SHARED, store.groups) if shared else None,
                        show_progress=_progress(ctx), shards=_parse_shards(shards), update=update,
                        train_only=train_only, search=_search_config(nprobe, ef_search, rerank, no_prune),
                        target_recall=target_recall or None)
    click.echo(f"{store.path}: index {concept!r} ({index.kind}, {preconditioner}) with {index.ntotal} vectors "
               f"of dimension {store.dim} in {len(index.parts)} part(s)")
    if "calibration" in index.entry:
        from gradindex.index.calibrate import describe

        click.echo(f"calibrated knobs: {describe(index.entry['calibration'], index.kind)}")


@main.command("learn-weights")
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@concept_option
@inputs_option
@split_option
@_apply(preconditioner_options)
@click.option("--queries", "num_queries", type=int, default=_LEARN.num_queries, show_default=True,
              help="Queries used (a seeded sample of the inputs).")
@click.option("--reference-size", type=int, default=_LEARN.reference_size, show_default=True,
              help="Training examples scored per query (a seeded sample of the store).")
@click.option("--top-k", type=int, default=_LEARN.top_k, show_default=True, help="k of the SNR's top-k signal.")
@click.option("--example-norm", type=click.Choice([n.value for n in ExampleNorm]), default=_LEARN.example_norm.value,
              show_default=True, help="What is done to each training example's scores across the queries "
                                      "(auto: none for --method ssl, as in the paper; standardize otherwise).")
@click.option("--group-norm", type=click.Choice([n.value for n in GroupNorm]), default=_LEARN.group_norm.value,
              show_default=True, help="rms: groups scaled to unit rms, shares pulled (KL) to equal shares; none: raw "
                                      "scores, weights pulled by λ‖w‖² to uniform (auto: none for --method ssl, as in "
                                      "the paper; rms otherwise).")
@click.option("--regularization", type=float, default=_LEARN.regularization, show_default=True,
              help="Strength of the pull: KL to equal shares (--group-norm rms) or λ‖w‖² (none).")
@click.option("--steps", type=int, default=_LEARN.steps, show_default=True, help="Adam steps.")
@click.option("--lr", type=float, default=_LEARN.lr, show_default=True, help="Adam learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the query and reference samples.")
@click.option("--method", type=click.Choice([m.value for m in LearnMethod]), default=_LEARN.method.value,
              show_default=True,
              help="Objective: snr (each query's top-k stands out of its scores), ssl (the paper's normalised "
                   "top-k mean with weights on the query side), agreement (queries sharing the concept's value "
                   "share their top-k; needs the queries' values); auto: agreement for a concept when possible, "
                   "else snr.")
@click.option("--reset", is_flag=True,
              help="Forget the concept's learned weights (every setting): it is uniform again; then build-index.")
@device_option
@_apply(trust_options)
@click.pass_context
def learn_weights_command(ctx, store_path, concept, inputs, split, preconditioner, damping, num_queries,
                          reference_size, top_k, example_norm, group_norm, regularization, steps, lr, seed, method, reset, device,
                          trust_task, task_spec) -> None:
    """Learn STORE's per-group weights for a concept from unlabeled queries (kept per preconditioner
    and damping; the concept 'uniform' is reserved for uniform weights)."""
    from gradindex.config import UNIFORM_CONCEPT
    from gradindex.learn import learn_weights
    from gradindex.query_features import load_store_task
    from gradindex.store import FeatureStore
    from gradindex.weights import reset_weights

    if concept == UNIFORM_CONCEPT:
        raise ConfigError(f"concept {UNIFORM_CONCEPT!r} is reserved: its weights are always uniform; learn weights for "
                          "'all' or one of the task's concepts")
    config = LearnConfig(preconditioner=preconditioner, damping=damping, num_queries=num_queries,
                         reference_size=reference_size, top_k=top_k, example_norm=example_norm, group_norm=group_norm,
                         regularization=regularization, steps=steps, lr=lr, seed=seed, method=method)
    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    if reset:
        removed = reset_weights(store, concept)
        click.echo(f"concept {concept!r}: " + (f"learned weights removed ({', '.join(removed)}); " if removed else
                                              "no learned weights; ") +
                   "it uses uniform weights now (run build-index again for its index)")
        return
    queries, _, _, where = _query_set(load_store_task(store), inputs, split, "fit")
    weights = learn_weights(store, config, queries=queries, concept=concept, device=device,
                            show_progress=_progress(ctx), query_source=str(inputs) if inputs else split or "fit")
    info = weights.info
    resolved = info["config"]["damping"]
    click.echo(f"queries: {where}" + (f", {info['num_queries']} sampled" if info["num_queries"] < len(queries) else ""))
    _echo_table([{"group": g, "weight": weights.weights[g], "share": info["shares"][g],
                  "uniform share": info["uniform_shares"][g],
                  **({"damping": resolved[g]} if isinstance(resolved, dict) else {})} for g in store.groups])
    click.echo(f"concept {concept!r} ({preconditioner}, damping {_damping_text(resolved)}): {_objective_text(info)} "
               f"over {info['num_queries']} queries x {info['reference_size']} training examples, "
               f"{info['seconds']:.1f}s; saved in {store.path}/manifest.json")


@main.group("weights")
def weights_group() -> None:
    """Inspect learned group weights."""


@weights_group.command("plot")
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG file to write.")
@click.option("--concept", "concepts", multiple=True,
              help="Concepts to draw (default: every concept with weights, and 'all'); repeatable.")
def weights_plot(store_path, out, concepts) -> None:
    """Draw STORE's group weights as a bar chart, one panel per concept (and learned setting)."""
    from dataclasses import replace

    from gradindex.report import write_weights_chart
    from gradindex.store import FeatureStore
    from gradindex.summary import weight_panels

    store = FeatureStore.open(store_path, verify=False)
    panels = [replace(weights, concept=label)
              for label, weights in weight_panels(store.manifest, store.groups, concepts)]
    click.echo(f"wrote {write_weights_chart(out, panels, store.groups)}")


@main.group("eval")
def eval_group() -> None:
    """Attribution quality: LDS, concept precision@k; index recall@k."""


@eval_group.command("lds")
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of retrained models and measurements (default: STORE/lds); reruns reuse it.")
@click.option("--models", "num_models", type=int, default=_LDS.num_models, show_default=True,
              help="Retrained models M.")
@click.option("--fraction", type=float, default=_LDS.fraction, show_default=True, help="Subset fraction alpha.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subsets (and training seeds).")
@click.option("--training-seed", type=int, default=None,
              help="Train every model with this seed (default: a seed per model).")
@click.option("--workers", type=int, default=2, show_default=True, help="Training processes.")
@inputs_option
@split_option
@concept_option
@click.option("--damping", type=DAMPING, default=DEFAULT_DAMPING, show_default=True,
              help="Gram damping of the uniform and single-group rows (a number or 'auto').")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@device_option
@_apply(trust_options)
@click.pass_context
def eval_lds(ctx, store_path, cache, num_models, fraction, seed, training_seed, workers, inputs, split, concept,
             damping, as_json, device, trust_task, task_spec) -> None:
    """LDS of STORE's attributions (uniform, each group alone, learned) against retrained models."""
    from gradindex.config import MAX_WORKERS, parse_damping, require_positive
    from gradindex.devices import resolve_device
    from gradindex.lds import lds_report, retrain
    from gradindex.query_features import check_concept, load_store_task
    from gradindex.store import FeatureStore
    from gradindex.task import require_training_routine

    config = LDSConfig(num_models=num_models, fraction=fraction, seed=seed, training_seed=training_seed)
    damping = parse_damping(damping, "--damping")
    require_positive(workers, "--workers", maximum=MAX_WORKERS)
    resolve_device(device, "--device")
    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    task = load_store_task(store)
    check_concept(task, concept)
    require_training_routine(task, "eval lds")  # up front: before any model is trained
    queries, measured, positions, where = _query_set(task, inputs, split, "eval")
    retrained = retrain(task, cache or store.local_dir("lds"), config, queries_file=inputs, workers=workers,
                        show_progress=_progress(ctx), queries=measured)
    if positions is not None:  # the cache measures every default query; keep the split's
        retrained = retrained.queries(positions)
    rows = lds_report(store, retrained, queries, concept=concept, damping=damping, device=device)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    _echo_table([{**row, "damping": "" if row["damping"] is None else row["damping"]} for row in rows])
    click.echo(f"LDS over {where} and {num_models} models trained on {fraction:g} of the data "
               f"(concept {concept!r}); sem = standard error over queries")


@main.command()
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--inputs", required=True, type=click.Path(path_type=Path), help="Query inputs file (format: the task's).")
@click.option("--concept", default="all", show_default=True, help="Concept partition to search.")
@click.option("-k", type=int, default=10, show_default=True, help="Training examples per query.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per query on stdout.")
@checkpoint_option
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Queries per backward pass.")
@_apply(search_options)
@shared_option
@click.option("--all", "all_scores", is_flag=True,
              help="Every score, not the top-k: the full [queries, training examples] matrix, computed exactly "
                   "from the store (no index needed) and written to --out.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --all: scores.npy ([queries, N] float32; sample ids in scores.sample_ids.npy) or "
                   "scores.parquet (a row per training example: sample_id, scores[queries]).")
@ray_option
@ray_timeout_option
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="With --ray: at most this many actors holding the index parts (default: one per part, "
                   "at most one per GPU or CPU slot).")
@_apply(trust_options)
def query(store_path, inputs, concept, k, as_json, checkpoint, device, batch_size, nprobe, ef_search, rerank,
          no_prune, shared, all_scores, out, ray_address, ray_timeout, actors, trust_task, task_spec) -> None:
    """Top-k training examples of STORE for every query in --inputs.

    With --all, every score instead (--out scores.npy|scores.parquet), under the concept's
    index setting (or its weights' setting when no index is built).
    With --ray the parts of the concept's index (IndexConfig.shards_per_part) are held by Ray actors,
    each query fans out to them and their top-k are merged: the same results as without.
    """
    from gradindex.query import Attributor, metadata_lookup, result_records
    from gradindex.store import FeatureStore

    if all_scores or out is not None:
        _query_all(store_path, inputs, concept, checkpoint, device, batch_size, out, all_scores, ray_address,
                   trust_task, task_spec)
        return
    if k < 1:
        raise ConfigError(f"-k: expected a positive integer, got {k}")
    search = _search_config(nprobe, ef_search, rerank, no_prune)
    search = search if search.to_dict() != type(search)().to_dict() else None
    if ray_address is not None:
        _connect_ray(ray_address, ray_timeout)  # the install hint and an unreachable address before any work
    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    if ray_address is None:
        attributor = Attributor.open(store, concept=concept, checkpoint=checkpoint, device=device, search=search,
                                     shared=shared)
    else:
        from gradindex.index.ray_search import open_ray_attributor

        attributor = open_ray_attributor(store, concept=concept, checkpoint=checkpoint, device=device,
                                         address=ray_address, actors=actors, search=search, shared=shared)
    queries = attributor.task.load_queries(inputs)
    top = attributor.attribute(queries, k=k, batch_size=batch_size)
    records = result_records(top, metadata_lookup(attributor.store, top.sample_ids))
    for q, record in enumerate(records):
        if as_json:
            click.echo(json.dumps(record))
        else:
            caption = attributor.task.describe(queries[q])
            click.echo(f"query {q}: {caption}" if caption else f"query {q}")
            _echo_table(record["results"])
            click.echo("")
    attributor.close()


def _query_all(store_path, inputs, concept, checkpoint, device, batch_size, out, all_scores, ray_address, trust_task,
               task_spec) -> None:
    from gradindex.query import all_scores as compute_all
    from gradindex.store import FeatureStore, check_score_path, score_ids_path, write_score_matrix

    if not all_scores or out is None:
        raise ConfigError("--all and --out go together: query STORE --inputs FILE --all --out scores.npy")
    if ray_address is not None:
        raise ConfigError("--all computes the scores here from the store; drop --ray")
    check_score_path(out)
    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    count, blocks = compute_all(store, inputs, concept, checkpoint=checkpoint, device=device, batch_size=batch_size)
    path = write_score_matrix(out, count, store.num_samples, blocks)
    where = f"; sample ids in {score_ids_path(path)}" if path.suffix == ".npy" else ""
    click.echo(f"{path}: scores of {count} queries x {store.num_samples} training examples (float32){where}")


@main.command()
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--concept", "concepts", multiple=True,
              help="Concept partition to serve; repeatable (default: all).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default is loopback: only this machine can connect. The API has no "
                   "authentication; bind another address (0.0.0.0: every interface) only behind a firewall or proxy.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free port; the URL is printed).")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Queries of concurrent requests featurized and searched together.")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="How long a request waits for others to batch with (0: only those already queued).")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=16.0, show_default=True,
              help="Request body limit in MiB (larger: 413).")
@checkpoint_option
@device_option
@_apply(search_options)
@ray_option
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="With --ray: deployments holding each concept's index parts (default: one per part, at most "
                   "one per GPU or CPU slot).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: replicas of the API (query featurization) and of each parts deployment.")
@_apply(trust_options)
def serve(store_path, concepts, host, port, max_batch, max_wait_ms, max_body_mb, checkpoint, device, nprobe,
          ef_search, rerank, no_prune, ray_address, actors, replicas, trust_task, task_spec) -> None:
    """Answer attribution lookups over HTTP, with the model, projections and index kept warm.

    \b
    POST /v1/attribute  {"inputs": ..., "k": 10, "concept": "all"} -> {"results": [...]}:
                        the objects `query --json` prints; inputs are the task's query
                        fields as JSON (digits: {"x": [...], "y": [...]}, an .npz's arrays;
                        lm: a list of JSONL query records)
    GET  /v1/health     {"status": "ok", ...}
    GET  /v1/info       what `gradindex info` shows, plus batching counters

    Listens on 127.0.0.1 (loopback) unless --host says otherwise. Concurrent requests are
    batched (--max-batch, --max-wait-ms). Needs `pip install 'gradindex[serve]'`. With --ray
    the same API runs on Ray Serve (`pip install 'ray[serve]'`), each concept's index parts
    (build-index --shards-per-part) held by deployments spread over the cluster's machines.
    """
    from gradindex.config import ServeConfig
    from gradindex.serve import import_serving
    from gradindex.store import FeatureStore

    import_serving()  # the install hint before any work
    config = ServeConfig(host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_mb=max_body_mb)
    search = _search_config(nprobe, ef_search, rerank, no_prune)
    search = search if search.to_dict() != type(search)().to_dict() else None
    concepts = concepts or ("all",)
    if ray_address is not None:
        _serve_on_ray(store_path, concepts, config, checkpoint, device, search, ray_address, actors, replicas,
                      trust_task, task_spec)
        return
    from gradindex.serve.app import create_app
    from gradindex.serve.engine import AttributionEngine
    from gradindex.serve.server import bind_socket, run_server, url_of

    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    engine = AttributionEngine.open(store, concepts, config, checkpoint=checkpoint, device=device, search=search)
    try:
        sock = bind_socket(config.host, config.port)
        click.echo(f"serving {engine.store.path} (concepts: {', '.join(engine.concepts)}) on {url_of(sock)}")
        sys.stdout.flush()
        verbose = logging.getLogger("gradindex").getEffectiveLevel() <= logging.DEBUG
        run_server(create_app(engine), sock, log_level="debug" if verbose else "warning")
    finally:
        engine.close()


def _serve_on_ray(store_path, concepts, config, checkpoint, device, search, ray_address, actors, replicas,
                  trust_task, task_spec) -> None:
    import signal
    import time

    from gradindex.distributed import import_ray, ray_session
    from gradindex.serve.ray_serve import deploy, import_serve
    from gradindex.store import FeatureStore

    import_ray()
    serve_module = import_serve()  # the install hints before any work
    if config.port == 0:
        raise ConfigError("--port 0 is not supported with --ray (Serve's proxy needs a fixed port)")
    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    def stop(signum, frame):
        raise KeyboardInterrupt  # SIGTERM (a service manager's stop) cleans up like Ctrl-C

    with ray_session(ray_address):
        signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs its own handler
        try:
            url = deploy(store, concepts, config, checkpoint=checkpoint, device=device, search=search,
                         actors=actors, replicas_per_part=replicas, api_replicas=replicas)
            click.echo(f"serving {store_path} (concepts: {', '.join(concepts)}) on {url} (Ray Serve); Ctrl-C stops")
            sys.stdout.flush()
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve_module.shutdown()


@main.command()
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def info(store_path, as_json) -> None:
    """Show a store's manifest: task, groups, dims, shards, weights, indexes."""
    from gradindex.store import FeatureStore
    from gradindex.summary import store_summary

    store = FeatureStore.open(store_path, verify=False)
    if as_json:
        click.echo(json.dumps(store.manifest, indent=2))
        return
    summary = store_summary(store)
    projection = summary["projection"]
    click.echo(f"store:       {summary['store']}")
    click.echo(f"task:        {summary['task']} {summary['task_options'] or ''}".rstrip())
    click.echo(f"checkpoint:  {summary['checkpoint']} (fingerprint {summary['model_fingerprint'][:16]}…)")
    click.echo(f"examples:    {summary['num_samples']} in {summary['shards']} shard(s), {summary['dtype']}")
    click.echo(f"projection:  {projection['kind']}, proj_dim {projection['proj_dim']}, "
               f"seed {projection['seed']}; dimension {summary['dim']}")
    rows = []
    for group in summary["groups"]:
        row = {"group": group["group"], "params": group["params"], "dim": group["dim"]}
        for concept in summary["concepts"]:
            row[f"w[{concept}]"] = group["weights"][concept]
            if concept in group.get("shares", {}):
                row[f"share[{concept}]"] = group["shares"][concept]
        for concept, damping in group.get("damping", {}).items():
            row[f"damping[{concept}]"] = damping
        rows.append(row)
    _echo_table(rows)
    for concept, settings in summary["learned_weights"].items():
        for key, learned in settings.items():
            objective = learned.get("objective")
            snr = (f", {learned['num_queries']} queries x {learned['reference_size']} examples, objective {objective['name']} "
                   f"{objective['uniform']:.3f} (uniform) -> {objective['learned']:.3f}"
                   if objective and {"num_queries", "reference_size"} <= set(learned) else "")
            setting = _setting(learned) if "preconditioner" in learned else key
            click.echo(f"weights {concept!r}: {learned['method']} for {setting}{snr}; digest {learned['digest']}")
    for concept, index in summary["indexes"].items():
        line = (f"index {concept!r}: {index['kind']}, {_setting(index)}, {index['ntotal']} vectors in "
                f"{index['parts']} part(s); built with weights {index['weights']}")
        if index["stale"]:
            line += f"; the store's current weights are {index['current_weights']}: run build-index again to use them"
        click.echo(line)
        entry = store.manifest["indexes"][concept]
        if entry.get("calibration"):
            from gradindex.index.calibrate import describe

            click.echo(f"  search knobs {describe(entry['calibration'], entry['kind'])}")
        elif entry.get("kind") in ("ivf", "ivfpq", "hnsw"):
            from gradindex.index.calibrate import knob_text

            click.echo(f"  search knobs {knob_text(entry.get('search', {}), entry['kind'])} (0 = default; not calibrated)")


def _setting(config: dict[str, Any]) -> str:
    """``gram (damping 0.1)`` or ``identity``: the damping only where it applies."""
    if config.get("preconditioner") == "gram":
        auto = config.get("damping_requested") == "auto" or isinstance(config.get("damping"), dict)
        return f"gram (damping {_damping_text(config.get('damping')) if auto else config.get('damping')})"
    return str(config.get("preconditioner"))


@eval_group.command("recall")
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--concept", default="all", show_default=True, help="Concept partition to evaluate.")
@click.option("-k", type=click.IntRange(min=1), default=10, show_default=True, help="Top-k depth.")
@click.option("--inputs", type=click.Path(path_type=Path), default=None,
              help="Query inputs file (default: the task's own held-out queries).")
@click.option("--queries", "num_queries", type=click.IntRange(min=1), default=None,
              help="Use only the first N queries.")
@click.option("--target-recall", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Also print the cheapest knobs reaching this recall@k on these queries (0 = don't).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_apply(search_options)
@shared_option
@device_option
@_apply(trust_options)
def eval_recall(store_path, concept, k, inputs, num_queries, target_recall, as_json, nprobe, ef_search, rerank,
                no_prune, shared, device, trust_task, task_spec) -> None:
    """recall@k of an index partition against exact search over the same store."""
    from gradindex.evaluate import index_recall
    from gradindex.query_features import load_store_task
    from gradindex.store import FeatureStore

    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    queries = load_store_task(store).load_queries(inputs) if inputs is not None else None
    search = _search_config(nprobe, ef_search, rerank, no_prune)
    result = index_recall(store, concept, queries=queries, k=k, device=device, num_queries=num_queries,
                          search=search if search.to_dict() != type(search)().to_dict() else None, shared=shared,
                          target=target_recall or None)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    from gradindex.index.calibrate import knob_text

    _echo_table([{"concept": result.concept, "kind": result.kind, "vectors": result.ntotal,
                  "queries": result.queries, "knobs": knob_text(result.search, result.kind), f"recall@{k}": result.recall}])
    if result.knobs is not None:
        verdict = "reach" if result.reached else "do NOT reach (the largest setting tried)"
        click.echo(f"knobs that {verdict} recall@{k} {result.target} on these queries: "
                   f"{knob_text(result.knobs, result.kind)} (recall {result.knobs_recall:.4g})")


@eval_group.command("precision")
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--inputs", type=click.Path(path_type=Path), default=None,
              help="Query inputs file carrying the concepts' values (default: the task's own queries).")
@click.option("--concept", "concepts", multiple=True,
              help="Concept partition to evaluate; repeatable (default: every built concept partition).")
@click.option("-k", type=click.IntRange(min=1), default=10, show_default=True, help="Top-k depth.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per concept.")
@device_option
@_apply(trust_options)
def eval_precision(store_path, inputs, concepts, k, as_json, device, trust_task, task_spec) -> None:
    """Concept precision@k: the fraction of a query's top-k training examples that share its
    value of the concept (DESIGN §4), with the chance level of a random top-k beside; and
    recall@k: those hits over min(k, training examples sharing the value)."""
    from gradindex.evaluate import evaluate_precision
    from gradindex.query_features import load_store_task
    from gradindex.store import FeatureStore

    store = FeatureStore.open(store_path, trust_task=trust_task, task=task_spec)
    queries = load_store_task(store).load_queries(inputs) if inputs is not None else None
    rows = [result.to_dict() for result in evaluate_precision(store, queries, concepts, k=k, device=device)]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    _echo_table([{"concept": r["concept"], "queries": r["queries"], f"precision@{k}": r["precision"],
                  "std": r["std"], f"recall@{k}": r["recall"], "chance": r["chance"]} for r in rows])


def _damping_text(damping: Any) -> str:
    """A damping as `info` and `learn-weights` print it: the number, or 'auto' with its per-group range."""
    if isinstance(damping, dict):
        values = list(damping.values())
        return f"auto, per group {min(values):.3g}…{max(values):.3g}" if values else "auto"
    return f"{damping:g}" if isinstance(damping, (int, float)) else str(damping)


def _objective_text(info: dict[str, Any]) -> str:
    """The learned weights' objective against uniform weights', e.g. 'objective: mean SNR 5.100 (uniform) -> 5.300'."""
    from gradindex.summary import learned_objective

    objective = learned_objective(info)
    return f"objective: {objective['name']} {objective['uniform']:.3f} (uniform) -> {objective['learned']:.3f}"


def _query_set(task, inputs: Path | None, split: str | None, default: str):
    """``(queries, measured, positions, description)``: the ``--inputs`` file's queries (measured: the same,
    positions None), else the task's default queries of ``--split`` (default ``default``), all default
    queries (what the LDS cache measures) and the split's positions among them."""
    from gradindex.task import default_queries, query_split_positions

    if inputs is not None:
        if split is not None:
            raise ConfigError("--split selects among the task's default queries; with --inputs the file's "
                              "queries are used, all of them")
        queries = task.load_queries(inputs)
        return queries, queries, None, f"{len(queries)} queries from {inputs}"
    import numpy as np
    import torch

    split = split or default
    dataset = default_queries(task)
    positions = (np.arange(len(dataset)) if split == "all"
                 else query_split_positions(task, len(dataset))[split])
    queries = dataset if split == "all" else torch.utils.data.Subset(dataset, positions.tolist())
    return queries, dataset, positions, f"the task's {split} split ({len(queries)} of its {len(dataset)} default queries)"


def _echo_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        click.echo("(no results)")
        return
    headers = list(rows[0])
    cells = [[_format(row.get(h)) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    click.echo("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for c in cells:
        click.echo("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


if __name__ == "__main__":
    main()
