"""Compress one MoE layer: choose the pairs (or, for the dropping baseline, the experts to drop),
optionally align neurons, then merge and pack each pair (``merge``) into a ``PackedExperts``."""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from puzzlemoe_jax import baselines
from puzzlemoe_jax.experts import PackedExperts
from puzzlemoe_jax.merge import MergeConfig, _importance, _merge_rows, align_neurons, merge_layer_matrix
from puzzlemoe_jax.pairing import choose_pairs, pairs_for_ratio


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
                   frequencies=None, chunk_elems: int = 1 << 24,
                   calibration: Mapping | None = None, layer: int = 0):
    """Compress one layer's experts ``{name: [E, K, N]}`` at ``ratio``: (PackedExperts, stats).

    stats maps each matrix name to ``merge_pairs`` statistics (one entry per pair) and holds
    ``"pairs"`` and ``"dropped"``.  ``importance``: per-expert input second moments ``[E, K]``
    (activation saliency).  ``frequencies``: ``[E]`` routing frequencies on calibration text,
    needed by the "frequency" and "drop" baselines.  Numpy weights stay on the host and are
    merged in row chunks of about ``chunk_elems`` elements, so memory stays near the layer's size;
    jax arrays are merged where they are, one compiled program per matrix shape
    (``merge.merge_layer_matrix``), and the results stay there.
    ``calibration``: the layer's whole ``calibrate`` entry (importance/frequencies are taken from it
    when not given), needed by reap, naee, hc-smoe, wanda-2:4, wanda saliency and coactivation
    pairing; ``layer`` seeds random pairing.  hc-smoe and wanda-2:4 edit the weights and keep
    every expert dense (no pairs, nothing dropped: the checkpoint stores them as dense experts).
    """
    cal = calibration or {}
    importance = importance if importance is not None else cal.get("importance")
    frequencies = frequencies if frequencies is not None else cal.get("frequencies")
    shapes = {name: tuple(np.shape(w)) for name, w in weights.items()}
    if not weights or len({s[0] for s in shapes.values()}) != 1 or any(len(s) != 3 for s in shapes.values()):
        raise ValueError(f"expected {{name: [E, K, N]}} with one expert count E, got {shapes}")
    e = next(iter(shapes.values()))[0]
    n_merge = pairs_for_ratio(e, ratio)
    if config.method in ("frequency", "drop", "hc-smoe"):
        if frequencies is None or np.shape(frequencies) != (e,):
            raise ValueError(f"method {config.method!r} needs routing frequencies of shape ({e},)")
        frequencies = np.asarray(frequencies, np.float64)
    if config.saliency == "wanda":   # ||X_e||_2**2 = tokens routed to e * E[x**2]
        (counts,) = baselines._need(cal, "counts")
        importance = {n: np.asarray(v) * np.asarray(counts, np.float64)[:, None] for n, v in importance.items()}
    weights = dict(weights)
    pairs, dropped, extra = np.zeros((0, 2), np.int32), np.zeros((0,), np.int32), {}
    if config.method == "drop":   # the least-routed experts go
        dropped = np.sort(np.argsort(frequencies, kind="stable")[:n_merge]).astype(np.int32)
    elif config.method == "reap":
        dropped = baselines.reap_drop(cal, n_merge)
    elif config.method == "naee":
        dropped, extra["naee"] = baselines.naee_drop(weights, cal, n_merge)
    elif config.method == "hc-smoe":
        extra["groups"] = baselines.hc_smoe_groups(cal, e - n_merge)
        weights = baselines.hc_smoe_weights(weights, extra["groups"], frequencies)
    elif config.method == "wanda-2:4":
        if importance is None:
            raise ValueError("method 'wanda-2:4' needs input second moments (calibration)")
        weights = baselines.wanda_2_4(weights, importance)
    else:
        pairs = choose_pairs(weights, n_merge, config, importance, coactivation=cal.get("coactivation"), layer=layer)
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
    packed, dense, stats = {}, {}, {"pairs": pairs, "dropped": dropped, **extra}
    for name, w in weights.items():
        k, n = shapes[name][1:]
        imp = (importance or {}).get(name)
        imp_i, imp_j = ((None, None) if imp is None else
                        (np.asarray(imp)[pairs[:, 0]], np.asarray(imp)[pairs[:, 1]]))
        imp_i, imp_j = _importance(config, imp_i, k), _importance(config, imp_j, k)
        if not isinstance(w, np.ndarray):   # where jax runs: one program per matrix
            packed[name], dense[name], stats[name] = merge_layer_matrix(w, pairs, dense_ids, config, imp_i, imp_j,
                                                                        alpha, name, chunk_elems)
            continue
        cut = lambda imp, r0, r1: imp if imp.ndim == 0 else imp[:, r0:r1]
        get_rows = lambda r0, r1, w=w, imp_i=imp_i, imp_j=imp_j: (
            w[pairs[:, 0], r0:r1], w[pairs[:, 1], r0:r1], cut(imp_i, r0, r1), cut(imp_j, r0, r1))
        packed[name], stats[name] = _merge_rows(get_rows, k, n, len(pairs), config, alpha, name, chunk_elems,
                                                to_host=True)
        dense[name] = w[dense_ids]
    xp = np if all(isinstance(w, np.ndarray) for w in weights.values()) else jnp
    return (PackedExperts(xp.asarray(pairs), packed, xp.asarray(dense_ids), dense, e, xp.asarray(dropped)),
            stats)
