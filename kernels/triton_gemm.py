"""Pallas-Triton decode-GEMMs for packed expert pairs (one uint16 word -> two bf16 weights).

* ``triton_pair_gemm(a_i, a_j, words)``: one merged pair.  Each packed ``[block_k, block_n]`` tile is
  loaded once, decoded in registers into expert i's and expert j's bf16 tiles and fed to two MMAs,
  ``O_i = A_i @ W_i`` and ``O_j = A_j @ W_j``.  Any token count (rows are padded to the MMA minimum
  of 16), any K and N (edge tiles are masked), words ``[K, N]`` or ``transposed`` ``[N, K]``,
  optional split-K (f32 partials summed by XLA).
* ``triton_grouped_gemm(xs, meta, w)``: the same grouped launch for uncompressed bf16 experts
  (``[E, K, N]``): program ``(m, n, e)`` streams expert ``e``'s column tile only if its row tile
  holds rows, so a step reads only the experts that have tokens.
* ``triton_grouped_pair_gemm(xs, meta, words)``: a whole layer's pairs in one launch, rows grouped
  by expert as for ``jax.lax.ragged_dot``.  Program ``(m, n, p)`` reads pair ``p``'s column tile
  ``n`` once per K step and multiplies it with row tile ``m`` of expert i's rows and of expert j's
  rows; programs whose row tile is empty for both experts exit at once.  ``swiglu=True`` fuses the
  gate and up projections (two packed weights, four accumulators, ``silu(x W_gate) * (x W_up)``).

``pair_config`` and ``layer_config`` are the tile tables (tuned on the H100; the reasoning of each
choice is in their docstrings, the measurements on the results page).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.gpu import decode, k_splits, largest_pow2_divisor, num_sms, silu, smem_budget

MIN_ROWS = 16  # smallest MMA row tile; fewer tokens are padded/masked up to it


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Block sizes and launch parameters of one Triton kernel call (block sizes powers of two)."""
    block_m: int = 16       # rows (tokens) per program, >= 16
    block_n: int = 64       # output columns per program
    block_k: int = 128      # K step of the in-kernel loop
    split_k: int = 1        # K splits: f32 partials summed outside
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False   # pair kernel: compute O^T = W^T A^T (weights on the MMA's M side)
    evict_first: bool = False  # L2 eviction hint on the streamed weight tiles

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")


def pair_config(m: int, k: int, n: int) -> TritonConfig:
    """Tile table of the pair kernel, by tokens per expert ``m`` and weight shape [k, n].

    Up to 32 tokens one 16/32-row tile with 64-column tiles and 128-deep K steps (the variants
    tried all lay within a few percent there); 33-64 tokens 64x128 tiles, 8 warps; more tokens
    128x128 tiles, 8 warps.  ``block_k`` is capped by the largest power of two dividing k (>= 64,
    masked edges otherwise).  K is split until the launch has >= 1.5 programs per SM.
    """
    if m <= 32:
        bm, bn, bk_cap, warps = max(MIN_ROWS, pl.next_power_of_2(max(m, 1))), 64, 128, 4
    elif m <= 64:
        bm, bn, bk_cap, warps = 64, 128, 64, 8
    else:
        bm, bn, bk_cap, warps = 128, 128, 64, 8
    bk = max(largest_pow2_divisor(k, bk_cap), 64)
    bn = min(bn, max(16, pl.next_power_of_2(n)))
    m_tiles, n_tiles, nk = pl.cdiv(max(m, 1), bm), pl.cdiv(n, bn), pl.cdiv(k, bk)
    split = k_splits(nk, m_tiles * n_tiles, 3 * num_sms() // 2)
    return TritonConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=4)


def layer_config(rows: int, k: int, n: int, *, swiglu: bool = False) -> TritonConfig:
    """Tile table of the grouped (whole-layer) kernel; ``rows`` bounds one expert's rows.

    16-row tiles up to 32 rows, 32-row tiles below 2048 (larger tiles were slower there), 128-row
    tiles with 8 warps from 2048 rows (each extra row tile of a pair decodes its weights again);
    ``block_k=64``.  The SwiGLU launch cannot split K; the down projection splits K until the
    launch has >= 2 programs per SM even if only one pair is active.
    """
    bm, warps = (16, 4) if rows <= 32 else (32, 4) if rows < 2048 else (128, 8)
    bk = max(largest_pow2_divisor(k, 64), 64)
    bn = 64
    n_tiles, nk = pl.cdiv(n, bn), pl.cdiv(k, bk)
    split = 1 if swiglu else k_splits(nk, n_tiles, 2 * num_sms())
    return TritonConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=4)


