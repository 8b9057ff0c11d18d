"""Dual-mask pairwise sparse merging of experts (PuzzleMoE), as jit-compiled array ops.

For two experts' weights ``a = W_i``, ``b = W_j`` (same matrix, element by element):

* similarity mask: ``M_sim = | |a| - |b| | <= t * max(|a|, |b|)`` (relative magnitude difference).
  Signs are stored per expert, so only magnitudes need to agree.  The default
  ``t = 2 - sqrt(2)`` is where sharing the average stops beating keeping one expert exactly:
  sharing costs ``(|a|-|b|)**2 / 2``; giving the element to one expert costs the other's
  ``min(|a|,|b|)**2``; the two are equal at ``|a|-|b| = sqrt(2) * min``.
* saliency: ``score = |W|**2`` (``"magnitude"``), or ``|W|**2 * E[x_k**2]`` with per-expert
  input second moments (``"activation"``, Wanda-style; needs calibration statistics).
* where the experts are not similar, the element goes to the expert with the larger score
  (``M_sal``) and is zero for the other.  The paper's formula would add both magnitudes where
  both are salient, which is right for neither; never pruning both keeps the error lower than
  any saliency-fraction cut.
* merged magnitude ``W = M_sim*(|a|+|b|)/2 + (1-M_sim)*(M_sal_i*|a| + M_sal_j*|b|)``; expert i is
  recovered as ``sign_i * W`` where ``M_sim | M_sal_i``, zero elsewhere.

Pairing within a layer (``choose_pairs``) minimises the summed relative merge error of the pairs
(estimated on a fixed subsample of elements), by greedy matching refined with 2-opt swaps.
``ratio`` is the fraction of expert memory saved: each merged pair stores one matrix instead of
two, so ``ratio * E`` pairs are merged (0.5 merges every expert); the cheapest pairs go first.

Expert matrices use the Flax ``x @ W`` layout: ``w_gate``/``w_up`` ``[E, H, I]``,
``w_down`` ``[E, I, H]``; any leading axes (layers, pairs) broadcast.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from puzzlemoe_jax import codec

MATRICES = ("w_gate", "w_up", "w_down")
METHODS = ("puzzle", "average", "frequency", "drop")
DEFAULT_SIMILARITY = 2.0 - math.sqrt(2.0)


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """The method's open choices, with the defaults that keep merged experts closest."""
    similarity_threshold: float = DEFAULT_SIMILARITY  # max | |a|-|b| | / max(|a|,|b|) to share
    saliency: str = "magnitude"       # "magnitude" | "activation" (needs input second moments)
    pairing: str = "min_error"        # "min_error" | "sequential" ((0,1), (2,3), ...)
    pairing_sample: int = 1 << 16     # elements per matrix used to estimate pair costs
    strict: bool = False              # raise when a magnitude saturates the 5-bit exponent
    method: str = "puzzle"            # "puzzle" | baselines: "average", "frequency", "drop"
    align_neurons: bool = False       # permute expert j's neurons to match expert i first

    def __post_init__(self):
        if not 0.0 <= self.similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold must be in [0, 1], got {self.similarity_threshold}")
        if self.saliency not in ("magnitude", "activation"):
            raise ValueError(f"saliency must be 'magnitude' or 'activation', got {self.saliency!r}")
        if self.pairing not in ("min_error", "sequential"):
            raise ValueError(f"pairing must be 'min_error' or 'sequential', got {self.pairing!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.pairing_sample < 1:
            raise ValueError(f"pairing_sample must be positive, got {self.pairing_sample}")


def merge_rule(a, b, score_a, score_b, threshold):
    """Element-wise rule on magnitudes a, b: (similar, i_wins, merged magnitude), in f32."""
    hi, lo = jnp.maximum(a, b), jnp.minimum(a, b)
    similar = (hi - lo) <= threshold * hi
    i_wins = score_a >= score_b
    magnitude = jnp.where(similar, (a + b) * 0.5, jnp.where(i_wins, a, b))
    return similar, i_wins, magnitude


def _scores(a, b, imp_i, imp_j):
    return a * a * imp_i, b * b * imp_j


@functools.partial(jax.jit, static_argnames="method")
def _merge_core(w_i, w_j, imp_i, imp_j, threshold, alpha, method):
    """Merge and pack one row chunk; returns the words and per-matrix sums (over the last two axes).

    "puzzle" is the dual-mask merge; the baselines store ``alpha*W_i + (1-alpha)*W_j`` for both
    experts (both masks set, one sign), which the same codec represents.
    """
    a = jnp.abs(w_i.astype(jnp.float32))
    b = jnp.abs(w_j.astype(jnp.float32))
    if method == "puzzle":
        similar, i_wins, magnitude = merge_rule(a, b, *_scores(a, b, imp_i, imp_j), threshold)
        sign_i, sign_j = w_i < 0, w_j < 0
    else:
        mixed = alpha * w_i.astype(jnp.float32) + (1 - alpha) * w_j.astype(jnp.float32)
        similar, i_wins, magnitude = jnp.ones(a.shape, bool), jnp.ones(a.shape, bool), jnp.abs(mixed)
        sign_i = sign_j = mixed < 0
    words, flags = codec.encode_words(magnitude, similar | i_wins, similar | ~i_wins, sign_i, sign_j)
    hat_i, hat_j = codec.decode(words)
    count = lambda x: jnp.sum(x, axis=(-2, -1), dtype=jnp.int32)
    sq = lambda x: jnp.sum(jnp.square(x), axis=(-2, -1), dtype=jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)
    sums = dict(
        similar=count(similar), salient_i=count(~similar & i_wins), salient_j=count(~similar & ~i_wins),
        kept_i=count((words & (1 << codec.MASK_I_BIT)) != 0), kept_j=count((words & (1 << codec.MASK_J_BIT)) != 0),
        sq_err_i=sq(f32(hat_i) - f32(w_i)), sq_err_j=sq(f32(hat_j) - f32(w_j)), sq_i=sq(f32(w_i)), sq_j=sq(f32(w_j)),
        rounded_to_zero=count(flags["rounded_to_zero"]), rounded_to_min=count(flags["rounded_to_min"]),
        saturated=count(flags["saturated"]), nonfinite=count(~jnp.isfinite(w_i)) + count(~jnp.isfinite(w_j)))
    return words, sums


def _finish_stats(sums: Mapping[str, np.ndarray], elements: int, config: MergeConfig, name: str) -> dict:
    """Per-pair statistics from summed counts; raises for NaN/Inf weights and strict saturation."""
    if sums["nonfinite"].sum():
        raise ValueError(f"{name}: {int(sums['nonfinite'].sum())} NaN/Inf weights; expert weights must be finite")
    if config.strict and sums["saturated"].sum():
        raise ValueError(f"{name}: {int(sums['saturated'].sum())} magnitudes >= 2**17 do not fit "
                         "the 5-bit exponent (strict mode)")
    tiny = np.finfo(np.float32).tiny
    frac = lambda key: (sums[key] / max(elements, 1)).astype(np.float32)
    err = lambda side: np.sqrt(sums["sq_err_" + side] / np.maximum(sums["sq_" + side], tiny)).astype(np.float32)
    return dict(frac_similar=frac("similar"), frac_salient_i=frac("salient_i"), frac_salient_j=frac("salient_j"),
                frac_kept_i=frac("kept_i"), frac_kept_j=frac("kept_j"), rel_err_i=err("i"), rel_err_j=err("j"),
                **{k: sums[k] for k in ("rounded_to_zero", "rounded_to_min", "saturated", "nonfinite")})


def _importance(config: MergeConfig, imp, rows: int):
    """Per-input-row importance multiplier broadcastable to [..., K, N] (1 for magnitude)."""
    if config.saliency == "magnitude":
        return jnp.float32(1.0)
    if imp is None:
        raise ValueError("saliency='activation' needs input second moments for every expert")
    imp = jnp.asarray(imp, jnp.float32)
    if imp.shape[-1] != rows:
        raise ValueError(f"input second moments have {imp.shape[-1]} features, the matrix has {rows} input rows")
    return imp[..., :, None]


def _merge_rows(get_rows, k: int, n: int, batch: int, config: MergeConfig, alpha, name: str,
                chunk_elems: int, to_host: bool):
    """Merge row chunks ``get_rows(r0, r1) -> (w_i, w_j, imp_i, imp_j)`` of ``batch`` matrices
    ``[..., K, N]``; the words are joined along the rows and the statistics combined exactly."""
    rows = max(1, chunk_elems // max(1, batch * n))
    alpha = jnp.asarray(alpha, jnp.float32)[..., None, None]
    thr = jnp.float32(config.similarity_threshold)
    words, sums = [], None
    for r0 in range(0, k, rows):
        w_i, w_j, imp_i, imp_j = get_rows(r0, min(k, r0 + rows))
        chunk, s = _merge_core(jnp.asarray(w_i), jnp.asarray(w_j), imp_i, imp_j, thr, alpha, method=config.method)
        words.append(np.asarray(chunk) if to_host else chunk)
        s = {key: np.asarray(v, np.float64 if key.startswith("sq") else np.int64) for key, v in s.items()}
        sums = s if sums is None else {key: sums[key] + s[key] for key in s}
    joined = np.concatenate(words, axis=-2) if to_host else jnp.concatenate(words, axis=-2)
    return joined, _finish_stats(sums, k * n, config, name)


def merge_pairs(w_i, w_j, config: MergeConfig = MergeConfig(), imp_i=None, imp_j=None,
                name: str = "weights", alpha=0.5, chunk_elems: int = 1 << 24):
    """Merge expert matrices ``w_i[..., K, N]`` with ``w_j[..., K, N]`` into packed uint16 words.

    ``imp_*``: per-expert input second moments ``[..., K]`` (only for ``saliency="activation"``).
    ``alpha``: weight of expert i in the averaging baselines (scalar or one per leading index).
    Work is done in row chunks of about ``chunk_elems`` elements (bounded temporaries); numpy
    inputs give numpy words.  Returns ``(words, stats)``: stats maps each statistic to a numpy
    array over the leading axes.  Raises ValueError for NaN/Inf weights or, when
    ``config.strict``, for saturated magnitudes.
    """
    if np.shape(w_i) != np.shape(w_j) or np.ndim(w_i) < 2:
        raise ValueError(f"{name}: expert matrices must have one shape [..., K, N], got "
                         f"{np.shape(w_i)} and {np.shape(w_j)}")
    *lead, k, n = np.shape(w_i)
    imp_i, imp_j = _importance(config, imp_i, k), _importance(config, imp_j, k)
    cut = lambda imp, r0, r1: imp if imp.ndim == 0 else imp[..., r0:r1, :]
    get_rows = lambda r0, r1: (w_i[..., r0:r1, :], w_j[..., r0:r1, :], cut(imp_i, r0, r1), cut(imp_j, r0, r1))
    return _merge_rows(get_rows, k, n, int(np.prod(lead)), config, alpha, name, chunk_elems,
                       to_host=isinstance(w_i, np.ndarray))


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedExperts:
    """One MoE layer's experts after compression: packed pairs plus the experts left dense.

    ``packed[name]`` is uint16 ``[P, K, N]`` (codec layout, expert ``pairs[p, 0]`` is "i",
    ``pairs[p, 1]`` is "j"); ``dense[name]`` holds experts ``dense_ids`` unchanged.  Experts in
    ``dropped_ids`` (the dropping baseline) have no weights: the router must never pick them.
    """
    pairs: jax.Array                 # int32 [P, 2]
    packed: dict[str, jax.Array]     # name -> uint16 [P, K, N]
    dense_ids: jax.Array             # int32 [E - 2P - D]
    dense: dict[str, jax.Array]      # name -> [E - 2P - D, K, N]
    num_experts: int = dataclasses.field(metadata=dict(static=True))
    dropped_ids: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((0,), jnp.int32))

    def unpack(self, dtype=jnp.bfloat16) -> dict[str, jax.Array]:
        """Decoded ``[E, K, N]`` weights of every expert (zeros for dropped ones): the reference."""
        out = {}
        for name, words in self.packed.items():
            hat_i, hat_j = codec.decode(words)
            dense = self.dense[name]
            full = jnp.zeros((self.num_experts,) + dense.shape[1:], dtype)
            full = full.at[self.pairs[:, 0]].set(hat_i.astype(dtype))
            full = full.at[self.pairs[:, 1]].set(hat_j.astype(dtype))
            out[name] = full.at[self.dense_ids].set(dense.astype(dtype))
        return out

    def nbytes(self) -> int:
        """Bytes of expert weights held (packed + dense)."""
        return sum(int(x.size) * x.dtype.itemsize for x in (*self.packed.values(), *self.dense.values()))


def align_neurons(weights: Mapping[str, jax.Array], i: int, j: int, signed: bool) -> np.ndarray:
    """Permutation of expert j's intermediate neurons that best matches expert i's.

    A neuron is its ``w_gate``/``w_up`` column and ``w_down`` row; permuting all three alike
    leaves expert j's function unchanged.  Matches minimise the squared distance between neuron
    vectors (of magnitudes for "puzzle", whose signs are stored per expert; signed for the
    averaging baselines) with an optimal assignment, O(I**3): cheap for fine-grained experts.
    """
    import scipy.optimize  # noqa: PLC0415 (a jax dependency; only needed here)
    missing = set(MATRICES) - set(weights)
    if missing:
        raise ValueError(f"align_neurons needs {MATRICES}, missing {sorted(missing)}")

    def neurons(e):
        f = jnp.concatenate([weights["w_gate"][e].T, weights["w_up"][e].T, weights["w_down"][e]], 1)
        f = f.astype(jnp.float32)
        return f if signed else jnp.abs(f)
    f_i, f_j = neurons(i), neurons(j)
    cost = np.asarray(jnp.sum(f_j * f_j, axis=1)[None, :] - 2.0 * (f_i @ f_j.T), np.float64)
    return scipy.optimize.linear_sum_assignment(cost)[1]


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
