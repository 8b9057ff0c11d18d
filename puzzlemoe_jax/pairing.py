"""Which experts of a layer to merge.

Pairing within a layer (``choose_pairs``) minimises the summed relative merge error of the pairs
(estimated on a fixed subsample of elements), by greedy matching refined with 2-opt swaps.
``ratio`` is the fraction of expert memory saved: each merged pair stores one matrix instead of
two, so ``ratio * E`` pairs are merged (0.5 merges every expert); the cheapest pairs go first.
Pair costs are estimated with ``merge.merge_rule``, the rule the merge itself applies.

Other pairings (``MergeConfig.pairing``): "sequential" ((0,1), (2,3), ...); "random" (a seeded
shuffle per layer, the paper's default); "cosine" (highest cosine similarity of the flattened
signed weights); "coactivation" (experts the router selects together most often, from
calibration counts, so a top-k token reads fewer packed matrices at batch 1; with
``coactivation_weight`` < 1 blended with the merge error, both scaled to [0, 1]).
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from puzzlemoe_jax.merge import MergeConfig, _importance, _scores, merge_rule


@jax.jit
def _pair_costs_row(w_row, w_all, imp_row, imp_all, threshold):
    """Relative squared merge error of expert `row` paired with each expert: [E] (f32, no rounding)."""
    a = jnp.abs(w_row)[None]
    b = jnp.abs(w_all)
    similar, i_wins, mag = merge_rule(a, b, *_scores(a, b, imp_row[None], imp_all), threshold)
    err_a = jnp.where(similar | i_wins, mag - a, a)
    err_b = jnp.where(similar | ~i_wins, mag - b, b)
    num = jnp.sum(imp_row[None] * err_a ** 2 + imp_all * err_b ** 2, axis=-1)
    den = jnp.sum(imp_row[None] * a ** 2 + imp_all * b ** 2, axis=-1)
    return num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)


@jax.jit
def _sample(w, idx):
    """Elements ``idx`` of each expert's flattened matrix, in f32: [E, len(idx)]."""
    return w.reshape(w.shape[0], -1)[:, idx].astype(jnp.float32)


