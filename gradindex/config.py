"""Frozen configuration dataclasses and the Enums they use, one per stage.

Each ``__post_init__`` validates its fields and names the offending field in the
message; ``to_dict()`` is what goes into ``manifest.json``; ``from_dict`` reads it
back. ``diff(a, b)`` lists differing fields (used to refuse reopening a store with
another configuration).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradindex.checks import (  # noqa: F401  (re-exported: the checks every config uses)
    DEVICE_TYPES, MAX_INDEX_DIM, NAME_PATTERN, check_index_dim, check_name, parse_device, parse_enum, require_at_most,
    require_number, require_positive,
)
from gradindex.errors import ConfigError


def gradindex_home() -> Path:
    """``$GRADINDEX_HOME`` (default ``~/.cache/gradindex``): this user's checkpoints, cache and trust records."""
    return Path(os.environ.get("GRADINDEX_HOME") or Path.home() / ".cache" / "gradindex")  # '' is unset, not "."


#: Gram damping relative to each group's mean eigenvalue, λ_g = damping · trace(G_g) / k_g. 0.1 measured
#: best (or within noise of best) for uniform-weight LDS on the digits MLP and CNN among 1e-3 … 1 (docs/benchmarks/lds.md).
DEFAULT_DAMPING = 0.1
#: ``damping="auto"``: chosen per group from the stored features (gradindex.weights.damping)
AUTO_DAMPING = "auto"
#: the label-free dampings a name may ask for (resolved by gradindex.weights.damping.resolve_damping):
#: ``auto`` (cross-validated likelihood), ``mp`` (each group's Marchenko–Pastur noise edge), ``pinv``
#: (λ = 0: the pseudo-inverse of the bare Gram), ``schedule`` (SOURCE-style λ ≈ 1/Σ_t η_t from the task's
#: :meth:`~gradindex.task.Task.learning_rates`)
NAMED_DAMPINGS = (AUTO_DAMPING, "mp", "pinv", "schedule")


class ProjectionKind(enum.Enum):
    """How a group's gradient is projected: E[PᵀP] = I for the random kinds."""

    GAUSSIAN = "gaussian"  # entries N(0, 1/k)
    RADEMACHER = "rademacher"  # entries ±1/√k
    IDENTITY = "identity"  # no projection: the full per-example gradient is stored


class Preconditioner(enum.Enum):
    """Query-side preconditioner ψ_g(q) = H_g⁻¹ φ_g(q) (DESIGN §1.2)."""

    IDENTITY = "identity"  # gradient dot product (TracIn at one checkpoint)
    GRAM = "gram"  # TRAK-style (ΦᵀΦ/N + λI)⁻¹ per group
    KFAC = "kfac"  # K-FAC per module, applied to the full query gradient before projection
    EKFAC = "ekfac"  # EK-FAC: K-FAC's eigenbases with corrected eigenvalues


class DampingCriterion(enum.Enum):
    """How ``damping="auto"`` picks each group's relative damping from the stored features alone."""

    CV_LIKELIHOOD = "cv-likelihood"  # K-fold held-out Gaussian likelihood under N(0, G + λI), per group
    CV_SHARED = "cv-shared"  # the same, one relative damping for all groups (summed likelihoods)
    LEDOIT_WOLF = "ledoit-wolf"  # Ledoit–Wolf shrinkage ρ as ρ / (1 − ρ)
    OAS = "oas"  # oracle-approximating shrinkage ρ as ρ / (1 − ρ)


class Normalize(enum.Enum):
    """What is done to each per-example gradient before it is projected (both sides)."""

    NONE = "none"
    ADAM = "adam"  # g ⊘ (√v̂ + ε) with the checkpoint's Adam second moment (LESS, TrackStar)


