"""Learn per-group importance weights from unlabeled queries (DESIGN §1.3).

In: a complete store, a :class:`~gradindex.config.LearnConfig`, query inputs
(default: the fit split of the task's held-out queries, :func:`~gradindex.task.task_queries`)
and a concept. Out:
:class:`~gradindex.weights.GroupWeights` (raw weights ``w_g``, mean 1, so uniform
weights are all ones), saved under ``manifest["weights"][concept]``.

No ground-truth attributions are used. With ``Q`` queries and a seeded
reference sample of ``R`` stored training examples:

1. Group scores ``S_g [Q, R] = −ψ_g(q)ᵀ φ_g(x_r)`` under the configured
   preconditioner (the query features of :mod:`gradindex.query_features`).
2. Example norm (``ExampleNorm``): each training example's scores are centred
   over the queries, and with ``STANDARDIZE`` (the default) also divided by
   their std over the queries, after the groups are combined. A training
   example with a large gradient norm then no longer tops every query: what
   counts is how much an example stands out for *this* query compared with the
   other queries.
3. Per-group normalisation: ``X_g = S_g / rms(S_g)``, so the optimised
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
   their LDS are in the README.

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

Deterministic for a fixed ``seed`` (query and reference samples; the
optimisation itself is deterministic CPU math on float32 scores).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from gradindex.config import ExampleNorm, LearnConfig, LearnMethod, QuerySplit, parse_enum
from gradindex.errors import ConfigError
from gradindex.projection import derive_seed
from gradindex.query_features import QueryFeaturizer
from gradindex.store import FeatureStore
from gradindex.task import dataset_metadata, has_concept_queries, query_digests, task_queries
from gradindex.weights import GroupWeights, save_weights

logger = logging.getLogger(__name__)

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


def objective(shares: torch.Tensor, normalised: torch.Tensor, config: LearnConfig,
              same: torch.Tensor | None = None) -> torch.Tensor:
    """The objective of the example-normed combination ``Σ_g p_g X_g`` (no regularisation):
    ``mean_q SNR``, or the top-k agreement when ``same [Q, Q]`` (queries sharing a value) is given."""
    combined = example_normed(torch.einsum("g,gqr->qr", shares, normalised), config.example_norm)
    if same is not None:
        return agreement(combined, same)
    return snr(combined, config.top_k).mean()


def fit_weights(scores: np.ndarray, config: LearnConfig, values: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Raw weights ``[G]`` (mean 1) maximising the regularised objective of ``scores [G, Q, R]``:
    the SNR, or with each query's concept value ``values [Q]`` the top-k agreement.

    Returns the weights and a dict of diagnostics (shares, objective values).
    """
    scores = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    if scores.ndim != 3 or min(scores.shape) < 1:
        raise ConfigError(f"weight learning: expected scores [groups, queries, references], got {tuple(scores.shape)}")
    if scores.shape[1] < 2 or scores.shape[2] < 2:
        raise ConfigError(f"weight learning needs at least 2 queries and 2 reference examples, got "
                          f"{scores.shape[1]} and {scores.shape[2]}")
    if config.example_norm is not ExampleNorm.NONE:
        scores = scores - scores.mean(1, keepdim=True)  # centring is linear: do it per group once
    rms = scores.pow(2).mean((1, 2)).sqrt()
    live = rms > 0
    normalised = scores[live] / rms[live, None, None]
    uniform = rms[live] / rms[live].sum()  # the shares of uniform raw weights (for the diagnostics)
    same = None
    if values is not None:
        values = np.asarray(values)
        if len(values) != scores.shape[1]:
            raise ConfigError(f"weight learning: {len(values)} query values for {scores.shape[1]} queries")
        same = torch.as_tensor(values[:, None] == values[None, :])
        if not (same & ~torch.eye(len(values), dtype=torch.bool)).any() or same.all():
            raise ConfigError("agreement weights need queries that share a concept value and queries that do not")
    prior = torch.full_like(uniform, 1.0 / len(uniform))  # equal shares: start and pull target
    theta = torch.zeros_like(prior)
    if same is not None:
        theta = _agreement_start(normalised, config, same)
    theta.requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=config.lr)
    for _ in range(config.steps):
        shares = torch.softmax(theta, 0)
        kl = (shares * (torch.log(shares) - torch.log(prior))).sum()
        loss = -objective(shares, normalised, config, same) + config.regularization * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        shares = torch.softmax(theta, 0)
        raw = torch.zeros(scores.shape[0], dtype=scores.dtype)
        raw[live] = shares / rms[live]
        weights = (raw / raw.mean()).numpy()
        all_shares = torch.zeros_like(raw)
        all_shares[live] = shares
        diagnostics = {
            "shares": all_shares.tolist(),
            "uniform_shares": (rms / rms.sum()).tolist(),
            "snr_uniform": float(objective(uniform, normalised, config)),
            "snr_learned": float(objective(shares, normalised, config)),
            **({"agreement_uniform": float(objective(uniform, normalised, config, same)),
                "agreement_learned": float(objective(shares, normalised, config, same))} if same is not None else {}),
        }
    return weights, diagnostics