def pair_costs(weights: Mapping[str, jax.Array], config: MergeConfig = MergeConfig(),
               importance: Mapping[str, jax.Array] | None = None) -> np.ndarray:
    """[E, E] matrix of summed relative merge errors over the matrices (diagonal = inf)."""
    rng = np.random.default_rng(0)
    samples, imps = [], []
    for name, w in weights.items():
        e, k, n = w.shape
        idx = np.sort(rng.choice(k * n, size=min(config.pairing_sample, k * n), replace=False))
        samples.append(jnp.asarray(w.reshape(e, k * n)[:, idx], jnp.float32) if isinstance(w, np.ndarray)
                       else _sample(w, jnp.asarray(idx, jnp.int32)))   # numpy is sampled on the host
        if config.saliency != "magnitude":
            imps.append(_importance(config, (importance or {}).get(name), k)[..., 0][:, idx // n])
        else:
            imps.append(jnp.ones((e, idx.size), jnp.float32))
    w_all, imp_all = jnp.concatenate(samples, axis=1), jnp.concatenate(imps, axis=1)
    thr = jnp.float32(config.max_threshold)
    cost = np.stack([np.asarray(_pair_costs_row(w_all[r], w_all, imp_all[r], imp_all, thr))
                     for r in range(w_all.shape[0])])
    np.fill_diagonal(cost, np.inf)
    return cost


def min_cost_matching(cost: np.ndarray) -> list[tuple[int, int]]:
    """Perfect matching (one expert left out if E is odd) of low total cost: greedy, then 2-opt."""
    e = cost.shape[0]
    free, pairs = set(range(e)), []
    for flat in np.argsort(np.triu(cost, 1) + np.tril(np.full_like(cost, np.inf)), axis=None):
        i, j = divmod(int(flat), e)
        if i < j and i in free and j in free:
            pairs.append((i, j))
            free -= {i, j}
    improved = True
    while improved:
        improved = False
        for p in range(len(pairs)):
            for q in range(p + 1, len(pairs)):
                (a, b), (c, d) = pairs[p], pairs[q]
                now = cost[a, b] + cost[c, d]
                for new in (((a, c), (b, d)), ((a, d), (b, c))):
                    if cost[new[0]] + cost[new[1]] < now - 1e-12:
                        pairs[p], pairs[q] = (tuple(sorted(new[0])), tuple(sorted(new[1])))
                        now, improved = cost[new[0]] + cost[new[1]], True
                        (a, b), (c, d) = pairs[p], pairs[q]
    return pairs


def pairs_for_ratio(num_experts: int, ratio: float) -> int:
    """How many pairs to merge to save ``ratio`` of the expert memory (0 <= ratio <= 0.5)."""
    if not 0.0 <= ratio <= 0.5:
        raise ValueError(f"ratio must be in [0, 0.5] (pairwise merging saves at most half), got {ratio}")
    return min(int(math.floor(ratio * num_experts + 0.5)), num_experts // 2)


def cosine_costs(weights: Mapping[str, jax.Array]) -> np.ndarray:
    """[E, E] of 1 - cosine similarity of the experts' flattened signed weights (diagonal = inf)."""
    flat = np.concatenate([np.asarray(w, np.float32).reshape(w.shape[0], -1) for w in weights.values()], 1)
    flat /= np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-30)
    cost = 1.0 - (flat @ flat.T).astype(np.float64)
    np.fill_diagonal(cost, np.inf)
    return cost


def coactivation_costs(coactivation, merge_cost: np.ndarray | None = None, weight: float = 1.0) -> np.ndarray:
    """[E, E] pair cost: ``weight * (1 - C/max C) + (1 - weight) * merge/max merge`` (diagonal = inf),
    with C the calibration tokens that select both experts."""
    c = np.asarray(coactivation, np.float64).copy()
    np.fill_diagonal(c, 0.0)
    cost = weight * (1.0 - c / max(c.max(), 1e-30))
    if weight < 1.0:
        m = np.where(np.isfinite(merge_cost), merge_cost, 0.0)
        cost = cost + (1.0 - weight) * m / max(m.max(), 1e-30)
    np.fill_diagonal(cost, np.inf)
    return cost


def pair_share(ids: np.ndarray, pairs: np.ndarray, num_experts: int) -> dict:
    """How top-k selections ``ids [T, k]`` meet a pairing: {"matrices_per_token": mean number of
    distinct weight matrices (pairs or unpaired experts) read per token, "shared_fraction": share of
    tokens with two selected experts in one pair}."""
    unit = np.arange(num_experts)
    for p, (i, j) in enumerate(np.asarray(pairs).reshape(-1, 2)):
        unit[i] = unit[j] = num_experts + p
    u = np.sort(unit[np.asarray(ids)], axis=-1)
    distinct = 1 + np.sum(u[:, 1:] != u[:, :-1], axis=-1)
    return {"matrices_per_token": float(distinct.mean()),
            "shared_fraction": float(np.mean(distinct < u.shape[-1])), "tokens": int(u.shape[0])}


def choose_pairs(weights: Mapping[str, jax.Array], n_pairs: int, config: MergeConfig = MergeConfig(),
                 importance: Mapping[str, jax.Array] | None = None, coactivation=None,
                 layer: int = 0) -> np.ndarray:
    """Pick ``n_pairs`` disjoint expert pairs to merge: int32 [n_pairs, 2], each row (i < j).
    ``coactivation [E, E]`` (calibration) is needed by ``pairing="coactivation"``; ``layer`` seeds
    ``pairing="random"`` together with ``config.seed``."""
    e = next(iter(weights.values())).shape[0]
    if n_pairs > e // 2:
        raise ValueError(f"cannot merge {n_pairs} disjoint pairs out of {e} experts")
    if n_pairs == 0:
        return np.zeros((0, 2), np.int32)
    if config.pairing == "sequential":
        return np.arange(2 * n_pairs, dtype=np.int32).reshape(n_pairs, 2)
    if config.pairing == "random":
        perm = np.random.default_rng([config.seed, layer]).permutation(e)[:2 * n_pairs].reshape(n_pairs, 2)
        return np.asarray(sorted(map(tuple, np.sort(perm, axis=1))), np.int32).reshape(n_pairs, 2)
    if config.pairing == "cosine":
        cost = cosine_costs(weights)
    elif config.pairing == "coactivation":
        if coactivation is None or np.shape(coactivation) != (e, e):
            raise ValueError(f"pairing='coactivation' needs calibration coactivation counts of shape ({e}, {e})")
        merge_cost = pair_costs(weights, config, importance) if config.coactivation_weight < 1 else None
        cost = coactivation_costs(coactivation, merge_cost, config.coactivation_weight)
    else:
        cost = pair_costs(weights, config, importance)
    pairs = sorted(min_cost_matching(cost), key=lambda p: cost[p])[:n_pairs]
    return np.asarray(sorted(pairs), np.int32).reshape(n_pairs, 2)
