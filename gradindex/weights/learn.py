"""Learn per-group importance weights from unlabeled queries (DESIGN §1.3).

In: a complete store, a :class:`~gradindex.config.LearnConfig`, query inputs
(default: the fit split of the task's held-out queries, :func:`~gradindex.task.task_queries`)
and a concept. Out:
:class:`~gradindex.weights.group_weights.GroupWeights` (raw weights ``w_g``, mean 1, so uniform
weights are all ones), saved under ``manifest["weights"][concept]``.

No ground-truth attributions are used. With ``Q`` queries and a seeded
reference sample of ``R`` stored training examples:

1. Group scores ``S_g [Q, R] = −ψ_g(q)ᵀ φ_g(x_r)`` under the configured
   preconditioner (the query features of :mod:`gradindex.features.query`).
2. Example norm (``ExampleNorm``): each training example's scores are centred
   over the queries, and with ``STANDARDIZE`` (what ``auto`` means for SNR and
   agreement) also divided by their std over the queries, after the groups are combined. A training
   example with a large gradient norm then no longer tops every query: what
   counts is how much an example stands out for *this* query compared with the
   other queries.
3. Per-group normalisation (``GroupNorm.RMS``): ``X_g = S_g / rms(S_g)``, so the optimised
   *shares* ``p = softmax(θ)`` are comparable across groups; the raw weight is
   ``w_g ∝ p_g / rms(S_g)``. (Uniform raw weights have shares ``∝ rms(S_g)``:
   a group with a large gradient norm dominates them.)
4. Objective, maximised by Adam over ``θ`` from equal shares ``p⁰ = 1/G``
   (``steps``, ``lr``)::

       mean_q SNR(q) − λ · KL(p ‖ p⁰),
       SNR(q) = (mean of the top-k of τ(q, ·) − mean τ(q, ·)) / std τ(q, ·),
       τ = example-normed Σ_g p_g X_g.

   The SNR is invariant to rescaling all scores, and with the start and the
   pull at equal shares the result does not depend on any group's units either
   (rescaling one group's scores rescales only its raw weight, inversely).
   Without the example norm the SNR's arg-max piles the weight onto a
   low-dimensional, heavy-tailed group (a bias); the variants we measured and
   their LDS are in docs/benchmarks/lds.md.

Agreement (``LearnMethod.AGREEMENT``, DESIGN §1.4), for a concept ``c`` whose value
each query carries (we control the prompts of generated queries, so no training
label is used): queries that share the value of ``c`` should share their top-k
under ``w^c``, queries that do not should not. Each query's example-normed scores
are z-scored over the reference sample and turned into a soft top-k,
``π_q = softmax(β z_q)`` (β = :data:`AGREEMENT_BETA`); the objective replacing the
SNR is ``mean_{q≠q', same value} cos(π_q, π_q') − mean_{different value} cos(π_q, π_q')``
(the contrast stops every query from agreeing on the same few hubs). The objective is
not concave in the shares, so ascent starts from the best of ``G`` screened points
(half the shares on one group). ``AUTO`` uses it
for a concept whose values the queries carry, and the SNR otherwise; on the
``diffusion`` task it is the one that finds each concept's blocks (tools/bench_concepts.py).

SSL (``LearnMethod.SSL``): the objective of Li, Le, Xu & Salzmann, "Learning to Weight Parameters
for Training Data Attribution" (arXiv 2506.05647; the stored copy we could search holds its abstract,
not its method section, so the loss below follows the issue's summary of it). Weights on the query
side scale each group's scores, ``τ(q, x) = Σ_g w_g S_g(q, x)``, and the per-query loss is::

    L_q(w) = −(1/‖τ(q, ·)‖₂) · mean of the top-k of τ(q, ·),

the top-k being each query's current ranking, recomputed every step (pseudo-positives), the norm
over the reference sample. ``--method ssl`` alone is the paper's recipe exactly: raw group scores
(``GroupNorm.NONE``, no example norm), ``w = softmax(θ)`` from uniform ``w`` (the unweighted
baseline), Adam on ``mean_q L_q(w) + λ‖w‖²``. What is invariant: ``L_q`` does not change when every
score is multiplied by one positive number, so neither does the result. Multiplying one group's
scores by ``c`` is the same as multiplying its weight by ``c`` for the loss term, but the start
(uniform ``w``) and the pull ``λ‖w‖²`` are in raw units, so the learned attribution is *not*
invariant to one group's scale — as the unweighted grad-dot baseline it starts from is not. Under
the Gram preconditioner with relative damping a group's scores do not change when its gradients
are rescaled, so there the question does not arise.

The guards are separate knobs (``example_norm``, ``group_norm``; ``auto`` resolves them per method,
:func:`resolve_setting`): the SNR and agreement objectives use the example norm and per-group rms
normalisation (start and KL pull at equal shares, so one group's scale changes only its own raw
weight), and the paper's loss can be combined with them (``--example-norm standardize
--group-norm rms``). Which combination ``method="auto"`` uses (:data:`DEFAULT_METHOD`) is measured
by ``tools/bench_quality.py`` (docs/benchmarks/quality.md).

Deterministic for a fixed ``seed`` (query and reference samples; the
optimisation itself is deterministic CPU math on float32 scores).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from gradindex.config import (
    ExampleNorm, GroupNorm, LearnConfig, LearnMethod, Preconditioner, QuerySplit, parse_enum,
)
from gradindex.weights.damping import resolve_damping
from gradindex.errors import ConfigError, StoreMismatchError
from gradindex.features.projection import derive_seed
from gradindex.features.kfac import is_factor_preconditioner
from gradindex.features.query import QueryFeaturizer, precondition_features
from gradindex.store.feature_store import FeatureStore
from gradindex.task import dataset_metadata, has_concept_queries, query_digests, task_queries
from gradindex.weights.group_weights import GroupWeights, save_weights

logger = logging.getLogger(__name__)

#: what ``method="auto"`` learns with for a concept whose values the queries do not carry
#: (docs/benchmarks/quality.md)
DEFAULT_METHOD = LearnMethod.SNR
#: sharpness of the agreement objective's soft top-k, on scores z-scored over the reference sample
AGREEMENT_BETA = 3.0


# -- the math: score matrices in, weights out ------------------------------------------------------
def score_matrices(query_features: Mapping[str, np.ndarray], reference_features: Mapping[str, np.ndarray],
                   groups: Sequence[str]) -> np.ndarray:
    """``S [G, Q, R]`` (float32) with ``S_g = query_g @ reference_gᵀ``."""
    return np.stack([np.asarray(query_features[g], np.float32) @ np.asarray(reference_features[g], np.float32).T
                     for g in groups])


def snr(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-row ``(mean of the top-k − mean) / std`` of ``scores [Q, R]`` -> ``[Q]``."""
    k = min(top_k, scores.shape[1])
    top = torch.topk(scores, k, dim=1).values.mean(1)
    return (top - scores.mean(1)) / scores.std(1).clamp_min(torch.finfo(scores.dtype).tiny)


