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

Which experts are paired, and compressing a whole layer, is ``pairing``'s job.

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
from jax import lax
import numpy as np

from puzzlemoe_jax import codec
from puzzlemoe_jax.experts import MATRICES

METHODS = ("puzzle", "average", "frequency", "drop", "reap", "hc-smoe", "naee", "wanda-2:4")
PAIRINGS = ("min_error", "sequential", "random", "cosine", "coactivation")
SALIENCIES = ("magnitude", "activation", "wanda")
DEFAULT_SIMILARITY = 2.0 - math.sqrt(2.0)


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """The method's open choices, with the defaults that keep merged experts closest."""
    similarity_threshold: float = DEFAULT_SIMILARITY  # max | |a|-|b| | / max(|a|,|b|) to share
    saliency: str = "magnitude"       # "magnitude" | "activation" (needs input second moments)
    pairing: str = "min_error"        # "min_error" | "sequential" ((0,1), (2,3), ...)
    pairing_sample: int = 1 << 16     # elements per matrix used to estimate pair costs
    strict: bool = False              # raise when a magnitude saturates the 5-bit exponent
    method: str = "puzzle"            # "puzzle" | baselines (see METHODS and puzzlemoe_jax.baselines)
    align_neurons: bool = False       # permute expert j's neurons to match expert i first
    similarity_rule: str = "max"      # "max": | |a|-|b| | <= t*max(|a|,|b|); "sum" (paper): <= t*(|a|+|b|)
    seed: int = 0                     # pairing="random": the layer's pairs come from (seed, layer)
    coactivation_weight: float = 1.0  # pairing="coactivation": 1 = pure coactivation; <1 blends merge error in

    def __post_init__(self):
        if not 0.0 <= self.similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold must be in [0, 1], got {self.similarity_threshold}")
        if self.saliency not in SALIENCIES:
            raise ValueError(f"saliency must be one of {SALIENCIES}, got {self.saliency!r}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        if self.similarity_rule not in ("max", "sum"):
            raise ValueError(f"similarity_rule must be 'max' or 'sum', got {self.similarity_rule!r}")
        if not 0.0 <= self.coactivation_weight <= 1.0:
            raise ValueError(f"coactivation_weight must be in [0, 1], got {self.coactivation_weight}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.pairing_sample < 1:
            raise ValueError(f"pairing_sample must be positive, got {self.pairing_sample}")


    @classmethod
    def paper(cls, seed: int = 0, **kw) -> "MergeConfig":
        """The paper's settings: | |Wi|-|Wj| | / (|Wi|+|Wj|) <= 0.4, Wanda saliency |W| * ||X||_2 over
        the tokens routed to each expert, random pairing (``seed``)."""
        return cls(similarity_threshold=0.4, similarity_rule="sum", saliency="wanda", pairing="random",
                   seed=seed, **kw)

    @property
    def max_threshold(self) -> float:
        """The threshold of the "max" rule equal to this config's: | |a|-|b| | <= t (|a|+|b|) is
        | |a|-|b| | <= 2t/(1+t) max(|a|,|b|) (so the paper's 0.4 is 0.571, near our 2-sqrt(2) = 0.586)."""
        t = self.similarity_threshold
        return 2.0 * t / (1.0 + t) if self.similarity_rule == "sum" else t

    @property
    def needs_calibration(self) -> bool:
        return (self.method not in ("puzzle", "average") or self.saliency != "magnitude"
                or self.pairing == "coactivation")


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
        raise ValueError(f"saliency={config.saliency!r} needs input second moments for every expert")
    imp = jnp.asarray(imp, jnp.float32)
    if imp.shape[-1] != rows:
        raise ValueError(f"input second moments have {imp.shape[-1]} features, the matrix has {rows} input rows")
    return imp[..., :, None]


def _sum_chunks(parts) -> dict[str, np.ndarray]:
    """Per-chunk ``_merge_core`` sums (fetched to the host) added up in f64/int64, chunk by chunk."""
    sums = None
    for s in jax.device_get(parts):
        s = {key: np.asarray(v, np.float64 if key.startswith("sq") else np.int64) for key, v in s.items()}
        sums = s if sums is None else {key: sums[key] + s[key] for key in s}
    return sums


def _chunk_rows(batch: int, n: int, chunk_elems: int) -> int:
    return max(1, chunk_elems // max(1, batch * n))


def _merge_rows(get_rows, k: int, n: int, batch: int, config: MergeConfig, alpha, name: str,
                chunk_elems: int, to_host: bool):
    """Merge row chunks ``get_rows(r0, r1) -> (w_i, w_j, imp_i, imp_j)`` of ``batch`` matrices
    ``[..., K, N]``; the words are joined along the rows and the statistics combined exactly.
    ``to_host``: numpy words, each chunk fetched as it is done."""
    rows = _chunk_rows(batch, n, chunk_elems)
    alpha = jnp.asarray(alpha, jnp.float32)[..., None, None]
    thr = jnp.float32(config.max_threshold)
    words, parts = [], []
    for r0 in range(0, k, rows):
        w_i, w_j, imp_i, imp_j = get_rows(r0, min(k, r0 + rows))
        chunk, s = _merge_core(jnp.asarray(w_i), jnp.asarray(w_j), imp_i, imp_j, thr, alpha, method=config.method)
        words.append(np.asarray(chunk) if to_host else chunk)
        parts.append(s)
    joined = words[0] if len(words) == 1 else (np if to_host else jnp).concatenate(words, axis=-2)
    return joined, _finish_stats(_sum_chunks(parts), k * n, config, name)


@functools.partial(jax.jit, static_argnames=("method", "rows"))
def _merge_layer_matrix(w, pairs, dense_ids, imp_i, imp_j, threshold, alpha, method, rows):
    """One matrix of a layer ``w [E, K, N]`` as one program: every pair merged in the same row
    chunks as ``_merge_rows``; (words [P, K, N], experts ``dense_ids`` [D, K, N], chunk sums).
    The chunks run one after another in a loop, each gathering its own rows of the pairs, so the
    program's temporaries are one chunk's whatever the number of chunks."""
    k = w.shape[1]
    full, rest = divmod(k, rows)

    def chunk(r0, size):
        part = lax.dynamic_slice_in_dim(w, r0, size, axis=1)
        cut = lambda x: x if x.ndim == 0 else lax.dynamic_slice_in_dim(x, r0, size, axis=x.ndim - 2)  # noqa: E731
        return _merge_core(part[pairs[:, 0]], part[pairs[:, 1]], cut(imp_i), cut(imp_j), threshold, alpha,
                           method=method)

    words_1, sums_1 = jax.eval_shape(lambda: chunk(0, rows))
    words = jnp.zeros((pairs.shape[0], k, w.shape[2]), words_1.dtype)
    stacked = {key: jnp.zeros((full, *v.shape), v.dtype) for key, v in sums_1.items()}

    def body(c, carry):
        words, stacked = carry
        words_c, sums_c = chunk(c * rows, rows)
        return (lax.dynamic_update_slice_in_dim(words, words_c, c * rows, axis=1),
                {key: v.at[c].set(sums_c[key]) for key, v in stacked.items()})

    words, stacked = lax.fori_loop(0, full, body, (words, stacked))
    parts = [{key: v[c] for key, v in stacked.items()} for c in range(full)]
    if rest:
        words_c, sums_c = chunk(full * rows, rest)
        words = lax.dynamic_update_slice_in_dim(words, words_c, full * rows, axis=1)
        parts.append(sums_c)
    return words, w[dense_ids], parts


def merge_layer_matrix(w: jax.Array, pairs: np.ndarray, dense_ids: np.ndarray, config: MergeConfig, imp_i, imp_j,
                       alpha, name: str, chunk_elems: int):
    """Device counterpart of ``_merge_rows`` over a whole layer's matrix ``w [E, K, N]`` (a jax
    array): one compiled program per shape, nothing waits for it but the (small) statistics.
    Returns (words [P, K, N], dense [D, K, N], stats); ``imp_*`` as ``_importance`` gives them."""
    e, k, n = w.shape
    rows = min(k, _chunk_rows(len(pairs), n, chunk_elems))
    words, dense, parts = _merge_layer_matrix(
        w, jnp.asarray(pairs, jnp.int32), jnp.asarray(dense_ids, jnp.int32), imp_i, imp_j,
        jnp.float32(config.max_threshold), jnp.asarray(alpha, jnp.float32)[..., None, None],
        method=config.method, rows=rows)
    return words, dense, _finish_stats(_sum_chunks(parts), k * n, config, name)


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

