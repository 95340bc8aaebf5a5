"""Query-side features: query inputs → per-group query features ``−ψ_g(q)``.

In: a complete store, its task and checkpoint, a preconditioner setting and a
concept. Out: ``{group: [n, k_g]}`` float32 with ``−ψ_g(q) = −H_g⁻¹ P_g ∇m(q)``
(``∇m_c`` for a concept ``c``): the same groups, seeds and projections as the
stored training features, so ``−ψ_g(q)ᵀ φ_g(x)`` is group ``g``'s score of
training example ``x`` (positive: training on ``x`` raises ``m(q)``).

Used by the query stage (:mod:`gradindex.query.attributor`, which scales and concatenates
the blocks into ``u(q)``), by weight learning and by LDS evaluation, which need
the per-group blocks apart. :class:`QueryFeaturizer` refuses a checkpoint whose
parameters or parameter groups differ from the ones the store was built from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gradindex import faults
from gradindex.config import DEFAULT_DAMPING, UNIFORM_CONCEPT, FeaturizeConfig, Normalize, Preconditioner
from gradindex.devices import resolve_device
from gradindex.errors import ConfigError, StoreMismatchError, TaskConsentError
from gradindex.features.run import featurize_rows, planned_group_entries, resolve_groups
from gradindex.features.checkpoints import ensemble_spec_code
from gradindex.features.factor_fit import ensure_factors
from gradindex.features.normalize import make_projector
from gradindex.features.kfac import FactorInverse, is_factor_preconditioner
from gradindex.features.transformed import factor_query_projector
from gradindex.features.precondition import Damping, QueryPreconditioner
from gradindex.features.projection import check_projection_format
from gradindex.store.feature_store import FeatureStore, open_store
from gradindex.store.trust import own_store_verdict
from gradindex.task import Task, is_builtin_spec, load_task, model_fingerprint, resolve_spec, training_refused
from gradindex.checks import short_repr


def load_store_task(store: FeatureStore, trust_task: bool = False, task: str | None = None) -> Task:
    """The task the store was featurized from (rebuilt from the manifest's spec).

    A store is data (someone may hand you one), and its manifest names the code to run. Code
    that is not built in (a ``file.py:Class`` or ``module:Class`` spec) runs only with consent:
    ``trust_task`` (``--trust-task``), or ``task`` (``--task SPEC``) naming the same spec; either may
    also come with the store (``FeatureStore.open(path, trust_task=..., task=...)``; a store that
    ``featurize`` returns carries its own task). A store this user featurized on this machine from a
    task file that is unchanged since needs none (:func:`~gradindex.store.trust.own_store_verdict`).
    Otherwise a one-line :class:`TaskConsentError` saying which (a foreign store, a changed file).
    """
    spec = store.manifest["task"]
    name = spec["task"]
    code = ensemble_spec_code(spec)  # a multi-checkpoint store runs its base task's code
    given = task if task is not None else store.task
    if given is not None and resolve_spec(given) not in (resolve_spec(name), resolve_spec(code)):
        raise TaskConsentError(f"{store.path}: the store's task is {name!r}, not {given!r}; pass the store's own "
                               "spec with --task, or --trust-task to run the store's task")
    if given is None and not (trust_task or store.trust_task or is_builtin_spec(code)):
        own, why = own_store_verdict(store.path, store.manifest)
        if not own:
            raise TaskConsentError(
                f"{store.path}: the store names task code {name!r} that is not built in and {why}; run it only "
                f"if you trust it: pass --task '{name}' or --trust-task (Python: trust_task=True)"
            )
    options = spec.get("options", {})
    if not store_task_consented(store, trust_task, task):
        for key, value in options.items():
            if names_a_path(value):
                raise TaskConsentError(
                    f"{store.path}: the store's task {name!r} option {key}={short_repr(value, 80)} names a path "
                    "outside the store; read it only if you trust the store: pass --trust-task"
                )
    return load_task(name, options)


def store_task_consented(store: FeatureStore, trust_task: bool = False, task: str | None = None) -> bool:
    """Whether the user consented to what the store's task does beyond reading the store: task code,
    options naming paths, training a model (``--trust-task``, ``--task SPEC``, a store that
    ``featurize`` returned, or a store this user featurized on this machine from an unchanged task
    file, :func:`~gradindex.store.trust.own_store_verdict`)."""
    if trust_task or store.trust_task or task is not None or store.task is not None:
        return True
    return own_store_verdict(store.path, store.manifest)[0]


def names_a_path(value: object) -> bool:
    """Whether a task option value names a file or folder (a store's options must not read one unasked)."""
    if not isinstance(value, str) or not value:
        return False
    return "/" in value or "\\" in value or value.startswith(("~", ".")) or os.path.exists(value)


def check_concept(task: Task, concept: str) -> None:
    """``concept`` must be ``all``, ``uniform`` (the measurement of ``all``, uniform weights) or one of
    the task's concepts."""
    if concept not in ("all", UNIFORM_CONCEPT) and concept not in task.concepts:
        raise ConfigError(f"concept {concept!r}: the task measures {', '.join(('all', *task.concepts))} "
                          f"(and {UNIFORM_CONCEPT!r} is 'all' with uniform weights)")


def measurement_function(task: Task, concept: str):
    """``(batch, model) -> [B]``: the task's measurement ``m`` (concept ``all`` or ``uniform``) or ``m_c``."""
    check_concept(task, concept)
    if concept in ("all", UNIFORM_CONCEPT):
        return task.compute_measurement
    return lambda batch, model: task.concept_measurement(batch, model, concept)


class QueryFeaturizer:
    """Warm model, projector and preconditioner computing ``−ψ_g(q)`` for one store and concept."""

    def __init__(self, store: FeatureStore, task: Task, model: torch.nn.Module, device: torch.device,
                 preconditioner: Preconditioner = Preconditioner.GRAM, damping: Damping = DEFAULT_DAMPING,
                 concept: str = "all"):
        self.store = store
        self.task = task
        self.model = model
        self.device = device
        self.concept = concept
        self.measurement = measurement_function(task, concept)
        check_projection_format(store.manifest["projection_format"], str(store.path))
        config = FeaturizeConfig.from_dict(store.manifest["config"])
        groups = resolve_groups(task, model, config)
        if planned_group_entries(groups, config.projection) != store.manifest["groups"]:
            raise StoreMismatchError(
                f"{store.path}: the model's parameter groups (or their projected dims) differ from the store's; "
                "featurize again"
            )
        self.groups = [g.name for g in groups]
        if is_factor_preconditioner(preconditioner):  # H⁻¹ acts on the full gradient, before the projection
            if config.normalize is not Normalize.NONE:
                raise ConfigError(f"{store.path}: preconditioner {preconditioner.value} on Adam-normalised features "
                                  "is not supported (the factors describe raw gradients); use identity or gram")
            self.store, factors = ensure_factors(store, task, model)
            inverse = FactorInverse(factors, groups, preconditioner.value, damping, device)
            self.projector = factor_query_projector(model, groups, config.projection, inverse, device)
            self.preconditioner = QueryPreconditioner(Preconditioner.IDENTITY)
            return
        self.projector = make_projector(task, model, groups, config, store.manifest.get("checkpoint"), device)
        self.preconditioner = QueryPreconditioner(
            preconditioner, store.read_gram() if preconditioner is Preconditioner.GRAM else None, damping, self.groups
        )

    @classmethod
    def open(
        cls,
        store: str | Path | FeatureStore,
        concept: str = "all",
        preconditioner: Preconditioner = Preconditioner.GRAM,
        damping: Damping = DEFAULT_DAMPING,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        trust_task: bool = False,
    ) -> "QueryFeaturizer":
        """``trust_task``: run the task code the store names even if it is not built in (see
        :func:`load_store_task`)."""
        store = open_store(store)
        task = load_store_task(store, trust_task)
        check_concept(task, concept)
        torch_device = resolve_device(device)
        refuse = None if checkpoint is not None or store_task_consented(store, trust_task) else (
            f"{store.path}: the store's task {store.manifest['task']['task']!r} has no checkpoint on this machine and "
            "would train a model to answer; a store never makes a command train: pass --checkpoint, featurize the "
            "task yourself first (that trains and caches its model), or pass --trust-task to let it train")
        with faults.stage(f"load model ({type(task).__name__}.load_model)"), training_refused(task, refuse):
            model = task.load_model(checkpoint or store.manifest.get("checkpoint")).to(torch_device).eval()
        fingerprint = model_fingerprint(model)
        if fingerprint != store.manifest["model_fingerprint"]:
            raise StoreMismatchError(
                f"{store.path} was featurized from another checkpoint (model fingerprint "
                f"{store.manifest['model_fingerprint'][:12]}…, this one {fingerprint[:12]}…); "
                "query with the store's checkpoint or featurize this one"
            )
        return cls(store, task, model, torch_device, preconditioner, damping, concept)

    def group_features(self, dataset: Sequence, batch_size: int = 64,
                       show_progress: bool = False) -> dict[str, np.ndarray]:
        """``{group: −ψ_g(q) [n, k_g]}`` (float32) for every item of ``dataset``."""
        if len(dataset) == 0:
            raise ConfigError("no queries: the query inputs hold no items")
        with tqdm(total=len(dataset), desc="query features", unit="q", disable=not show_progress) as bar, \
                faults.stage(f"featurize {len(dataset)} queries"):
            feats = featurize_rows(self.task, self.model, dataset, range(len(dataset)), self.projector, batch_size,
                                   self.device, measurement=self.measurement, bar=bar)
        psi = self.preconditioner({g: torch.from_numpy(feats[g]) for g in self.groups})
        return {g: (-psi[g]).numpy() for g in self.groups}

    def close(self) -> None:
        self.projector.close()


def query_group_features(store: FeatureStore, dataset: Sequence, concept: str = "all",
                         preconditioner: Preconditioner = Preconditioner.GRAM, damping: Damping = DEFAULT_DAMPING,
                         batch_size: int = 64, device: str = "cpu") -> dict[str, np.ndarray]:
    """One-shot ``{group: −ψ_g(q) [n, k_g]}`` float32 numpy for ``dataset`` (opens and closes a featurizer)."""
    featurizer = QueryFeaturizer.open(store, concept, preconditioner, damping, device=device)
    try:
        return featurizer.group_features(dataset, batch_size)
    finally:
        featurizer.close()


def precondition_features(store: FeatureStore, raw: Mapping[str, np.ndarray], preconditioner: Preconditioner,
                          damping: Damping) -> dict[str, np.ndarray]:
    """Apply a preconditioner to unpreconditioned query features ``{group: [Q, k_g]}`` (float32 numpy).
    K-FAC / EK-FAC act before the projection: their query features come from a :class:`QueryFeaturizer`."""
    if is_factor_preconditioner(preconditioner):
        raise ConfigError(f"preconditioner {preconditioner.value} acts on full query gradients, not on projected "
                          "features: open a QueryFeaturizer with it")
    if preconditioner is Preconditioner.IDENTITY:
        return dict(raw)
    groups = list(raw)
    apply = QueryPreconditioner(preconditioner, store.read_gram(), damping, groups)
    return {g: block.numpy() for g, block in apply({g: torch.from_numpy(np.asarray(raw[g], np.float32))
                                                       for g in groups}).items()}
