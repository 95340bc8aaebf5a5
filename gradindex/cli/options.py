"""Flags, parameter types and small helpers shared by several commands (no torch, no FAISS)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from gradindex.config import DEFAULT_DAMPING, LDSConfig, LearnConfig
from gradindex.errors import ConfigError


LEARN_DEFAULTS, LDS_DEFAULTS = LearnConfig(), LDSConfig()  # defaults shown by the flags


class StoreLocation(click.Path):
    """A store: a local path (a ``Path``, click's checks) or a URI such as ``s3://bucket/prefix``,
    passed on as the string it is (``Path`` would fold ``s3://`` into ``s3:/``)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and re.match(r"[a-zA-Z][a-zA-Z0-9+.-]+://", value):
            return value
        return super().convert(value, param, ctx)


STORE_LOCATION = StoreLocation(path_type=Path)


def parse_pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    pairs = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what}: expected KEY=VALUE, got {text!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def parse_task_options(values: tuple[str, ...]) -> dict[str, Any]:
    options = {}
    for key, value in parse_pairs(values, "--task-option").items():
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def parse_group_dims(values: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    dims = []
    for group, value in parse_pairs(values, "--group-dim").items():
        try:
            dims.append((group, int(value)))
        except ValueError:
            raise ConfigError(f"--group-dim: expected GROUP=INTEGER, got {group}={value}") from None
    return tuple(dims)


def progress_enabled(ctx: click.Context) -> bool:
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


def parse_device_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from gradindex.config import parse_device

    return parse_device(value, "--device", allow_auto=True)


device_option = click.option("--device", default="cpu", show_default=True, callback=parse_device_option,
                             help="Torch device for gradients (cpu, cuda, cuda:1, mps, auto = cuda if present).")


class DampingType(click.ParamType):
    """A relative Gram damping on the command line: a number or a name (``auto``, ``mp``, ``pinv``, ``schedule``)."""

    name = "NUMBER|auto|mp|pinv|schedule"

    def convert(self, value, param, ctx):
        from gradindex.config import NAMED_DAMPINGS

        if isinstance(value, (int, float)) or value in NAMED_DAMPINGS:
            return value
        text = str(value).strip().lower()
        if text in NAMED_DAMPINGS:
            return text
        try:
            return float(text)
        except ValueError:
            self.fail(f"expected a non-negative number or one of {', '.join(NAMED_DAMPINGS)}, got {value!r}",
                      param, ctx)


DAMPING = DampingType()
DAMPING_HELP = ("Gram damping, relative to each group's mean eigenvalue (0: pseudo-inverse); 'auto' chooses it "
                 "from the stored training features (cross-validated likelihood, no labels; recorded in the "
                 "manifest per group, `info` shows it); 'mp': each group's Marchenko-Pastur noise edge; 'pinv': "
                 "0; 'schedule': 1/sum of the task's learning rates (Task.learning_rates).")

preconditioner_options = [
    click.option("--preconditioner", type=click.Choice(["gram", "identity", "kfac", "ekfac"]), default="gram",
                 show_default=True,
                 help="Query-side preconditioner: per-group Gram inverse (TRAK-style), none (grad-dot), or K-FAC / "
                      "EK-FAC on the full query gradient (factors fitted on first use; see fit-factors)."),
    click.option("--damping", type=DAMPING, default=DEFAULT_DAMPING, show_default=True, help=DAMPING_HELP),
]
def tuned_default(ctx: click.Context, manifest: dict[str, Any], concept: str, preconditioner: str,
                  damping: Any) -> tuple[str, Any, dict[str, Any] | None]:
    """``(preconditioner, damping, tuned)``: the setting ``gradindex tune`` recorded for the store
    (``manifest["tuned"]``, for concept ``all``) when neither ``--preconditioner`` nor ``--damping`` was
    given on the command line, else the flags' values (``tuned`` ``None``)."""
    from click.core import ParameterSource

    tuned = manifest.get("tuned")
    given = any(ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)
                for name in ("preconditioner", "damping"))
    if given or concept != "all" or not isinstance(tuned, dict) or "preconditioner" not in tuned:
        return preconditioner, damping, None
    return tuned["preconditioner"], DEFAULT_DAMPING if tuned.get("damping") is None else tuned["damping"], tuned


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


def check_timeout(ctx: click.Context, param: click.Parameter, value: float) -> float:
    from gradindex.config import require_number

    return require_number(value, "--ray-timeout", above=0)


ray_timeout_option = click.option("--ray-timeout", type=float, default=30.0, show_default=True, metavar="SECONDS",
                                  callback=check_timeout,
                                  help="With --ray ADDRESS: give up when nothing answers there within this time.")


def connect_ray(address: str | None, timeout: float) -> None:
    """The install hint and an unreachable address as one line, before any work."""
    from gradindex.features.distributed import check_ray_address, import_ray

    import_ray()
    check_ray_address(address, timeout)


def apply_options(options):
    def decorator(func):
        for option in reversed(options):
            func = option(func)
        return func
    return decorator


def featurize_config(proj_dim, group_dims, proj_kind, seed, factor_dim, group_rules, **fields):
    from gradindex.config import FeaturizeConfig, GroupRule, ProjectionConfig

    projection = ProjectionConfig(kind=proj_kind, proj_dim=proj_dim, group_dims=parse_group_dims(group_dims), seed=seed,
                                  factor_dim=factor_dim)
    return FeaturizeConfig(projection=projection, group_rules=tuple(GroupRule.parse(r) for r in group_rules), **fields)


def parse_shards(text: str | None) -> list[int] | None:
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
    click.option("--max-probe", type=int, default=0, show_default=True,
                 help="ivf/ivfpq adaptive search: a query whose own evidence does not certify its top-k after "
                      "--nprobe keeps scanning cells in bound order, up to this many directions' worth of vectors "
                      "in all (0 = 4 × nprobe)."),
    click.option("--no-adaptive", "no_adaptive", is_flag=True,
                 help="ivf/ivfpq: stop after --nprobe / --rerank, certified or not."),
    click.option("--exact-certified", "exact_certified", is_flag=True,
                 help="The exact top-k (up to ties) at whatever cost: ivf/ivfpq scan cells in bound order until "
                      "the k-th exact score beats every bound left; hnsw scans its vectors flat."),
]


def search_config(nprobe, ef_search, rerank, no_prune, max_probe=0, no_adaptive=False, exact_certified=False):
    from gradindex.config import SearchConfig

    return SearchConfig(nprobe=nprobe, ef_search=ef_search, rerank=rerank, prune=not no_prune, max_probe=max_probe,
                        adaptive=not no_adaptive, certified=exact_certified)


def setting_text(config: dict[str, Any]) -> str:
    """``gram (damping 0.1)`` or ``identity``: the damping only where it applies."""
    if config.get("preconditioner") in ("kfac", "ekfac"):
        return f"{config['preconditioner']} (damping {damping_text(config.get('damping'))})"
    if config.get("preconditioner") == "gram":
        requested = config.get("damping_requested")
        auto = requested == "auto" or isinstance(config.get("damping"), dict)
        text = damping_text(config.get("damping")) if auto else config.get("damping")
        if auto and isinstance(requested, str) and requested != "auto":
            text = str(text).replace("auto", requested, 1)  # mp / schedule: resolved per group like auto
        return f"gram (damping {text})"
    return str(config.get("preconditioner"))


def damping_text(damping: Any) -> str:
    """A damping as `info` and `learn-weights` print it: the number, or 'auto' with its per-group range."""
    if isinstance(damping, dict):
        values = list(damping.values())
        return f"auto, per group {min(values):.3g}…{max(values):.3g}" if values else "auto"
    return f"{damping:g}" if isinstance(damping, (int, float)) else str(damping)


def objective_text(info: dict[str, Any]) -> str:
    """The learned weights' objective against uniform weights', e.g. 'objective: mean SNR 5.100 (uniform) -> 5.300'."""
    from gradindex.eval.summary import learned_objective

    objective = learned_objective(info)
    return f"objective: {objective['name']} {objective['uniform']:.3f} (uniform) -> {objective['learned']:.3f}"


def query_set(task, inputs: Path | None, split: str | None, default: str):
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


def echo_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        click.echo("(no results)")
        return
    headers = list(rows[0])
    cells = [[format_value(row.get(h)) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    click.echo("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for c in cells:
        click.echo("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

