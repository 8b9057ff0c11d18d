"""Published MoE-compression baselines, each from calibration statistics as its paper uses them.

All work on one layer's experts ``{name: [E, K, N]}`` (``x @ W`` layout) and the layer's entry of
``puzzlemoe_jax.calibrate`` (``cal``).  Each returns what ``compress.compress_layer`` stores:

* ``reap_drop`` (REAP, Lasby et al. 2025): experts to drop, the lowest mean of renormalised top-k
  router weight x ||expert output||_2 over the tokens routed to them.
* ``naee_drop`` (NAEE, Lu et al. 2024): experts to drop so that the layer's routed output on
  calibration tokens (router restricted to the kept experts, as at inference) is closest to the
  original: every subset when there are at most ``NAEE_EXHAUSTIVE_LIMIT`` of them, else greedy
  backward elimination (drop, one at a time, the expert whose removal raises the error least).
* ``hc_smoe_groups`` / ``hc_smoe_weights`` (HC-SMoE, Chen et al. 2025): average-linkage
  hierarchical clustering of the experts' mean outputs over all calibration tokens (cosine
  distance) into the target number of groups; each expert gets its group's routing-frequency
  weighted average.  Every original expert keeps its router row and reads its group's weights.
* ``wanda_2_4`` (Wanda 2:4, Sun et al. 2024): in every expert matrix, of each 4 consecutive input
  rows of a column the 2 with the lowest ``|W| * ||X||_2`` are zeroed (X: the tokens routed to that
  expert; the intermediate activations for ``w_down``).  Same expert count; stored dense.
"""
from __future__ import annotations

import itertools
import math
from typing import Mapping

import numpy as np

NAEE_EXHAUSTIVE_LIMIT = 5000   # subsets; above it NAEE's search is greedy


def _need(cal, *keys):
    missing = [k for k in keys if cal is None or k not in cal]
    if missing:
        raise ValueError(f"this method needs calibration statistics {missing} (calibrate.calibrate)")
    return [cal[k] for k in keys]


def reap_drop(cal: Mapping, n_drop: int) -> np.ndarray:
    """Ids (sorted) of the ``n_drop`` experts with the lowest REAP score."""
    (score,) = _need(cal, "reap")
    return np.sort(np.argsort(np.asarray(score, np.float64), kind="stable")[:n_drop]).astype(np.int32)