def fit_smem(cfg: TritonConfig, n_a: int, n_w: int) -> TritonConfig:
    """Lower ``num_stages`` until the pipeline buffers fit shared memory (estimate: Triton keeps
    ``num_stages - 1`` copies of the per-step tiles, plus the two decoded bf16 tiles per weight)."""
    per_stage = 2 * (n_a * cfg.block_m * cfg.block_k + n_w * cfg.block_k * cfg.block_n)
    decoded = n_w * 2 * 2 * cfg.block_k * cfg.block_n
    stages = cfg.num_stages
    while stages > 2 and (stages - 1) * per_stage + decoded > smem_budget():
        stages -= 1
    return cfg if stages == cfg.num_stages else dataclasses.replace(cfg, num_stages=stages)


def _params(cfg: TritonConfig):
    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _mma(a, w, *, transposed: bool, swap_ab: bool):
    """f32 product of an activation tile a [bm, bk] and a decoded weight tile.

    w is [bk, bn] (or [bn, bk] when ``transposed``).  Returns [bm, bn], or [bn, bm] when
    ``swap_ab`` (the weights then sit on the MMA's M side).
    """
    w_contract = 1 if transposed else 0
    if swap_ab:
        return lax.dot_general(w, a, (((w_contract,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
    return lax.dot_general(a, w, (((1,), (w_contract,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _load_words(w_ref, k0, col0, *, bk, bn, K, N, transposed, mask_k, mask_n, ref_col0=None,
                lead=(), evict_first=False, dtype=jnp.uint16):
    """One packed tile ([bk, bn], or [bn, bk] transposed) with edges masked to word 0 (= zero).

    ``col0`` is the tile's first column in the whole matrix (for the edge mask); ``ref_col0``
    its first column inside ``w_ref`` (0 when a BlockSpec already offset the ref); ``lead``
    indexes leading axes (one indexer: Triton lowering takes no chained ``.at``).
    """
    ks, ns = pl.ds(k0, bk), pl.ds(col0 if ref_col0 is None else ref_col0, bn)
    idx = tuple(lead) + ((ns, ks) if transposed else (ks, ns))
    hint = dict(eviction_policy="evict_first") if evict_first else {}
    if not (mask_k or mask_n):
        return pltriton.load(w_ref.at[idx], **hint) if hint else w_ref[idx]
    kk = k0 + lax.broadcasted_iota(jnp.int32, (bk, 1) if not transposed else (1, bk),
                                   0 if not transposed else 1)
    nn = col0 + lax.broadcasted_iota(jnp.int32, (1, bn) if not transposed else (bn, 1),
                                     1 if not transposed else 0)
    mask = None
    if mask_k:
        mask = kk < K
    if mask_n:
        mask = (nn < N) if mask is None else (mask & (nn < N))
    shape = (bn, bk) if transposed else (bk, bn)
    mask = jnp.broadcast_to(mask, shape)
    return pltriton.load(w_ref.at[idx], mask=mask, other=dtype(0), **hint)


def _pair_kernel(ai_ref, aj_ref, w_ref, oi_ref, oj_ref, *, K, N, cfg: TritonConfig, nks,
                 transposed, mask_k, mask_n, diagnostic=None):
    n, s = pl.program_id(1), pl.program_id(2)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    col0 = n * bn
    acc_shape = (bn, bm) if cfg.swap_ab else (bm, bn)

    def body(kk, carry):
        acc_i, acc_j = carry
        k0 = pl.multiple_of((s * nks + kk) * bk, bk)
        words = _load_words(w_ref, k0, col0, bk=bk, bn=bn, K=K, N=N, transposed=transposed,
                            mask_k=mask_k, mask_n=mask_n, ref_col0=0,
                            evict_first=cfg.evict_first)
        if diagnostic == "no_decode":  # same streaming, no decode ALU work
            w_i = w_j = lax.bitcast_convert_type(words, jnp.bfloat16)
        else:
            w_i, w_j = decode(words)        # ONE load, two decoded tiles
        a_i = ai_ref[:, pl.ds(k0, bk)]           # activations are zero-padded: no mask
        a_j = aj_ref[:, pl.ds(k0, bk)]
        mma = functools.partial(_mma, transposed=transposed, swap_ab=cfg.swap_ab)
        return acc_i + mma(a_i, w_i), acc_j + mma(a_j, w_j)

    zero = jnp.zeros(acc_shape, jnp.float32)
    acc_i, acc_j = lax.fori_loop(0, nks, body, (zero, zero))
    if cfg.swap_ab:
        acc_i, acc_j = acc_i.T, acc_j.T
    oi_ref[...] = acc_i.astype(oi_ref.dtype)
    oj_ref[...] = acc_j.astype(oj_ref.dtype)


def triton_pair_gemm(a_i: jax.Array, a_j: jax.Array, words: jax.Array, *, transposed: bool = False,
                     config: TritonConfig | None = None, interpret: bool = False, out_dtype=jnp.bfloat16,
                     diagnostic: str | None = None) -> tuple[jax.Array, jax.Array]:
    """``(A_i @ W_i, A_j @ W_j)`` for one pair's ``words`` (uint16 [K, N], or [N, K] when
    ``transposed``); ``a_i`` [M_i, K], ``a_j`` [M_j, K], any M >= 0.  ``config`` defaults to
    ``pair_config``.  ``diagnostic="no_decode"`` (benchmarks only) feeds the words bitcast to bf16
    to both MMAs: the same streaming without the decode."""
    if words.ndim != 2:
        raise ValueError(f"words must be [K, N], got shape {words.shape}")
    words = words if words.dtype == jnp.uint16 else lax.bitcast_convert_type(words, jnp.uint16)
    K, N = (words.shape[1], words.shape[0]) if transposed else words.shape
    if a_i.shape[-1] != K or a_j.shape[-1] != K:
        raise ValueError(f"activations must have K={K} columns, got {a_i.shape}, {a_j.shape}")
    mi, mj = a_i.shape[0], a_j.shape[0]
    m = max(mi, mj)
    cfg = fit_smem(config or pair_config(m, K, N), n_a=2, n_w=1)
    bm, bn, bk, S = cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k
    m_tiles, n_tiles = pl.cdiv(max(m, 1), bm), pl.cdiv(N, bn)
    nks = pl.cdiv(pl.cdiv(K, bk), S)
    Mp, Np, Kp = m_tiles * bm, n_tiles * bn, S * nks * bk

    def pad(a):
        a = a.astype(jnp.bfloat16)
        return jnp.pad(a, ((0, Mp - a.shape[0]), (0, Kp - K)))

    kernel = functools.partial(_pair_kernel, K=K, N=N, cfg=cfg, nks=nks, transposed=transposed,
                               mask_k=Kp != K, mask_n=Np != N, diagnostic=diagnostic)
    a_spec = pl.BlockSpec((bm, Kp), lambda m_, n_, s_: (m_, 0))
    if transposed:
        w_spec = pl.BlockSpec((bn, K), lambda m_, n_, s_: (n_, 0))
    else:
        w_spec = pl.BlockSpec((K, bn), lambda m_, n_, s_: (0, n_))
    if S == 1:
        o_spec = pl.BlockSpec((bm, bn), lambda m_, n_, s_: (m_, n_))
        o_shape = jax.ShapeDtypeStruct((Mp, Np), out_dtype)
    else:
        o_spec = pl.BlockSpec((None, bm, bn), lambda m_, n_, s_: (s_, m_, n_))
        o_shape = jax.ShapeDtypeStruct((S, Mp, Np), jnp.float32)
    o_i, o_j = pl.pallas_call(
        kernel, grid=(m_tiles, n_tiles, S),
        in_specs=[a_spec, a_spec, w_spec], out_specs=[o_spec, o_spec],
        out_shape=[o_shape, o_shape], compiler_params=_params(cfg),
        interpret=interpret, name="pair_gemm",
    )(pad(a_i), pad(a_j), words)
    if S > 1:
        o_i, o_j = o_i.sum(0).astype(out_dtype), o_j.sum(0).astype(out_dtype)
    return o_i[:mi, :N], o_j[:mj, :N]


def _grouped_kernel(meta_ref, x_ref, *refs, K, N, cfg: TritonConfig, nks, swiglu, mask_k, mask_n):
    n_w = 2 if swiglu else 1
    w_refs, o_ref = refs[:n_w], refs[n_w]
    m, n, p, s = (pl.program_id(a) for a in range(4))
    o_lead = (s,) if cfg.split_k > 1 else ()
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    start_i, size_i = meta_ref[p, 0], meta_ref[p, 1]
    start_j, size_j = meta_ref[p, 2], meta_ref[p, 3]
    r0 = m * bm
    rows = lax.broadcasted_iota(jnp.int32, (bm, 1), 0) + r0
    ok_i, ok_j = rows < size_i, rows < size_j          # [bm, 1]
    row_i, row_j = pl.ds(start_i + r0, bm), pl.ds(start_j + r0, bm)
    col0 = n * bn

    @pl.when(r0 < jnp.maximum(size_i, size_j))
    def _():
        def body(k, carry):
            k0 = pl.multiple_of((s * nks + k) * bk, bk)
            ks = pl.ds(k0, bk)
            a_mask_i, a_mask_j = ok_i, ok_j
            if mask_k:
                k_ok = (k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)) < K
                a_mask_i, a_mask_j = ok_i & k_ok, ok_j & k_ok
            a_i = pltriton.load(x_ref.at[row_i, ks], mask=jnp.broadcast_to(a_mask_i, (bm, bk)),
                                other=jnp.bfloat16(0))
            a_j = pltriton.load(x_ref.at[row_j, ks], mask=jnp.broadcast_to(a_mask_j, (bm, bk)),
                                other=jnp.bfloat16(0))
            out = []
            for t, w_ref in enumerate(w_refs):
                words = _load_words(w_ref, k0, col0, bk=bk, bn=bn, K=K, N=N, transposed=False,
                                    mask_k=mask_k, mask_n=mask_n, lead=(p,),
                                    evict_first=cfg.evict_first)
                w_i, w_j = decode(words)
                acc_i, acc_j = carry[2 * t], carry[2 * t + 1]
                out += [acc_i + jnp.dot(a_i, w_i, preferred_element_type=jnp.float32),
                        acc_j + jnp.dot(a_j, w_j, preferred_element_type=jnp.float32)]
            return tuple(out)

        zero = jnp.zeros((bm, bn), jnp.float32)
        accs = lax.fori_loop(0, nks, body, (zero,) * (2 * n_w))
        if swiglu:
            y_i, y_j = silu(accs[0]) * accs[2], silu(accs[1]) * accs[3]
        else:
            y_i, y_j = accs
        cols = pl.ds(col0, bn)
        st_i, st_j = ok_i, ok_j
        if mask_n:
            n_ok = (col0 + lax.broadcasted_iota(jnp.int32, (1, bn), 1)) < N
            st_i, st_j = ok_i & n_ok, ok_j & n_ok
        pltriton.store(o_ref.at[o_lead + (row_i, cols)], y_i.astype(o_ref.dtype),
                       mask=jnp.broadcast_to(st_i, (bm, bn)))
        pltriton.store(o_ref.at[o_lead + (row_j, cols)], y_j.astype(o_ref.dtype),
                       mask=jnp.broadcast_to(st_j, (bm, bn)))


def triton_grouped_pair_gemm(xs: jax.Array, meta: jax.Array, words, *, max_rows: int,
                             swiglu: bool = False, out_dtype=jnp.float32,
                             config: TritonConfig | None = None, interpret: bool = False):
    """All pairs of a layer in one launch.

    ``xs`` [R, K] rows grouped by expert; ``meta`` int32 [P, 4] = (start_i, size_i, start_j,
    size_j) per pair (row ranges of its experts in ``xs``); ``words`` uint16 [P, K, N] (or a pair
    ``(gate, up)`` of them with ``swiglu``); ``max_rows`` a static bound on any group's size.
    Returns [R, N] with the rows of the packed experts written (``silu(x Wg) * (x Wu)`` with
    ``swiglu``); rows of no pair are left unwritten (callers select them away).
    """
    ws = tuple(words) if swiglu else (words,)
    return _grouped_launch(_grouped_kernel, meta, xs, ws, max_rows=max_rows, swiglu=swiglu, out_dtype=out_dtype,
                           config=config, n_a=2, interpret=interpret, name="grouped_pair_gemm")


def _grouped_launch(kernel_fn, meta, xs, ws, *, max_rows, swiglu, out_dtype, config, n_a, interpret, name):
    """One grouped launch over grid (row tile, column tile, group, K split) for ``ws`` [G, K, N]
    weights (words or bf16); split-K partials summed here."""
    G, K, N = ws[0].shape
    R = xs.shape[0]
    cfg = fit_smem(config or layer_config(max_rows, K, N, swiglu=swiglu), n_a=n_a, n_w=len(ws))
    bm, bn, bk, S = cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k
    if swiglu and S > 1:
        raise ValueError("split_k > 1 cannot be used with the fused SwiGLU epilogue")
    m_tiles, n_tiles = pl.cdiv(max(max_rows, 1), bm), pl.cdiv(N, bn)
    nks = pl.cdiv(pl.cdiv(K, bk), S)
    kernel = functools.partial(kernel_fn, K=K, N=N, cfg=cfg, nks=nks, swiglu=swiglu,
                               mask_k=S * nks * bk != K, mask_n=n_tiles * bn != N)
    any_spec = pl.no_block_spec
    o_shape = (R, N) if S == 1 else (S, R, N)
    out = pl.pallas_call(
        kernel, grid=(m_tiles, n_tiles, G, S),
        in_specs=[any_spec] * (2 + len(ws)), out_specs=any_spec,
        out_shape=jax.ShapeDtypeStruct(o_shape, out_dtype if S == 1 else jnp.float32),
        compiler_params=_params(cfg), interpret=interpret,
        name=name + ("_gate_up" if swiglu else "_down"),
    )(meta.astype(jnp.int32), xs.astype(jnp.bfloat16), *ws)
    return out if S == 1 else out.sum(0).astype(out_dtype)


def _grouped_dense_kernel(meta_ref, x_ref, *refs, K, N, cfg: TritonConfig, nks, swiglu, mask_k, mask_n):
    n_w = 2 if swiglu else 1
    w_refs, o_ref = refs[:n_w], refs[n_w]
    m, n, e, s = (pl.program_id(a) for a in range(4))
    o_lead = (s,) if cfg.split_k > 1 else ()
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    start, size = meta_ref[e, 0], meta_ref[e, 1]
    r0 = m * bm
    ok = (lax.broadcasted_iota(jnp.int32, (bm, 1), 0) + r0) < size   # [bm, 1]
    row = pl.ds(start + r0, bm)
    col0 = n * bn

    @pl.when(r0 < size)   # experts without rows in this tile read nothing
    def _():
        def body(k, accs):
            k0 = pl.multiple_of((s * nks + k) * bk, bk)
            a_mask = ok
            if mask_k:
                a_mask = ok & ((k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)) < K)
            a = pltriton.load(x_ref.at[row, pl.ds(k0, bk)], mask=jnp.broadcast_to(a_mask, (bm, bk)),
                              other=jnp.bfloat16(0))
            out = []
            for w_ref, acc in zip(w_refs, accs):
                w = _load_words(w_ref, k0, col0, bk=bk, bn=bn, K=K, N=N, transposed=False, mask_k=mask_k,
                                mask_n=mask_n, lead=(e,), evict_first=cfg.evict_first, dtype=jnp.bfloat16)
                out.append(acc + jnp.dot(a, w, preferred_element_type=jnp.float32))
            return tuple(out)

        accs = lax.fori_loop(0, nks, body, (jnp.zeros((bm, bn), jnp.float32),) * n_w)
        y = silu(accs[0]) * accs[1] if swiglu else accs[0]
        st = ok
        if mask_n:
            st = ok & ((col0 + lax.broadcasted_iota(jnp.int32, (1, bn), 1)) < N)
        pltriton.store(o_ref.at[o_lead + (row, pl.ds(col0, bn))], y.astype(o_ref.dtype),
                       mask=jnp.broadcast_to(st, (bm, bn)))


def triton_grouped_gemm(xs: jax.Array, meta: jax.Array, w, *, max_rows: int, swiglu: bool = False,
                        out_dtype=jnp.float32, config: TritonConfig | None = None, interpret: bool = False):
    """Uncompressed experts of a layer in one launch: ``xs`` [R, K] rows grouped by expert, ``meta``
    int32 [E, 2] = (start, size) per expert, ``w`` bf16 [E, K, N] (or ``(gate, up)`` with
    ``swiglu``: ``silu(x Wg) * (x Wu)``); ``max_rows`` a static bound on any group's size.  Returns
    [R, N] with the rows of every expert written (rows of no expert are left unwritten)."""
    ws = tuple(v.astype(jnp.bfloat16) for v in (tuple(w) if swiglu else (w,)))
    return _grouped_launch(_grouped_dense_kernel, meta, xs, ws, max_rows=max_rows, swiglu=swiglu,
                           out_dtype=out_dtype, config=config, n_a=1, interpret=interpret, name="grouped_gemm")