def _agreement_start(normalised: torch.Tensor, config: LearnConfig, same: torch.Tensor) -> torch.Tensor:
    """Start logits for the agreement objective: half the shares on the group whose tilt scores best.

    The agreement is not concave in the shares; from equal shares, ascent can settle on a
    group that merely correlates with the concept (measured on the diffusion task), while
    the screen of G tilted points ``½·e_g + ½·p⁰`` finds the right basin.
    """
    count = normalised.shape[0]
    equal = torch.full((count,), 1.0 / count)
    with torch.no_grad():
        values = torch.stack([objective(0.5 * torch.eye(count)[g] + 0.5 * equal, normalised, config, same)
                              for g in range(count)])
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
    featurizer = QueryFeaturizer.open(store, concept, config.preconditioner, config.damping, device=device)
    try:
        source = ((query_source or "given") if queries is not None
                  else f"concept queries of {concept}" if has_concept_queries(featurizer.task, concept)
                  else split.value)
        if queries is None:
            queries = task_queries(featurizer.task, split, concept)
        chosen = query_sample(queries, config.num_queries, config.seed)
        method, values = _method_and_values(featurizer.task, chosen, concept, config.method)
        query_features = featurizer.group_features(chosen, show_progress=show_progress)
    finally:
        featurizer.close()
    _, reference = reference_sample(store, config.reference_size, config.seed)
    groups = store.groups
    weights, diagnostics = fit_weights(score_matrices(query_features, reference, groups), config, values)
    if not np.all(np.isfinite(weights)):
        raise ConfigError(f"weight learning diverged (non-finite weights) with lr {config.lr:g}; lower --lr")
    info = {
        "method": method.value,
        "config": config.to_dict(),
        "num_queries": len(chosen),
        "queries": {"source": source, "count": len(chosen), "digests": query_digests(chosen)},
        "reference_size": len(next(iter(reference.values()))),
        "shares": dict(zip(groups, diagnostics["shares"])),
        "uniform_shares": dict(zip(groups, diagnostics["uniform_shares"])),
        "snr_uniform": diagnostics["snr_uniform"],
        "snr_learned": diagnostics["snr_learned"],
        **{key: diagnostics[key] for key in ("agreement_uniform", "agreement_learned") if key in diagnostics},
        "seconds": round(time.perf_counter() - started, 3),
    }
    result = GroupWeights(concept, {g: float(w) for g, w in zip(groups, weights)}, info)
    logger.info("learned weights for concept %r: mean SNR %.3f (uniform %.3f)", concept,
                info["snr_learned"], info["snr_uniform"])
    if save:
        save_weights(store, result)
    return result


def _method_and_values(task, chosen: Sequence, concept: str,
                       method: LearnMethod) -> tuple[LearnMethod, np.ndarray | None]:
    """The objective to use and, for agreement, each chosen query's value of ``concept`` ``[Q]``."""
    values = dataset_metadata(task, chosen).get(concept) if concept != "all" else None
    if method is LearnMethod.AUTO:
        method = LearnMethod.AGREEMENT if values is not None else LearnMethod.SNR
    if method is LearnMethod.SNR:
        return method, None
    if values is None:
        raise ConfigError(
            f"agreement weights for concept {concept!r} need each query's value of it (the task's metadata of the "
            "queries, e.g. the prompts of generated queries); use --method snr"
        )
    return method, np.asarray(values)