def expert_outputs(weights: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Every expert's SwiGLU output for every token: f32 ``[E, T, H]``."""
    f = lambda n: np.asarray(weights[n], np.float32)
    g, u = np.einsum("th,ehi->eti", x, f("w_gate")), np.einsum("th,ehi->eti", x, f("w_up"))
    return np.einsum("eti,eih->eth", g / (1.0 + np.exp(-g)) * u, f("w_down"))


def _route_weights(logits: np.ndarray, keep: np.ndarray, top_k: int, norm: bool) -> np.ndarray:
    """Dense [T, E] routing weights with the router restricted to the experts in ``keep`` (bool [E])."""
    z = np.where(keep, logits, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    k = min(top_k, int(keep.sum()))
    idx = np.argpartition(-p, k - 1, axis=-1)[:, :k]
    w = np.zeros_like(p)
    np.put_along_axis(w, idx, np.take_along_axis(p, idx, -1), -1)
    return w / w.sum(-1, keepdims=True) if norm else w


def naee_drop(weights: Mapping[str, np.ndarray], cal: Mapping, n_drop: int,
              limit: int = NAEE_EXHAUSTIVE_LIMIT) -> tuple[np.ndarray, dict]:
    """Ids (sorted) of the experts to drop and {"search": "exhaustive"|"greedy", "evaluated", "error"}."""
    samples, top_k, norm = _need(cal, "samples", "top_k", "norm_topk_prob")
    x, logits = np.asarray(samples["x"], np.float32), np.asarray(samples["logits"], np.float64)
    e = logits.shape[1]
    outs = expert_outputs(weights, x)                                       # [E, T, H]
    ref = np.einsum("te,eth->th", _route_weights(logits, np.ones(e, bool), top_k, norm), outs)

    def err(keep):
        y = np.einsum("te,eth->th", _route_weights(logits, keep, top_k, norm), outs)
        return float(np.sum((y - ref) ** 2))
    if n_drop == 0:
        return np.zeros((0,), np.int32), {"search": "none", "evaluated": 0, "error": 0.0}
    if math.comb(e, n_drop) <= limit:
        best, evaluated = None, 0
        for drop in itertools.combinations(range(e), n_drop):
            keep = np.ones(e, bool)
            keep[list(drop)] = False
            v, evaluated = err(keep), evaluated + 1
            if best is None or v < best[0]:
                best = (v, drop)
        return np.asarray(best[1], np.int32), {"search": "exhaustive", "evaluated": evaluated, "error": best[0]}
    keep, evaluated, v = np.ones(e, bool), 0, 0.0
    for _ in range(n_drop):
        trials = []
        for j in np.flatnonzero(keep):
            keep[j] = False
            trials.append((err(keep), j))
            keep[j] = True
        evaluated += len(trials)
        v, j = min(trials)
        keep[j] = False
    return np.flatnonzero(~keep).astype(np.int32), {"search": "greedy", "evaluated": evaluated, "error": v}


def hc_smoe_groups(cal: Mapping, n_groups: int) -> np.ndarray:
    """Group label (0..n_groups-1) of each expert: average linkage on cosine distances of mean outputs."""
    import scipy.cluster.hierarchy as hier  # noqa: PLC0415 (a jax dependency)
    (mean_out,) = _need(cal, "mean_output")
    m = np.asarray(mean_out, np.float64)
    m = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-30)
    dist = np.clip(1.0 - m @ m.T, 0.0, 2.0)
    condensed = dist[np.triu_indices(len(m), 1)]
    labels = hier.fcluster(hier.linkage(condensed, method="average"), n_groups, criterion="maxclust")
    _, labels = np.unique(labels, return_inverse=True)
    return labels.astype(np.int32)


def hc_smoe_weights(weights: Mapping[str, np.ndarray], labels: np.ndarray, frequencies) -> dict[str, np.ndarray]:
    """Each expert's weights replaced by its group's routing-frequency-weighted average (f32)."""
    f = np.asarray(frequencies, np.float64)
    out = {}
    for name, w in weights.items():
        w = np.asarray(w, np.float32)
        new = np.empty_like(w)
        for g in np.unique(labels):
            members = np.flatnonzero(labels == g)
            a = f[members] if f[members].sum() > 0 else np.ones(len(members))
            new[members] = np.tensordot(a / a.sum(), w[members], axes=1)
        out[name] = new.astype(np.asarray(weights[name]).dtype)
    return out


def wanda_2_4(weights: Mapping[str, np.ndarray], importance: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """2:4 semi-structured pruning of every ``[E, K, N]`` matrix along K by ``|W| * sqrt(E[x_k**2])``.

    (Per expert and column, ``||X_k||_2`` and ``sqrt(E[x_k**2])`` differ by one factor, so the choice is
    the same.)  Returns the pruned weights in their dtype; exactly 2 of each 4 input rows survive."""
    out = {}
    for name, w in weights.items():
        e, k, n = np.shape(w)
        if k % 4:
            raise ValueError(f"wanda-2:4: {name} has {k} input rows, not a multiple of 4")
        imp = np.asarray(importance[name], np.float64)
        if imp.shape != (e, k):
            raise ValueError(f"wanda-2:4: importance of {name} is {imp.shape}, expected {(e, k)}")
        score = np.abs(np.asarray(w, np.float64)) * np.sqrt(imp)[:, :, None]
        groups = score.reshape(e, k // 4, 4, n)
        rank = np.argsort(np.argsort(groups, axis=2, kind="stable"), axis=2, kind="stable")
        keep = (rank >= 2).reshape(e, k, n)
        out[name] = np.where(keep, w, np.zeros((), np.asarray(w).dtype))
    return out