class StorageDtype(enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"


class IndexKind(enum.Enum):
    AUTO = "auto"  # flat while N·D ≤ AUTO_FLAT_LIMIT, else ivfpq
    FLAT = "flat"  # exact inner-product search (faiss.IndexFlatIP)
    IVF = "ivf"  # norm-banded inverted lists of raw vectors (exact scores of the probed cells)
    IVFPQ = "ivfpq"  # norm-banded inverted lists of product-quantized codes, exact re-rank
    HNSW = "hnsw"  # HNSW graph over the MIPS→L2 augmented vectors, exact re-rank


class Balance(enum.Enum):
    AUTO = "auto"  # on for the approximate kinds, off for flat
    ON = "on"  # store (G_g + λI)^(-1/2)-whitened blocks, query with the inverse transform
    OFF = "off"


AUTO_FLAT_LIMIT = 100_000_000  # N·D up to which `auto` builds an exact flat index

#: the reserved concept whose weights are always uniform: ``build-index --concept uniform`` indexes the
#: task's measurement ('all') with uniform weights beside the learned 'all' partition
UNIFORM_CONCEPT = "uniform"
#: what a concept (an index partition's folder name under STORE/indexes/) may look like


def setting_key(preconditioner: Any, damping: Any) -> str:
    """The key of an attribution setting, under which a concept's learned weights are kept:
    ``identity`` (damping plays no part) or ``gram@<damping>`` (``gram@0.1``); ``gram@auto`` for
    ``"auto"`` and for a per-group ``{group: damping}`` (what ``auto`` resolves to)."""
    kind = parse_enum(Preconditioner, preconditioner, "preconditioner")
    if kind is Preconditioner.IDENTITY:
        return kind.value
    if isinstance(damping, dict):
        return f"{kind.value}@{AUTO_DAMPING}"
    text = repr(float(damping)) if isinstance(damping, numbers.Real) and not isinstance(damping, bool) else str(damping)
    return f"{kind.value}@{text}"


def parse_damping(value: Any, field_name: str) -> float | str | dict[str, float]:
    """A relative Gram damping: a number :func:`check_damping` accepts, one of :data:`NAMED_DAMPINGS`
    (chosen without labels, :mod:`gradindex.weights.damping`) or a resolved ``{group: number}`` mapping."""
    if isinstance(value, str) and value.strip().lower() in NAMED_DAMPINGS:
        return value.strip().lower()
    if isinstance(value, dict):
        return {str(g): check_damping(v, f"{field_name}[{g!r}]") for g, v in value.items()}
    return check_damping(value, field_name)


#: Upper bounds of integer knobs: beyond them a value only exhausts memory or time (or overflows FAISS's
#: 32-bit C ints), never helps.
INT32_MAX = 2**31 - 1
MAX_NLIST = 1 << 16  # direction cells per norm band
MAX_BANDS = 32  # the top band would hold 2^-31 of the norms
MAX_HNSW_M = 512
MIN_HNSW_M = 2
MAX_LR = 100.0  # Adam steps on softplus weight logits: far beyond it every step overshoots (and 1e39 is not a float32)
MAX_REGULARIZATION = 1e6  # the pull towards uniform already dominates any objective (SNR is O(1)) far below it
MAX_EF = 1 << 16  # HNSW beam widths (efConstruction, efSearch)
MAX_STEPS = 100_000  # weight-learning Adam steps
MAX_MODELS = 100_000  # LDS retrained models
MIN_MODELS = 3
MAX_WORKERS = 1024  # local training processes


#: Largest relative Gram damping accepted: far beyond it (G + λI)⁻¹ is λ⁻¹·I to float precision, and
#: λ = damping · trace(G)/k would overflow float64 for huge values.
MAX_DAMPING = 1e6


def check_damping(value: Any, field_name: str = "damping") -> float:
    """The Gram damping (relative to each group's mean eigenvalue): a finite number in [0, MAX_DAMPING].

    The one place every stage (IndexConfig, LearnConfig, LDS rows, the CLI) validates it.
    """
    return require_number(value, field_name, minimum=0, maximum=MAX_DAMPING)


class _Config:
    """Shared ``to_dict``/``from_dict`` for the frozen config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, _Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = [list(item) if isinstance(item, tuple) else item for item in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        return cls(**data)


def diff(a: _Config, b: _Config) -> list[str]:
    """Names of the fields whose values differ between two configs of one type."""
    da, db = a.to_dict(), b.to_dict()
    return [name for name in da if da[name] != db.get(name)]


@dataclass(frozen=True)
class GroupRule(_Config):
    """Assign parameters whose full name matches ``pattern`` (a glob) to ``group``.

    ``group=None`` excludes the matched parameters from attribution. The first
    matching rule wins; unmatched parameters go to the group of their module.
    ``group`` may contain ``{param}`` (the full parameter name) and ``{module}``
    (its module's name), e.g. ``*.bias={param}`` splits every bias off its weight.
    """

    pattern: str
    group: str | None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError(f"GroupRule.pattern: expected a non-empty glob, got {self.pattern!r}")
        if self.group is not None and (not isinstance(self.group, str) or not self.group):
            raise ConfigError(f"GroupRule.group: expected a non-empty name or None, got {self.group!r}")

    @classmethod
    def parse(cls, text: str) -> "GroupRule":
        """Parse ``PATTERN=GROUP`` (``PATTERN=-`` excludes), as written on the command line."""
        pattern, sep, group = text.partition("=")
        if not sep or not pattern.strip() or not group.strip():
            raise ConfigError(
                f"group rule: expected PATTERN=GROUP (or PATTERN=- to exclude), got {text!r}"
            )
        group = group.strip()
        return cls(pattern=pattern.strip(), group=None if group == "-" else group)


@dataclass(frozen=True)
class ProjectionConfig(_Config):
    """Seeded random projection of each module block (DESIGN §1.1).

    ``proj_dim`` is the target dimension of every module block (a group that
    merges m modules has about m·proj_dim dimensions); ``group_dims`` overrides
    it per group as ``((group, dim), ...)``. Blocks whose gradient is no larger
    than their target are stored unprojected.

    Factorized blocks (linear, conv, embedding) are projected by
    ``proj_dim // factor_dim²`` stacked independent Kronecker heads of
    ``factor_dim × factor_dim`` each; ``factor_dim = √proj_dim`` is a single
    Kronecker product (LoGra). More, smaller heads estimate inner products with
    much less variance at the same output dimension (see projection.py).
    """

    kind: ProjectionKind = ProjectionKind.GAUSSIAN
    proj_dim: int = 256
    group_dims: tuple[tuple[str, int], ...] = ()
    seed: int = 0
    factor_dim: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", parse_enum(ProjectionKind, self.kind, "ProjectionConfig.kind"))
        require_positive(self.proj_dim, "ProjectionConfig.proj_dim", maximum=MAX_INDEX_DIM)
        pairs = tuple(tuple(item) for item in self.group_dims)
        for item in pairs:
            if len(item) != 2 or not isinstance(item[0], str):
                raise ConfigError(f"ProjectionConfig.group_dims: expected (group, dim) pairs, got {item!r}")
            require_positive(item[1], f"ProjectionConfig.group_dims[{item[0]!r}]", maximum=MAX_INDEX_DIM)
        object.__setattr__(self, "group_dims", pairs)
        require_positive(self.factor_dim, "ProjectionConfig.factor_dim", maximum=MAX_INDEX_DIM)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"ProjectionConfig.seed: expected a non-negative integer, got {self.seed!r}")

    def dim_for(self, group: str) -> int:
        return dict(self.group_dims).get(group, self.proj_dim)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProjectionConfig":
        data = dict(data)
        data["group_dims"] = tuple(tuple(item) for item in data.get("group_dims", ()))
        return super().from_dict(data)


@dataclass(frozen=True)
class FeaturizeConfig(_Config):
    """Everything that determines the stored training features."""

    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    group_rules: tuple[GroupRule, ...] = ()
    dtype: StorageDtype = StorageDtype.FLOAT32
    batch_size: int = 64
    shard_size: int = 100_000
    gram_max_dim: int = 8192
    normalize: Normalize = Normalize.NONE

    def __post_init__(self) -> None:
        object.__setattr__(self, "normalize", parse_enum(Normalize, self.normalize, "FeaturizeConfig.normalize"))
        if isinstance(self.projection, dict):
            object.__setattr__(self, "projection", ProjectionConfig.from_dict(self.projection))
        object.__setattr__(self, "dtype", parse_enum(StorageDtype, self.dtype, "FeaturizeConfig.dtype"))
        rules = tuple(GroupRule(**r) if isinstance(r, dict) else r for r in self.group_rules)
        object.__setattr__(self, "group_rules", rules)
        require_positive(self.batch_size, "FeaturizeConfig.batch_size")
        require_positive(self.shard_size, "FeaturizeConfig.shard_size")
        require_positive(self.gram_max_dim, "FeaturizeConfig.gram_max_dim")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["group_rules"] = [rule.to_dict() for rule in self.group_rules]
        if self.normalize is Normalize.NONE:  # stores (and run keys) without normalisation stay as they were
            del out["normalize"]
        return out


@dataclass(frozen=True)
class IndexConfig(_Config):
    """One index partition: concept, weights source, preconditioner, FAISS kind and build knobs.

    Zero means "choose from N and D" for ``nlist``, ``bands``, ``pq_bytes`` and ``train_size``
    (see :func:`gradindex.index.kinds.resolve_build`).
    """

    concept: str = "all"
    kind: IndexKind = IndexKind.AUTO
    preconditioner: Preconditioner = Preconditioner.GRAM
    damping: float | str | dict[str, float] = DEFAULT_DAMPING
    device: str = "cpu"
    balance: Balance = Balance.AUTO
    nlist: int = 0  # direction cells per norm band (ivf, ivfpq)
    bands: int = 0  # norm bands (ivf, ivfpq)
    pq_bytes: int = 0  # bytes per PQ code (ivfpq, 8-bit sub-quantizers); must divide D
    hnsw_m: int = 32  # graph degree (hnsw)
    ef_construction: int = 80  # (hnsw)
    train_size: int = 0  # training sample rows (seeded, streamed from the store)
    seed: int = 0
    shards_per_part: int = 0  # store shards per index part (0 = one part for all)
    keep_vectors: bool | None = None  # float16 re-rank vectors beside each part (None: ivfpq only)

    def __post_init__(self) -> None:
        check_name(self.concept, "IndexConfig.concept")
        object.__setattr__(self, "kind", parse_enum(IndexKind, self.kind, "IndexConfig.kind"))
        object.__setattr__(
            self, "preconditioner", parse_enum(Preconditioner, self.preconditioner, "IndexConfig.preconditioner")
        )
        object.__setattr__(self, "balance", parse_enum(Balance, self.balance, "IndexConfig.balance"))
        object.__setattr__(self, "damping", parse_damping(self.damping, "IndexConfig.damping"))
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"IndexConfig.device: expected cpu, cuda or auto, got {self.device!r}")
        limits = {"nlist": MAX_NLIST, "bands": MAX_BANDS, "pq_bytes": MAX_INDEX_DIM, "seed": INT32_MAX - 1}
        for name in ("nlist", "bands", "pq_bytes", "train_size", "shards_per_part", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"IndexConfig.{name}: expected a non-negative integer (0 = auto), got {value!r}")
            require_at_most(value, limits.get(name), f"IndexConfig.{name}")
        require_positive(self.hnsw_m, "IndexConfig.hnsw_m", maximum=MAX_HNSW_M)
        if self.hnsw_m < MIN_HNSW_M:  # FAISS's HNSW with M = 1 has no level multiplier (1/ln 1): it segfaults
            raise ConfigError(f"IndexConfig.hnsw_m: expected at least {MIN_HNSW_M} graph neighbours, got {self.hnsw_m}")
        require_positive(self.ef_construction, "IndexConfig.ef_construction", maximum=MAX_EF)
        if self.keep_vectors not in (None, True, False):
            raise ConfigError(f"IndexConfig.keep_vectors: expected true, false or null, got {self.keep_vectors!r}")


@dataclass(frozen=True)
class SearchConfig(_Config):
    """Query-time knobs of an approximate index (0 = the kind's default; flat ignores them)."""

    nprobe: int = 0  # ivf, ivfpq: scan budget in directions' worth of vectors (N/nlist each); default 16
    ef_search: int = 0  # HNSW beam width; default 256
    rerank: int = 0  # candidates per query re-scored exactly (ivfpq; hnsw with kept vectors); default 20·k
    prune: bool = True  # skip norm bands whose bound ‖q‖·max‖x‖ cannot beat the current k-th score
    adaptive: bool = True  # ivf, ivfpq: a query not certified after nprobe keeps scanning, up to max_probe
    max_probe: int = 0  # adaptive budget in directions' worth of vectors, nprobe included; default 4·nprobe
    certified: bool = False  # exact top-k (up to ties) at whatever cost: ivf/ivfpq scan to certification, hnsw flat

    def __post_init__(self) -> None:
        limits = {"nprobe": MAX_NLIST, "ef_search": MAX_EF, "rerank": INT32_MAX, "max_probe": INT32_MAX}
        for name in ("nprobe", "ef_search", "rerank", "max_probe"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"SearchConfig.{name}: expected a non-negative integer (0 = default), got {value!r}")
            require_at_most(value, limits[name], f"SearchConfig.{name}")
        for name in ("prune", "adaptive", "certified"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"SearchConfig.{name}: expected true or false, got {getattr(self, name)!r}")


def _require_seed(value: Any, field_name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{field_name}: expected a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class LDSConfig(_Config):
    """Retraining for the linear datamodeling score (DESIGN §4).

    Model ``j`` trains on a seeded random subset of ``round(fraction · N)``
    training examples (subset ``j`` depends only on ``seed``, ``j`` and ``N``, so
    raising ``num_models`` keeps the models already trained). ``training_seed``
    fixes the task's training seed for every model; ``None`` gives model ``j``
    its own seed derived from ``(seed, j)`` (initialisation and batch-order noise
    included, as in TRAK's evaluation).

    ``runs_per_subset`` ``R`` trains each subset ``R`` times with different training
    seeds and averages the measurements (the de-noised ground truth of TRAK and
    dattri); run 0 is the model a single-run evaluation trains, so raising ``R``
    keeps every model already trained.
    """

    num_models: int = 64
    fraction: float = 0.5
    seed: int = 0
    training_seed: int | None = None
    runs_per_subset: int = 1

    def __post_init__(self) -> None:
        require_positive(self.num_models, "LDSConfig.num_models", maximum=MAX_MODELS)
        require_positive(self.runs_per_subset, "LDSConfig.runs_per_subset", maximum=MAX_MODELS)
        if self.runs_per_subset > 1 and self.training_seed is not None:
            raise ConfigError("LDSConfig.runs_per_subset: several runs per subset need a training seed per run; "
                              "drop training_seed (--training-seed)")
        if self.num_models < MIN_MODELS:  # 1 model: every LDS read 0 ± 0; 2: each query's LDS is ±1
            raise ConfigError(f"LDSConfig.num_models: the LDS rank-correlates across retrained models; expected at "
                              f"least {MIN_MODELS} (64 for a real estimate), got {self.num_models}")
        object.__setattr__(self, "fraction", require_number(self.fraction, "LDSConfig.fraction", above=0, below=1))
        _require_seed(self.seed, "LDSConfig.seed")
        if self.training_seed is not None:
            _require_seed(self.training_seed, "LDSConfig.training_seed")


#: ``gradindex tune``'s damping grid (relative, as everywhere): 0 is the pseudo-inverse of the bare Gram
TUNE_DAMPINGS = (0.0, 1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
#: weightings ``tune`` scores: uniform weights and the label-free learned objectives
TUNE_METHODS = ("uniform", "snr", "ssl")


@dataclass(frozen=True)
class TuneConfig(_Config):
    """``gradindex tune``: the retraining budget and the grid it scores (see :mod:`gradindex.eval.tune`).

    ``budget`` trainings = ``budget // runs_per_subset`` masks × ``runs_per_subset`` runs (default 16 × 2);
    the grid: every :class:`Preconditioner` (identity once, the others at each damping) × ``methods``."""

    budget: int = 32
    runs_per_subset: int = 2
    dampings: tuple[float, ...] = TUNE_DAMPINGS
    methods: tuple[str, ...] = TUNE_METHODS
    replicates: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive(self.runs_per_subset, "TuneConfig.runs_per_subset", maximum=MAX_MODELS)
        require_positive(self.budget, "TuneConfig.budget", maximum=MAX_MODELS)
        if self.budget // self.runs_per_subset < 4:
            raise ConfigError(f"TuneConfig.budget: expected at least 4 subsets x {self.runs_per_subset} runs = "
                              f"{4 * self.runs_per_subset} trainings (a Spearman over fewer models says nothing), "
                              f"got {self.budget}")
        object.__setattr__(self, "dampings", tuple(check_damping(d, "TuneConfig.dampings") for d in self.dampings))
        if not self.methods or not self.dampings or not set(self.methods) <= set(TUNE_METHODS):
            raise ConfigError(f"TuneConfig.methods: expected some of {', '.join(TUNE_METHODS)} (and some dampings), "
                              f"got {list(self.methods)}")
        object.__setattr__(self, "methods", tuple(self.methods))
        require_positive(self.replicates, "TuneConfig.replicates")
        _require_seed(self.seed, "TuneConfig.seed")

    @property
    def num_models(self) -> int:
        return self.budget // self.runs_per_subset


class QuerySplit(enum.Enum):
    """Which of a task's default queries (:meth:`~gradindex.task.Task.query_splits`) a stage uses."""

    FIT = "fit"  # what weights (and other label-free choices) are fitted on
    EVAL = "eval"  # what attribution quality (LDS) is measured on; disjoint from FIT
    ALL = "all"


class ExampleNorm(enum.Enum):
    """What weight learning does to each reference training example's scores across the queries."""

    AUTO = "auto"  # none for an explicit --method ssl (the paper), standardize otherwise
    NONE = "none"
    CENTER = "center"  # subtract its mean over queries (it no longer tops every query)
    STANDARDIZE = "standardize"  # ... and divide by its std over queries (its gradient norm no longer counts)


class GroupNorm(enum.Enum):
    """How weight learning scales the groups' scores before combining them (see gradindex.weights.learn)."""

    AUTO = "auto"  # none for an explicit --method ssl (the paper), rms otherwise
    RMS = "rms"  # unit-rms groups; shares start at and are pulled (KL) towards equal shares
    NONE = "none"  # raw scores; weights start uniform, pulled by λ‖w‖² (the paper)


class LearnMethod(enum.Enum):
    """The weight-learning objective (see :mod:`gradindex.weights.learn`)."""

    AUTO = "auto"  # AGREEMENT for a concept whose values the queries carry, else SNR
    SNR = "snr"  # a few training examples stand out per query (DESIGN §1.3)
    AGREEMENT = "agreement"  # queries sharing the concept's value share their top-k (DESIGN §1.4)
    SSL = "ssl"  # the paper's objective: normalised mean of each query's current top-k (DESIGN §1.3)


@dataclass(frozen=True)
class LearnConfig(_Config):
    """Learning per-group weights from unlabeled queries (DESIGN §1.3; see :mod:`gradindex.weights.learn`).

    The weights are learned for one attribution setting (``preconditioner``,
    ``damping``); an index built with another setting refuses them.
    """

    preconditioner: Preconditioner = Preconditioner.GRAM
    damping: float | str | dict[str, float] = DEFAULT_DAMPING
    num_queries: int = 256
    reference_size: int = 2048
    top_k: int = 10
    example_norm: ExampleNorm = ExampleNorm.AUTO
    group_norm: GroupNorm = GroupNorm.AUTO
    regularization: float = 0.1
    steps: int = 200
    lr: float = 0.05
    seed: int = 0
    method: LearnMethod = LearnMethod.AUTO

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "preconditioner", parse_enum(Preconditioner, self.preconditioner, "LearnConfig.preconditioner")
        )
        object.__setattr__(self, "method", parse_enum(LearnMethod, self.method, "LearnConfig.method"))
        object.__setattr__(self, "example_norm", parse_enum(ExampleNorm, self.example_norm, "LearnConfig.example_norm"))
        object.__setattr__(self, "group_norm", parse_enum(GroupNorm, self.group_norm, "LearnConfig.group_norm"))
        for name in ("num_queries", "reference_size", "top_k", "steps"):
            require_positive(getattr(self, name), f"LearnConfig.{name}", maximum=MAX_STEPS if name == "steps" else None)
        object.__setattr__(self, "damping", parse_damping(self.damping, "LearnConfig.damping"))
        object.__setattr__(self, "regularization", require_number(self.regularization, "LearnConfig.regularization",
                                                                  minimum=0, maximum=MAX_REGULARIZATION))
        object.__setattr__(self, "lr", require_number(self.lr, "LearnConfig.lr", above=0, maximum=MAX_LR))
        _require_seed(self.seed, "LearnConfig.seed")
        if self.top_k >= self.reference_size:
            raise ConfigError(f"LearnConfig.top_k: expected fewer than reference_size ({self.reference_size}) "
                              f"training examples, got {self.top_k} (the top-k would be the whole sample: SNR 0)")


#: ``serve`` limits: a batch waits at most a minute for company (1e308 ms never answered), and a request
#: body is at most 4 GiB (1e308 MiB overflowed the byte count: every request failed)
MAX_WAIT_MS = 60_000.0
MAX_BODY_MB = 4096.0


@dataclass(frozen=True)
class ServeConfig(_Config):
    """``gradindex serve``: where to listen, how to batch, what a request may hold."""

    host: str = "127.0.0.1"  # loopback: only this machine can connect
    port: int = 8000  # 0: any free port (the server prints the one it got)
    max_batch: int = 64  # queries featurized and searched together
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    max_body_mb: float = 16.0  # request body limit (413 above it)
    max_queries: int = 1024  # queries in one request (400 above it)
    max_k: int = 1000  # largest k a request may ask for

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"ServeConfig.host: expected an address such as 127.0.0.1, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"ServeConfig.port: expected a TCP port 0..65535, got {self.port!r}")
        for name in ("max_batch", "max_queries", "max_k"):
            require_positive(getattr(self, name), f"ServeConfig.{name}")
        for name, value, least, most in (("max_wait_ms", self.max_wait_ms, 0.0, MAX_WAIT_MS),
                                          ("max_body_mb", self.max_body_mb, 1e-6, MAX_BODY_MB)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                    or not least <= value <= most:
                raise ConfigError(f"ServeConfig.{name}: expected a finite number in [{least:g}, {most:g}], "
                                  f"got {value!r}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))