def example_normed(scores: torch.Tensor, norm: ExampleNorm) -> torch.Tensor:
    """Apply the example norm to combined scores ``[Q, R]`` (columns are training examples)."""
    if norm is ExampleNorm.NONE:
        return scores
    centred = scores - scores.mean(0, keepdim=True)
    if norm is ExampleNorm.CENTER:
        return centred
    return centred / centred.std(0, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def agreement(scores: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Top-k agreement of ``scores [Q, R]``: mean soft-top-k cosine of query pairs that share a
    value (``same [Q, Q]`` bool) minus that of pairs that do not."""
    z = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    soft = torch.softmax(AGREEMENT_BETA * z, dim=1)
    soft = soft / soft.norm(dim=1, keepdim=True)
    cosine = soft @ soft.T
    pairs = same & ~torch.eye(len(same), dtype=torch.bool)
    return torch.log(cosine[pairs].mean()) - torch.log(cosine[~same].mean())


def ssl_loss(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-row ``−(mean of the top-k) / ‖row‖₂`` of ``scores [Q, R]`` -> ``[Q]`` (the paper's ``L_q``)."""
    k = min(top_k, scores.shape[1])
    top = torch.topk(scores, k, dim=1).values.mean(1)
    return -top / scores.norm(dim=1).clamp_min(torch.finfo(scores.dtype).tiny)


def resolve_setting(config: LearnConfig, has_values: bool = False) -> tuple[LearnMethod, ExampleNorm, GroupNorm]:
    """The objective, example norm and group normalisation ``config`` asks for, with ``auto`` resolved:
    method ``auto`` is agreement when the queries carry the concept's value (``has_values``), else
    :data:`DEFAULT_METHOD`; the knobs' ``auto`` is the paper's recipe (none, none) for an explicit
    ``ssl`` and the guarded recipe (standardize, rms) otherwise."""
    method = config.method
    if method is LearnMethod.AUTO:
        method = LearnMethod.AGREEMENT if has_values else DEFAULT_METHOD
    paper = config.method is LearnMethod.SSL
    example_norm = config.example_norm
    if example_norm is ExampleNorm.AUTO:
        example_norm = ExampleNorm.NONE if paper else ExampleNorm.STANDARDIZE
    group_norm = config.group_norm
    if group_norm is GroupNorm.AUTO:
        group_norm = GroupNorm.NONE if paper else GroupNorm.RMS
    return method, example_norm, group_norm


def _checked_scores(scores: np.ndarray) -> torch.Tensor:
    scores = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    if scores.ndim != 3 or min(scores.shape) < 1:
        raise ConfigError(f"weight learning: expected scores [groups, queries, references], got {tuple(scores.shape)}")
    if scores.shape[1] < 2 or scores.shape[2] < 2:
        raise ConfigError(f"weight learning needs at least 2 queries and 2 reference examples, got "
                          f"{scores.shape[1]} and {scores.shape[2]}")
    return scores


class _Objective:
    """The objective of a combination ``Σ_g p_g X_g`` of the (scaled) group scores ``X [G, Q, R]``:
    mean SNR, mean ``−L_q`` (ssl) or, with ``same [Q, Q]``, the top-k agreement; higher is better."""

    def __init__(self, method: LearnMethod, example_norm: ExampleNorm, top_k: int, same: torch.Tensor | None):
        self.method, self.example_norm, self.top_k, self.same = method, example_norm, top_k, same

    def __call__(self, shares: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
        combined = example_normed(torch.einsum("g,gqr->qr", shares, scaled), self.example_norm)
        if self.method is LearnMethod.AGREEMENT:
            return agreement(combined, self.same)
        if self.method is LearnMethod.SSL:
            return -ssl_loss(combined, self.top_k).mean()
        return snr(combined, self.top_k).mean()


def objective(shares: torch.Tensor, normalised: torch.Tensor, config: LearnConfig,
              same: torch.Tensor | None = None) -> torch.Tensor:
    """The objective of the example-normed combination ``Σ_g p_g X_g`` (no regularisation) under
    ``config``'s resolved setting (agreement when ``same [Q, Q]``, queries sharing a value, is given)."""
    method, example_norm, _ = resolve_setting(config, same is not None)
    return _Objective(method, example_norm, config.top_k, same)(shares, normalised)


def fit_weights(scores: np.ndarray, config: LearnConfig, values: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Raw weights ``[G]`` (mean 1) maximising the regularised objective of ``scores [G, Q, R]`` under
    ``config``'s resolved setting (:func:`resolve_setting`; ``values [Q]``, each query's concept value,
    for agreement).

    ``GroupNorm.RMS``: the groups are scaled to unit rms, the shares ``p = softmax(θ)`` start at and are
    pulled (``λ·KL(p ‖ 1/G)``) towards equal shares, ``w_g ∝ p_g / rms_g``. ``GroupNorm.NONE`` (the
    paper): the raw scores, ``w = softmax(θ)`` from uniform ``w`` with the pull ``λ‖w‖²``. A group
    whose scores are all zero gets weight 0. Returns the weights and a dict of diagnostics (shares,
    the objective of uniform and of learned weights as ``<snr|ssl|agreement>_<uniform|learned>``).
    """
    method, example_norm, group_norm = resolve_setting(config, values is not None)
    scores = _checked_scores(scores)
    if example_norm is not ExampleNorm.NONE:
        scores = scores - scores.mean(1, keepdim=True)  # centring is linear: do it per group once
    rms = scores.pow(2).mean((1, 2)).sqrt()
    live = rms > 0
    same = None
    if method is LearnMethod.AGREEMENT:
        same = _same_value(values, scores.shape[1])
    objective_of = _Objective(method, example_norm, config.top_k, same)
    normalise = group_norm is GroupNorm.RMS
    # RMS: unit-rms groups; NONE: one common factor (the objectives do not see it)
    scaled = scores[live] / (rms[live, None, None] if normalise else rms[live].max())
    uniform = rms[live] / rms[live].sum() if normalise else torch.full_like(rms[live], 1.0 / int(live.sum()))
    prior = torch.full_like(uniform, 1.0 / len(uniform))
    theta = torch.zeros_like(prior)
    if same is not None and normalise:
        theta = _agreement_start(scaled, objective_of)
    theta.requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=config.lr)
    for _ in range(config.steps):
        shares = torch.softmax(theta, 0)
        if normalise:
            pull = (shares * (torch.log(shares) - torch.log(prior))).sum()
        else:
            pull = shares.pow(2).sum()
        loss = -objective_of(shares, scaled) + config.regularization * pull
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        shares = torch.softmax(theta, 0)
        raw = torch.zeros(scores.shape[0], dtype=scores.dtype)
        raw[live] = shares / rms[live] if normalise else shares
        contribution = raw * rms  # each group's share of the combined score scale
        name = method.value
        diagnostics = {
            "shares": (contribution / contribution.sum()).tolist(),
            "uniform_shares": (rms / rms.sum()).tolist(),
            f"{name}_uniform": float(objective_of(uniform, scaled)),
            f"{name}_learned": float(objective_of(shares, scaled)),
            "setting": {"method": name, "example_norm": example_norm.value, "group_norm": group_norm.value},
        }
        if method is not LearnMethod.SNR:  # the SNR of both, for comparison across methods
            snr_of = _Objective(LearnMethod.SNR, example_norm, config.top_k, None)
            diagnostics.update(snr_uniform=float(snr_of(uniform, scaled)), snr_learned=float(snr_of(shares, scaled)))
    return (raw / raw.mean()).numpy(), diagnostics


def _same_value(values: np.ndarray | None, count: int) -> torch.Tensor:
    """``[Q, Q]``: which queries share the concept's value (agreement needs both kinds of pairs)."""
    if values is None:
        raise ConfigError("agreement weights need each query's value of the concept")
    values = np.asarray(values)
    if len(values) != count:
        raise ConfigError(f"weight learning: {len(values)} query values for {count} queries")
    same = torch.as_tensor(values[:, None] == values[None, :])
    if not (same & ~torch.eye(len(values), dtype=torch.bool)).any() or same.all():
        raise ConfigError("agreement weights need queries that share a concept value and queries that do not")
    return same


def _agreement_start(normalised: torch.Tensor, objective_of: _Objective) -> torch.Tensor:
    """Start logits for the agreement objective: half the shares on the group whose tilt scores best.

    The agreement is not concave in the shares; from equal shares, ascent can settle on a
    group that merely correlates with the concept (measured on the diffusion task), while
    the screen of G tilted points ``½·e_g + ½·p⁰`` finds the right basin.
    """
    count = normalised.shape[0]
    equal = torch.full((count,), 1.0 / count)
    with torch.no_grad():
        values = torch.stack([objective_of(0.5 * torch.eye(count)[g] + 0.5 * equal, normalised) for g in range(count)])
    return torch.log(0.5 * torch.eye(count)[int(values.argmax())] + 0.5 * equal)


# -- the stage: store in, weights in the manifest out -------------------------------------------------
def reference_sample(store: FeatureStore, size: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A seeded sample of ``min(size, N)`` stored rows: ``(sample_ids [R], {group: [R, k_g]})``."""
    total = store.num_samples
    rng = np.random.default_rng(derive_seed(seed, "reference"))
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False))
    ids, feats, offset = [], {g: [] for g in store.groups}, 0
    for shard_ids, shard_feats, _ in store.iter_shards():
        local = chosen[(chosen >= offset) & (chosen < offset + len(shard_ids))] - offset
        offset += len(shard_ids)
        if len(local):
            ids.append(shard_ids[local])
            for g in store.groups:
                feats[g].append(shard_feats[g][local])
    return np.concatenate(ids), {g: np.concatenate(blocks) for g, blocks in feats.items()}


def query_sample(dataset: Sequence, size: int, seed: int) -> Sequence:
    """A seeded subset of ``min(size, len(dataset))`` queries (all of them when fewer)."""
    if len(dataset) <= size:
        return dataset
    rng = np.random.default_rng(derive_seed(seed, "queries"))
    return torch.utils.data.Subset(dataset, np.sort(rng.choice(len(dataset), size=size, replace=False)).tolist())


def learn_weights(
    store: FeatureStore,
    config: LearnConfig = LearnConfig(),
    queries: Sequence | None = None,
    concept: str = "all",
    save: bool = True,
    device: str = "cpu",
    show_progress: bool = True,
    split: QuerySplit | str = QuerySplit.FIT,
    query_source: str | None = None,
) -> GroupWeights:
    """Learn ``concept``'s group weights from unlabeled queries (default: the ``split`` of the task's
    default queries, the fit split; for a concept, ``task.concept_queries(concept)`` where the task
    defines it). ``info["queries"]`` records where they came from (``query_source``
    for given queries) and a digest per query used (:func:`~gradindex.task.query_digests`), so that
    evaluation can warn about overlap."""
    started = time.perf_counter()
    split = parse_enum(QuerySplit, split, "learn_weights split")
    reference_size = min(config.reference_size, store.num_samples)
    if config.top_k >= reference_size:
        raise ConfigError(f"top_k {config.top_k}: expected fewer than the {reference_size} training examples of the "
                          "reference sample (the top-k would be all of them, an SNR of 0); lower --top-k")
    # K-FAC / EK-FAC precondition the full query gradient: their query features come preconditioned
    factor = is_factor_preconditioner(config.preconditioner)
    featurizer = QueryFeaturizer.open(store, concept, config.preconditioner if factor else Preconditioner.IDENTITY,
                                      config.damping, device=device)
    try:
        source = ((query_source or "given") if queries is not None
                  else f"concept queries of {concept}" if has_concept_queries(featurizer.task, concept)
                  else split.value)
        if queries is None:
            queries = task_queries(featurizer.task, split, concept)
        chosen = query_sample(queries, config.num_queries, config.seed)
        method, values = _method_and_values(featurizer.task, chosen, concept, config.method)
        raw = featurizer.group_features(chosen, show_progress=show_progress)
    finally:
        featurizer.close()
    result = learn_from_features(featurizer.store, raw, config, concept, method, values, preconditioned=factor)
    result.info["queries"] = {"source": source, "count": len(chosen), "digests": query_digests(chosen)}
    result.info["seconds"] = round(time.perf_counter() - started, 3)
    if save:
        save_weights(store, result)
    return result


def learn_from_features(store: FeatureStore, raw_query_features: Mapping[str, np.ndarray],
                        config: LearnConfig = LearnConfig(), concept: str = "all",
                        method: LearnMethod | None = None, values: np.ndarray | None = None,
                        preconditioned: bool = False) -> GroupWeights:
    """Weights from unpreconditioned query features ``{group: −φ_g(q) [Q, k_g]}`` (the identity
    setting of :class:`~gradindex.features.query.QueryFeaturizer`) and a seeded reference sample of
    the store; ``config.damping`` ``"auto"`` is resolved here (:mod:`gradindex.weights.damping`).

    ``method`` ``None`` means ``config.method`` with ``AUTO`` read as agreement when ``values [Q]``
    (each query's concept value) are given and SNR otherwise. ``preconditioned``: the features are
    already ``−ψ_g(q)`` of ``config``'s setting (K-FAC / EK-FAC). Nothing is saved.
    """
    if method is not None:
        config = dataclasses.replace(config, method=method) if method is not config.method else config
    damping = resolve_damping(store, config.damping, config.preconditioner)
    query_features = (dict(raw_query_features) if preconditioned
                      else precondition_features(store, raw_query_features, config.preconditioner, damping))
    _, reference = reference_sample(store, config.reference_size, config.seed)
    groups = store.groups
    scores = score_matrices(query_features, reference, groups)
    for group, matrix in zip(groups, scores):  # NaN in, NaN shares out: refuse before fitting
        if not np.isfinite(np.asarray(matrix)).all():
            raise StoreMismatchError(f"group {group}: the query-by-training score matrix holds NaN or inf (NaN in the "
                                     "store's features or Gram matrices, checksums intact); featurize again")
    resolved, _, _ = resolve_setting(config, values is not None)
    weights, diagnostics = fit_weights(scores, config, values if resolved is LearnMethod.AGREEMENT else None)
    if not np.all(np.isfinite(weights)):
        raise ConfigError(f"weight learning diverged (non-finite weights) with lr {config.lr:g} and regularization "
                          f"{config.regularization:g}; lower --lr or --regularization")
    setting = {**config.to_dict(), "damping": damping}  # the resolved damping: what the index must use
    info = {
        "method": resolved.value,
        "setting": diagnostics.pop("setting"),
        "config": setting,
        **({"damping_requested": config.damping} if isinstance(config.damping, str) else {}),
        "num_queries": len(next(iter(raw_query_features.values()))),
        "reference_size": len(next(iter(reference.values()))),
        "shares": dict(zip(groups, diagnostics.pop("shares"))),
        "uniform_shares": dict(zip(groups, diagnostics.pop("uniform_shares"))),
        **diagnostics,
    }
    result = GroupWeights(concept, {g: float(w) for g, w in zip(groups, weights)}, info)
    logger.info("learned %s weights for concept %r: objective %.4f (uniform %.4f)", resolved.value, concept,
                info[f"{resolved.value}_learned"], info[f"{resolved.value}_uniform"])
    return result


def _method_and_values(task, chosen: Sequence, concept: str,
                       method: LearnMethod) -> tuple[LearnMethod, np.ndarray | None]:
    """The objective to use and, for agreement, each chosen query's value of ``concept`` ``[Q]``."""
    values = dataset_metadata(task, chosen).get(concept) if concept != "all" else None
    if method is LearnMethod.AUTO:
        method = LearnMethod.AGREEMENT if values is not None else LearnMethod.SNR
    if method in (LearnMethod.SNR, LearnMethod.SSL):
        return method, None
    if values is None:
        raise ConfigError(
            f"agreement weights for concept {concept!r} need each query's value of it (the task's metadata of the "
            "queries, e.g. the prompts of generated queries); use --method snr or ssl"
        )
    return method, np.asarray(values)
