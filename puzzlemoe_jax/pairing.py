"""Which experts of a layer to merge.

Pairing within a layer (``choose_pairs``) minimises the summed relative merge error of the pairs
(estimated on a fixed subsample of elements), by greedy matching refined with 2-opt swaps.
``ratio`` is the fraction of expert memory saved: each merged pair stores one matrix instead of
two, so ``ratio * E`` pairs are merged (0.5 merges every expert); the cheapest pairs go first.
Pair costs are estimated with ``merge.merge_rule``, the rule the merge itself applies.
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


def pair_costs(weights: Mapping[str, jax.Array], config: MergeConfig = MergeConfig(),
               importance: Mapping[str, jax.Array] | None = None) -> np.ndarray:
    """[E, E] matrix of summed relative merge errors over the matrices (diagonal = inf)."""
    rng = np.random.default_rng(0)
    samples, imps = [], []
    for name, w in weights.items():
        e, k, n = w.shape
        idx = np.sort(rng.choice(k * n, size=min(config.pairing_sample, k * n), replace=False))
        samples.append(jnp.asarray(w.reshape(e, k * n)[:, idx], jnp.float32))  # gathers on the host for numpy
        if config.saliency == "activation":
            imps.append(_importance(config, (importance or {}).get(name), k)[..., 0][:, idx // n])
        else:
            imps.append(jnp.ones((e, idx.size), jnp.float32))
    w_all, imp_all = jnp.concatenate(samples, axis=1), jnp.concatenate(imps, axis=1)
    thr = jnp.float32(config.similarity_threshold)
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


def choose_pairs(weights: Mapping[str, jax.Array], n_pairs: int, config: MergeConfig = MergeConfig(),
                 importance: Mapping[str, jax.Array] | None = None) -> np.ndarray:
    """Pick ``n_pairs`` disjoint expert pairs to merge: int32 [n_pairs, 2], each row (i < j)."""
    e = next(iter(weights.values())).shape[0]
    if n_pairs > e // 2:
        raise ValueError(f"cannot merge {n_pairs} disjoint pairs out of {e} experts")
    if n_pairs == 0:
        return np.zeros((0, 2), np.int32)
    if config.pairing == "sequential":
        return np.arange(2 * n_pairs, dtype=np.int32).reshape(n_pairs, 2)
    cost = pair_costs(weights, config, importance)
    pairs = sorted(min_cost_matching(cost), key=lambda p: cost[p])[:n_pairs]
    return np.asarray(sorted(pairs), np.int32).reshape(n_pairs, 2)
