"""Which experts of a layer to merge, and compressing a layer with them.

Pairing within a layer (``choose_pairs``) minimises the summed relative merge error of the pairs
(estimated on a fixed subsample of elements), by greedy matching refined with 2-opt swaps.
``ratio`` is the fraction of expert memory saved: each merged pair stores one matrix instead of
two, so ``ratio * E`` pairs are merged (0.5 merges every expert); the cheapest pairs go first.
``compress_layer`` chooses the pairs (or, for the dropping baseline, the experts to drop) and
merges each pair with ``merge``; it lives here, above ``merge``, because pair costs are estimated
with ``merge.merge_rule``.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from puzzlemoe_jax.experts import PackedExperts
from puzzlemoe_jax.merge import MergeConfig, _importance, _merge_rows, _scores, align_neurons, merge_rule


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


def _permute_expert(w, b: int, perm: np.ndarray, axis: int):
    """Copy of ``w [E, K, N]`` with expert b's ``axis`` (0: rows, 1: columns of one expert) permuted."""
    if isinstance(w, np.ndarray):
        w = w.copy()
        w[b] = np.take(w[b], perm, axis=axis)
        return w
    return w.at[b].set(jnp.take(w[b], perm, axis=axis))


def compress_layer(weights: Mapping[str, jax.Array], ratio: float = 0.5,
                   config: MergeConfig = MergeConfig(),
                   importance: Mapping[str, jax.Array] | None = None,
                   frequencies=None, chunk_elems: int = 1 << 24):
    """Compress one layer's experts ``{name: [E, K, N]}`` at ``ratio``: (PackedExperts, stats).

    stats maps each matrix name to ``merge_pairs`` statistics (one entry per pair) and holds
    ``"pairs"`` and ``"dropped"``.  ``importance``: per-expert input second moments ``[E, K]``
    (activation saliency).  ``frequencies``: ``[E]`` routing frequencies on calibration text,
    needed by the "frequency" and "drop" baselines.  Numpy weights stay on the host and are
    merged in row chunks of about ``chunk_elems`` elements, so memory stays near the layer's size.
    """
    shapes = {name: tuple(np.shape(w)) for name, w in weights.items()}
    if not weights or len({s[0] for s in shapes.values()}) != 1 or any(len(s) != 3 for s in shapes.values()):
        raise ValueError(f"expected {{name: [E, K, N]}} with one expert count E, got {shapes}")
    e = next(iter(shapes.values()))[0]
    n_merge = pairs_for_ratio(e, ratio)
    if config.method in ("frequency", "drop"):
        if frequencies is None or np.shape(frequencies) != (e,):
            raise ValueError(f"method {config.method!r} needs routing frequencies of shape ({e},)")
        frequencies = np.asarray(frequencies, np.float64)
    weights = dict(weights)
    if config.method == "drop":   # NAEE-style: the least-routed experts go
        pairs = np.zeros((0, 2), np.int32)
        dropped = np.sort(np.argsort(frequencies, kind="stable")[:n_merge]).astype(np.int32)
    else:
        pairs = choose_pairs(weights, n_merge, config, importance)
        dropped = np.zeros((0,), np.int32)
    if config.align_neurons:
        for a, b in pairs:
            perm = align_neurons(weights, a, b, signed=config.method != "puzzle")
            weights["w_gate"] = _permute_expert(weights["w_gate"], b, perm, axis=1)
            weights["w_up"] = _permute_expert(weights["w_up"], b, perm, axis=1)
            weights["w_down"] = _permute_expert(weights["w_down"], b, perm, axis=0)
    alpha = 0.5
    if config.method == "frequency":  # M-SMoE-style: weight each expert by how often it is routed
        f_i, f_j = frequencies[pairs[:, 0]], frequencies[pairs[:, 1]]
        alpha = np.where(f_i + f_j > 0, f_i / np.maximum(f_i + f_j, 1e-30), 0.5)
    dense_ids = np.setdiff1d(np.arange(e), np.concatenate([pairs.ravel(), dropped])).astype(np.int32)
    packed, dense, stats = {}, {}, {"pairs": pairs, "dropped": dropped}
    for name, w in weights.items():
        k, n = shapes[name][1:]
        imp = (importance or {}).get(name)
        imp_i, imp_j = ((None, None) if imp is None else
                        (np.asarray(imp)[pairs[:, 0]], np.asarray(imp)[pairs[:, 1]]))
        imp_i, imp_j = _importance(config, imp_i, k), _importance(config, imp_j, k)
        cut = lambda imp, r0, r1: imp if imp.ndim == 0 else imp[:, r0:r1]
        get_rows = lambda r0, r1, w=w, imp_i=imp_i, imp_j=imp_j: (
            w[pairs[:, 0], r0:r1], w[pairs[:, 1], r0:r1], cut(imp_i, r0, r1), cut(imp_j, r0, r1))
        packed[name], stats[name] = _merge_rows(get_rows, k, n, len(pairs), config, alpha, name, chunk_elems,
                                                to_host=isinstance(w, np.ndarray))
        dense[name] = w[dense_ids]
    xp = np if all(isinstance(w, np.ndarray) for w in weights.values()) else jnp
    return (PackedExperts(xp.asarray(pairs), packed, xp.asarray(dense_ids), dense, e, xp.asarray(dropped)),
            stats)
