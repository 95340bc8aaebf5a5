"""Learn per-group importance weights from unlabeled queries (DESIGN §1.3).

In: a complete store, a :class:`~gradindex.config.LearnConfig`, query inputs
(default: the task's held-out queries) and a concept. Out:
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

Deterministic for a fixed ``seed`` (query and reference samples; the
optimisation itself is deterministic CPU math on float32 scores).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from gradindex.config import ExampleNorm, LearnConfig
from gradindex.errors import ConfigError
from gradindex.projection import derive_seed
from gradindex.query_features import QueryFeaturizer
from gradindex.store import FeatureStore
from gradindex.weights import GroupWeights, save_weights

logger = logging.getLogger(__name__)


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


def objective(shares: torch.Tensor, normalised: torch.Tensor, config: LearnConfig) -> torch.Tensor:
    """``mean_q SNR`` of the example-normed combination ``Σ_g p_g X_g`` (no regularisation)."""
    combined = torch.einsum("g,gqr->qr", shares, normalised)
    return snr(example_normed(combined, config.example_norm), config.top_k).mean()


def fit_weights(scores: np.ndarray, config: LearnConfig) -> tuple[np.ndarray, dict]:
    """Raw weights ``[G]`` (mean 1) maximising the regularised SNR objective of ``scores [G, Q, R]``.

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
    prior = torch.full_like(uniform, 1.0 / len(uniform))  # equal shares: start and pull target
    theta = torch.zeros_like(prior, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=config.lr)
    for _ in range(config.steps):
        shares = torch.softmax(theta, 0)
        kl = (shares * (torch.log(shares) - torch.log(prior))).sum()
        loss = -objective(shares, normalised, config) + config.regularization * kl
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
        }
    return weights, diagnostics


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
) -> GroupWeights:
    """Learn ``concept``'s group weights from unlabeled queries (default: the task's held-out queries)."""
    started = time.perf_counter()
    featurizer = QueryFeaturizer.open(store, concept, config.preconditioner, config.damping, device=device)
    try:
        if queries is None:
            queries = featurizer.task.query_dataset()
        chosen = query_sample(queries, config.num_queries, config.seed)
        query_features = featurizer.group_features(chosen, show_progress=show_progress)
    finally:
        featurizer.close()
    _, reference = reference_sample(store, config.reference_size, config.seed)
    groups = store.groups
    weights, diagnostics = fit_weights(score_matrices(query_features, reference, groups), config)
    info = {
        "method": "snr",
        "config": config.to_dict(),
        "num_queries": len(chosen),
        "reference_size": len(next(iter(reference.values()))),
        "shares": dict(zip(groups, diagnostics["shares"])),
        "uniform_shares": dict(zip(groups, diagnostics["uniform_shares"])),
        "snr_uniform": diagnostics["snr_uniform"],
        "snr_learned": diagnostics["snr_learned"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    result = GroupWeights(concept, {g: float(w) for g, w in zip(groups, weights)}, info)
    logger.info("learned weights for concept %r: mean SNR %.3f (uniform %.3f)", concept,
                info["snr_learned"], info["snr_uniform"])
    if save:
        save_weights(store, result)
    return result
