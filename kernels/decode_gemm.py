"""Pallas-Triton decode-GEMM for packed expert pairs (one uint16 word -> two bf16 weights).

Two kernels, one decode:

* ``dual_decode_gemm(a_i, a_j, words)`` -- one merged pair: each packed ``[bk, bn]`` tile is loaded
  once, decoded in registers into expert i's and expert j's bf16 tiles
  (``codec.decode_words``: mask, sign, exponent + 112) and fed to two MMAs,
  ``O_i = A_i @ W_i`` and ``O_j = A_j @ W_j``.  Any token count (0 included: rows are padded to
  the MMA minimum of 16), any K and N (edge tiles are masked), words stored ``[K, N]`` or
  transposed ``[N, K]``, optional split-K (f32 partials summed by XLA).
* ``grouped_dual_gemm(xs, meta, words)`` -- a whole layer's pairs in one launch, rows grouped by
  expert as for ``jax.lax.ragged_dot``: program ``(m, n, p)`` reads pair ``p``'s column tile
  ``n`` once per K step and multiplies it with row tile ``m`` of expert i's rows and of expert
  j's rows (``meta[p] = start_i, size_i, start_j, size_j``); programs whose row tile is empty for
  both experts exit at once.  ``silu_mul=True`` fuses the gate and up projections
  (two packed weights, four accumulators, ``silu(x W_gate) * (x W_up)`` epilogue).

``packed_moe_ffn`` is the routed-expert FFN of a ``PackedExperts`` layer built from these; every
kernel has a plain-jnp reference (decode, then dots) that the tests compare it with.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from puzzlemoe_jax import codec
from puzzlemoe_jax.experts import PackedExperts

IMPLS = ("auto", "pallas", "reference")
PAIR_IMPLS = IMPLS + ("mosaic",)
MIN_ROWS = 16  # smallest MMA row tile; fewer tokens are padded/masked up to it


# --------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------

def decode_tile(w16: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint16 words (any shape) -> (expert i, expert j) bf16 tiles; the in-kernel decode."""
    bits_i, bits_j = codec.decode_words(w16)
    as_bf16 = functools.partial(lax.bitcast_convert_type, new_dtype=jnp.bfloat16)
    return as_bf16(bits_i), as_bf16(bits_j)


# --------------------------------------------------------------------------------------------
# tile configuration
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch parameters of one kernel call (all block sizes powers of two)."""
    bm: int = 16          # rows (tokens) per program, >= 16
    bn: int = 64          # output columns per program
    bk: int = 128         # K step of the in-kernel loop
    split_k: int = 1      # K splits (pair kernel only): f32 partials summed outside
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False  # compute O^T = W^T A^T (weights on the MMA's M side)
    evict_first: bool = False  # L2 eviction hint on the streamed weight tiles

    def __post_init__(self):
        for name in ("bm", "bn", "bk"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")


def _largest_pow2_divisor(x: int, cap: int) -> int:
    d = 1
    while d < cap and x % (2 * d) == 0:
        d *= 2
    return d


NUM_SMS = 132  # H100 / H200


def pair_config(m: int, k: int, n: int) -> TileConfig:
    """Tile table for the pair kernel, by tokens per expert ``m`` and weight shape [k, n].

    From the H100 sweep (benchmarks/RESULTS.md): M <= 32: one 16/32-row tile, ``bn=64``,
    ``bk=128``, 4 warps (every variant tried at Mixtral shapes lay within 52-65 us);
    M = 33..64: ``bm=64, bn=128, bk=64``, 8 warps; M > 64: ``bm=128, bn=128, bk=64``, 8 warps
    (2x faster than 64-row tiles at M = 128-256).  ``bk`` is capped by the largest power of two
    dividing k (>= 64, masked edges otherwise).  K is split until the launch has >= 200
    programs (1.5 per SM), keeping >= 4 K steps per program.
    """
    if m <= 32:
        bm, bn, bk_cap, warps = max(MIN_ROWS, pl.next_power_of_2(max(m, 1))), 64, 128, 4
    elif m <= 64:
        bm, bn, bk_cap, warps = 64, 128, 64, 8
    else:
        bm, bn, bk_cap, warps = 128, 128, 64, 8
    bk = max(_largest_pow2_divisor(k, bk_cap), 64)
    bn = min(bn, max(16, pl.next_power_of_2(n)))
    m_tiles, n_tiles, nk = pl.cdiv(max(m, 1), bm), pl.cdiv(n, bn), pl.cdiv(k, bk)
    split = 1
    while (m_tiles * n_tiles * split < 200 and nk % (2 * split) == 0
           and nk // (2 * split) >= 4):
        split *= 2
    return TileConfig(bm=bm, bn=bn, bk=bk, split_k=split, num_warps=warps, num_stages=4)


def layer_config(rows: int, k: int, n: int, num_pairs: int, *, fused: bool = False) -> TileConfig:
    """Tile table for the grouped (whole-layer) kernel: ``rows`` bounds one expert's rows.

    From the H100 layer sweeps (Mixtral shapes, RESULTS.md §4 and §7): 16-row tiles up to 32
    assignments, 32-row tiles up to 2047 (64- and 128-row tiles were 1.1-2x slower there), 128-row
    tiles with 8 warps from 2048 assignments (1.12x faster at 1024 tokens top-2: each extra row
    tile of a pair decodes its weights again); ``bk=64``.  ``fused`` (gate+up with the SwiGLU
    epilogue) cannot split K; the down projection splits K until >= 2 programs per SM even if
    only one pair is active (split 8 at Mixtral's 14336 x 4096).
    """
    bm, warps = (16, 4) if rows <= 32 else (32, 4) if rows < 2048 else (128, 8)
    bk = max(_largest_pow2_divisor(k, 64), 64)
    bn = 64
    n_tiles, nk = pl.cdiv(n, bn), pl.cdiv(k, bk)
    split = 1
    while (not fused and n_tiles * split < 2 * NUM_SMS and nk % (2 * split) == 0
           and nk // (2 * split) >= 4):
        split *= 2
    return TileConfig(bm=bm, bn=bn, bk=bk, split_k=split, num_warps=warps, num_stages=4)


SMEM_BUDGET = 200 * 1024  # of the H100's 227 KB per block, with room for Triton's scratch


def _fit_smem(cfg: TileConfig, n_a: int, n_w: int) -> TileConfig:
    """Lower ``num_stages`` until the pipeline buffers fit shared memory (estimate: Triton keeps
    ``num_stages - 1`` copies of the per-step tiles, plus the two decoded bf16 tiles per weight)."""
    per_stage = 2 * (n_a * cfg.bm * cfg.bk + n_w * cfg.bk * cfg.bn)
    decoded = n_w * 2 * 2 * cfg.bk * cfg.bn
    stages = cfg.num_stages
    while stages > 2 and (stages - 1) * per_stage + decoded > SMEM_BUDGET:
        stages -= 1
    return cfg if stages == cfg.num_stages else dataclasses.replace(cfg, num_stages=stages)


def _params(cfg: TileConfig):
    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _interpret(interpret):
    return (not _on_gpu()) if interpret is None else bool(interpret)


# --------------------------------------------------------------------------------------------
# pair kernel
# --------------------------------------------------------------------------------------------

def _mma(a, w, *, transpose_w: bool, swap_ab: bool):
    """f32 product of an activation tile a [bm, bk] and a decoded weight tile.

    w is [bk, bn] (or [bn, bk] when ``transpose_w``).  Returns [bm, bn], or [bn, bm] when
    ``swap_ab`` (the weights then sit on the MMA's M side).
    """
    w_contract = 1 if transpose_w else 0
    if swap_ab:
        return lax.dot_general(w, a, (((w_contract,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
    return lax.dot_general(a, w, (((1,), (w_contract,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _load_words(w_ref, k0, col0, *, bk, bn, K, N, transpose_w, mask_k, mask_n, ref_col0=None,
                lead=(), evict_first=False):
    """One packed tile ([bk, bn], or [bn, bk] transposed) with edges masked to word 0 (= zero).

    ``col0`` is the tile's first column in the whole matrix (for the edge mask); ``ref_col0``
    its first column inside ``w_ref`` (0 when a BlockSpec already offset the ref); ``lead``
    indexes leading axes (one indexer: Triton lowering takes no chained ``.at``).
    """
    ks, ns = pl.ds(k0, bk), pl.ds(col0 if ref_col0 is None else ref_col0, bn)
    idx = tuple(lead) + ((ns, ks) if transpose_w else (ks, ns))
    hint = dict(eviction_policy="evict_first") if evict_first else {}
    if not (mask_k or mask_n):
        return pltriton.load(w_ref.at[idx], **hint) if hint else w_ref[idx]
    kk = k0 + lax.broadcasted_iota(jnp.int32, (bk, 1) if not transpose_w else (1, bk),
                                   0 if not transpose_w else 1)
    nn = col0 + lax.broadcasted_iota(jnp.int32, (1, bn) if not transpose_w else (bn, 1),
                                     1 if not transpose_w else 0)
    mask = None
    if mask_k:
        mask = kk < K
    if mask_n:
        mask = (nn < N) if mask is None else (mask & (nn < N))
    shape = (bn, bk) if transpose_w else (bk, bn)
    mask = jnp.broadcast_to(mask, shape)
    return pltriton.load(w_ref.at[idx], mask=mask, other=jnp.uint16(0), **hint)


def _pair_kernel(ai_ref, aj_ref, w_ref, oi_ref, oj_ref, *, K, N, cfg: TileConfig, nks,
                 transpose_w, mask_k, mask_n, no_decode=False):
    n, s = pl.program_id(1), pl.program_id(2)
    bm, bn, bk = cfg.bm, cfg.bn, cfg.bk
    col0 = n * bn
    acc_shape = (bn, bm) if cfg.swap_ab else (bm, bn)

    def body(kk, carry):
        acc_i, acc_j = carry
        k0 = pl.multiple_of((s * nks + kk) * bk, bk)
        words = _load_words(w_ref, k0, col0, bk=bk, bn=bn, K=K, N=N, transpose_w=transpose_w,
                            mask_k=mask_k, mask_n=mask_n, ref_col0=0,
                            evict_first=cfg.evict_first)
        if no_decode:  # diagnostic only (benchmarks): same streaming, no decode ALU work
            w_i = w_j = lax.bitcast_convert_type(words, jnp.bfloat16)
        else:
            w_i, w_j = decode_tile(words)        # ONE load, two decoded tiles
        a_i = ai_ref[:, pl.ds(k0, bk)]           # activations are zero-padded: no mask
        a_j = aj_ref[:, pl.ds(k0, bk)]
        mma = functools.partial(_mma, transpose_w=transpose_w, swap_ab=cfg.swap_ab)
        return acc_i + mma(a_i, w_i), acc_j + mma(a_j, w_j)

    zero = jnp.zeros(acc_shape, jnp.float32)
    acc_i, acc_j = lax.fori_loop(0, nks, body, (zero, zero))
    if cfg.swap_ab:
        acc_i, acc_j = acc_i.T, acc_j.T
    oi_ref[...] = acc_i.astype(oi_ref.dtype)
    oj_ref[...] = acc_j.astype(oj_ref.dtype)


def dual_decode_gemm_reference(a_i, a_j, words, *, transpose_w: bool = False,
                               out_dtype=jnp.bfloat16):
    """Plain-jnp reference: decode the packed words, then two f32-accumulated dots."""
    w_i, w_j = codec.decode(words)
    if transpose_w:
        w_i, w_j = w_i.T, w_j.T
    dot = lambda a, w: jnp.dot(a.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
    return dot(a_i, w_i).astype(out_dtype), dot(a_j, w_j).astype(out_dtype)


# ``impl="auto"``: the pair kernel up to PAIR_KERNEL_MAX_M tokens per expert for large matrices
# (K*N >= 2**24, e.g. Mixtral), up to PAIR_KERNEL_MAX_M_SMALL for smaller ones; decode + two XLA
# dots above (H100: decode+dots won at M=256 everywhere and at M=128 for DeepSeek/Qwen shapes).
PAIR_KERNEL_MAX_M = 128
PAIR_KERNEL_MAX_M_SMALL = 64


def pair_kernel_wins(m: int, k: int, n: int) -> bool:
    """Whether ``impl="auto"`` uses the pair kernel (else the decode + two dots path)."""
    return m <= (PAIR_KERNEL_MAX_M if k * n >= 1 << 24 else PAIR_KERNEL_MAX_M_SMALL)


def dual_decode_gemm(a_i: jax.Array, a_j: jax.Array, words: jax.Array, *,
                     transpose_w: bool = False, config: TileConfig | None = None,
                     impl: str = "auto", interpret: bool | None = None,
                     out_dtype=jnp.bfloat16, _no_decode: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(A_i @ W_i, A_j @ W_j)`` for one packed pair ``words`` (uint16 [K, N], or [N, K] with
    ``transpose_w``).  ``a_i`` [M_i, K], ``a_j`` [M_j, K] (any M >= 0, also different).

    ``impl``: "pallas" forces the kernel, "reference" the jnp path, "auto" the kernel where the
    H100 sweep found it faster (``pair_kernel_wins``); "mosaic" the Mosaic-GPU swap-AB kernel
    (``kernels.mosaic_pair``, Hopper only; transposed words only), the fastest on the H100 and
    H200 at Mixtral shapes up to M = 128 (benchmarks/RESULTS.md §7).  ``interpret=None`` runs the kernel in interpret mode off GPU.
    """
    if impl not in PAIR_IMPLS:
        raise ValueError(f"impl must be one of {PAIR_IMPLS}, got {impl!r}")
    if impl == "mosaic":
        if not transpose_w or config is not None:
            raise ValueError('impl="mosaic" takes transposed words [N, K] (transpose_w=True) and its own '
                             "settings (kernels.mosaic_pair.mosaic_config), not a TileConfig")
        from kernels.mosaic_pair import mosaic_dual_decode_gemm  # noqa: PLC0415
        return mosaic_dual_decode_gemm(a_i, a_j, words, interpret=_interpret(interpret), out_dtype=out_dtype)
    if words.ndim != 2:
        raise ValueError(f"words must be [K, N], got shape {words.shape}")
    words = words if words.dtype == jnp.uint16 else lax.bitcast_convert_type(words, jnp.uint16)
    K, N = (words.shape[1], words.shape[0]) if transpose_w else words.shape
    if a_i.shape[-1] != K or a_j.shape[-1] != K:
        raise ValueError(f"activations must have K={K} columns, got {a_i.shape}, {a_j.shape}")
    mi, mj = a_i.shape[0], a_j.shape[0]
    m = max(mi, mj)
    if impl == "reference" or (impl == "auto" and not pair_kernel_wins(m, K, N)):
        return dual_decode_gemm_reference(a_i, a_j, words, transpose_w=transpose_w,
                                          out_dtype=out_dtype)
    cfg = _fit_smem(config or pair_config(m, K, N), n_a=2, n_w=1)
    bm, bn, bk, S = cfg.bm, cfg.bn, cfg.bk, cfg.split_k
    m_tiles, n_tiles = pl.cdiv(max(m, 1), bm), pl.cdiv(N, bn)
    nks = pl.cdiv(pl.cdiv(K, bk), S)
    Mp, Np, Kp = m_tiles * bm, n_tiles * bn, S * nks * bk

    def pad(a):
        a = a.astype(jnp.bfloat16)
        return jnp.pad(a, ((0, Mp - a.shape[0]), (0, Kp - K)))

    kernel = functools.partial(_pair_kernel, K=K, N=N, cfg=cfg, nks=nks, transpose_w=transpose_w,
                               mask_k=Kp != K, mask_n=Np != N, no_decode=_no_decode)
    a_spec = pl.BlockSpec((bm, Kp), lambda m_, n_, s_: (m_, 0))
    if transpose_w:
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
        interpret=_interpret(interpret), name="dual_decode_gemm",
    )(pad(a_i), pad(a_j), words)
    if S > 1:
        o_i, o_j = o_i.sum(0).astype(out_dtype), o_j.sum(0).astype(out_dtype)
    return o_i[:mi, :N], o_j[:mj, :N]


# --------------------------------------------------------------------------------------------
# grouped (whole-layer) kernel
# --------------------------------------------------------------------------------------------

def _grouped_kernel(meta_ref, x_ref, *refs, K, N, cfg: TileConfig, nks, silu_mul, mask_k, mask_n):
    n_w = 2 if silu_mul else 1
    w_refs, o_ref = refs[:n_w], refs[n_w]
    m, n, p, s = (pl.program_id(a) for a in range(4))
    o_lead = (s,) if cfg.split_k > 1 else ()
    bm, bn, bk = cfg.bm, cfg.bn, cfg.bk
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
                words = _load_words(w_ref, k0, col0, bk=bk, bn=bn, K=K, N=N, transpose_w=False,
                                    mask_k=mask_k, mask_n=mask_n, lead=(p,),
                                    evict_first=cfg.evict_first)
                w_i, w_j = decode_tile(words)
                acc_i, acc_j = carry[2 * t], carry[2 * t + 1]
                out += [acc_i + jnp.dot(a_i, w_i, preferred_element_type=jnp.float32),
                        acc_j + jnp.dot(a_j, w_j, preferred_element_type=jnp.float32)]
            return tuple(out)

        zero = jnp.zeros((bm, bn), jnp.float32)
        accs = lax.fori_loop(0, nks, body, (zero,) * (2 * n_w))
        if silu_mul:
            silu = lambda g: g / (1.0 + jnp.exp(-g))
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


def grouped_dual_gemm(xs: jax.Array, meta: jax.Array, words, *, max_rows: int,
                      silu_mul: bool = False, out_dtype=jnp.float32,
                      config: TileConfig | None = None, interpret: bool | None = None):
    """All pairs of a layer in one launch.

    ``xs`` [R, K] rows grouped by expert; ``meta`` int32 [P, 4] = (start_i, size_i, start_j,
    size_j) per pair (row ranges of its experts in ``xs``); ``words`` uint16 [P, K, N] (or a pair
    ``(gate, up)`` of them with ``silu_mul``); ``max_rows`` a static bound on any group's size.
    Returns [R, N] with the rows of the packed experts written (``silu(x Wg) * (x Wu)`` with
    ``silu_mul``); rows of no pair are left unwritten (callers select them away).
    """
    ws = tuple(words) if silu_mul else (words,)
    P, K, N = ws[0].shape
    R = xs.shape[0]
    cfg = _fit_smem(config or layer_config(max_rows, K, N, P, fused=silu_mul), n_a=2, n_w=len(ws))
    bm, bn, bk, S = cfg.bm, cfg.bn, cfg.bk, cfg.split_k
    if silu_mul and S > 1:
        raise ValueError("split_k > 1 cannot be used with the fused SwiGLU epilogue")
    m_tiles, n_tiles = pl.cdiv(max(max_rows, 1), bm), pl.cdiv(N, bn)
    nks = pl.cdiv(pl.cdiv(K, bk), S)
    kernel = functools.partial(_grouped_kernel, K=K, N=N, cfg=cfg, nks=nks, silu_mul=silu_mul,
                               mask_k=S * nks * bk != K, mask_n=n_tiles * bn != N)
    any_spec = pl.no_block_spec
    o_shape = (R, N) if S == 1 else (S, R, N)
    out = pl.pallas_call(
        kernel, grid=(m_tiles, n_tiles, P, S),
        in_specs=[any_spec] * (2 + len(ws)), out_specs=any_spec,
        out_shape=jax.ShapeDtypeStruct(o_shape, out_dtype if S == 1 else jnp.float32),
        compiler_params=_params(cfg), interpret=_interpret(interpret),
        name="grouped_dual_gemm_" + ("gate_up" if silu_mul else "down"),
    )(meta.astype(jnp.int32), xs.astype(jnp.bfloat16), *ws)
    return out if S == 1 else out.sum(0).astype(out_dtype)


def grouped_dual_gemm_reference(xs, meta, words, *, silu_mul: bool = False,
                                out_dtype=jnp.float32):
    """jnp reference of ``grouped_dual_gemm``: rows of no pair are returned as 0."""
    ws = tuple(words) if silu_mul else (words,)
    P = ws[0].shape[0]
    R = xs.shape[0]
    rows = jnp.arange(R)
    xs = xs.astype(jnp.bfloat16)
    out = jnp.zeros((R, ws[0].shape[2]), jnp.float32)
    for p in range(P):
        prods = []
        for w in ws:
            w_i, w_j = codec.decode(w[p])
            prods.append((jnp.dot(xs, w_i, preferred_element_type=jnp.float32),
                          jnp.dot(xs, w_j, preferred_element_type=jnp.float32)))
        if silu_mul:
            y_i, y_j = (jax.nn.silu(prods[0][t]) * prods[1][t] for t in range(2))
        else:
            y_i, y_j = prods[0]
        in_i = (rows >= meta[p, 0]) & (rows < meta[p, 0] + meta[p, 1])
        in_j = (rows >= meta[p, 2]) & (rows < meta[p, 2] + meta[p, 3])
        out = jnp.where(in_i[:, None], y_i, jnp.where(in_j[:, None], y_j, out))
    return out.astype(out_dtype)


# --------------------------------------------------------------------------------------------
# packed MoE layer
# --------------------------------------------------------------------------------------------

def _slot_order(experts: PackedExperts):
    """Expert id -> slot: dense experts first (slots 0..D-1), then pair p's i at D+2p, j at D+2p+1.

    Returns ``(slot_of, P, D)``; ``slot_of(ids)`` maps ids of experts this layer does not hold
    (dropped, or held by another device) to slot D+2P, which is in no group.  A compare against the
    D+2P held ids (one small fusion; no scatters, which cost a kernel each on the GPU).
    """
    P, D = experts.pairs.shape[0], experts.dense_ids.shape[0]
    held = experts.pairs.reshape(-1).astype(jnp.int32)
    if D:   # (no zero-sized concatenate: XLA:CPU crashed on one under shard_map)
        held = jnp.concatenate([experts.dense_ids.astype(jnp.int32), held])

    def slot_of(ids):
        eq = ids[..., None] == held
        return jnp.where(eq.any(-1), jnp.argmax(eq, -1), D + 2 * P).astype(jnp.int32)
    return slot_of, P, D


def _slot_weights(experts: PackedExperts, name: str, dtype) -> jax.Array:
    """Decoded ``[D + 2P, K, N]`` weights of one matrix in slot order (``_slot_order``): one
    decode fusion, no ``[E, K, N]`` scatter (``PackedExperts.unpack``)."""
    hat_i, hat_j = codec.decode(experts.packed[name])
    pairs = jnp.stack([hat_i, hat_j], 1).reshape((-1,) + hat_i.shape[1:]).astype(dtype)
    if experts.dense_ids.shape[0] == 0:
        return pairs
    return jnp.concatenate([experts.dense[name].astype(dtype), pairs])


def mosaic_layer_words(experts: PackedExperts) -> dict[str, jax.Array]:
    """The layer's words in the Mosaic grouped kernel's layout (``packed_moe_ffn(impl="mosaic")``):
    ``gate_up`` uint16 [P, 2I, H] (gate's then up's transposed words) and ``down`` [P, H, I].
    A full copy of the packed weights: build it once, when the layer is loaded."""
    pk = experts.packed
    t = lambda w: jnp.swapaxes(w, 1, 2)  # noqa: E731
    return {"gate_up": jnp.concatenate([t(pk["w_gate"]), t(pk["w_up"])], axis=1), "down": t(pk["w_down"])}


def _mosaic_pairs(x, tokens, slots, sizes, D, experts: PackedExperts, words, interpret, settings=(None, None)):
    """The merged pairs' down-projected outputs with the Mosaic grouped kernel (two launches), for the
    R = T*k routed rows in slot order (``tokens``: their token in ``x``, ``slots``: their slot).
    Returns ``(y [R_pad, H] f32, row [R])``: row r's output is ``y[row[r]]`` if r belongs to a pair
    (other rows point anywhere).  The padded layout is gathered from ``x`` (no scatter)."""
    from kernels.mosaic_pair import (  # noqa: PLC0415
        SWIGLU_MAX_BLOCK_M, grouped_block_m, grouped_layout, mosaic_grouped_dual_gemm)
    R = tokens.shape[0]
    P = experts.pairs.shape[0]
    words = words or mosaic_layer_words(experts)
    inter = words["gate_up"].shape[1] // 2
    gu_settings = dict(settings[0] or {})
    bm = gu_settings.pop("block_m", None) or grouped_block_m(R, experts.num_experts, x.shape[0])
    pad_start, tiles, padded_rows = grouped_layout(sizes, D, bm, R)
    starts = jnp.cumsum(sizes) - sizes
    # padded row q -> the last pair slot starting at or before it; a real row if inside its size
    q = jnp.arange(padded_rows)
    slot_q = D - 1 + jnp.sum(q[:, None] >= pad_start[D:], axis=1)
    off = q - pad_start[slot_q]
    src_token = tokens[jnp.minimum(starts[slot_q] + off, R - 1)]
    # materialize the small index arrays: fused into the gather, XLA recomputed the [rows, 2P]
    # comparison for every element of xs_pad (175 µs of a 380 µs DeepSeek-V2-Lite step, RESULTS §8g)
    src_token, real = lax.optimization_barrier((src_token, off < sizes[slot_q]))
    xs_pad = jnp.where(real[:, None], x[src_token], 0).astype(jnp.bfloat16)
    slot_r = jnp.clip(slots, D, D + 2 * P - 1)
    row = jnp.clip(pad_start[slot_r] + jnp.arange(R) - starts[slot_r], 0, padded_rows - 1)
    gemm = functools.partial(mosaic_grouped_dual_gemm, tiles=tiles, block_m=bm, interpret=interpret)
    gu_settings = {"swiglu": bm <= SWIGLU_MAX_BLOCK_M, **gu_settings}
    if gu_settings["swiglu"]:   # SwiGLU in the kernel's epilogue
        h_t = gemm(xs_pad, words_t=words["gate_up"], **gu_settings)
    else:
        gu_t = gemm(xs_pad, words_t=words["gate_up"], **gu_settings).astype(jnp.float32)
        h_t = (jax.nn.silu(gu_t[:inter]) * gu_t[inter:]).astype(jnp.bfloat16)
    # h^T [I, R_pad] as it comes when its token blocks fill whole swizzle rows, else transposed
    h_in = dict(xs=h_t, xs_transposed=True) if bm % 64 == 0 else dict(xs=h_t.T)
    y_t = gemm(words_t=words["down"], **h_in, **(settings[1] or {}))
    return y_t.T, row


def packed_moe_ffn(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array,
                   experts: PackedExperts, *, interpret: bool | None = None, impl: str = "auto",
                   gate_up_config: TileConfig | None = None,
                   down_config: TileConfig | None = None, out_dtype=None,
                   mosaic_words: dict[str, jax.Array] | None = None,
                   mosaic_settings: tuple[dict | None, dict | None] = (None, None)) -> jax.Array:
    """Routed-expert FFN of a packed layer with the fused kernels: same function as
    ``moe.dense_moe_ffn(x, topk_ids, topk_weights, experts.unpack(x.dtype))``.

    Two kernel launches per step (gate+up fused with the SwiGLU epilogue, then down) for the
    merged pairs; experts left dense go through ``jax.lax.ragged_dot``.  ``impl``: "pallas" or
    "auto" run the kernels at any token count (on the H100 they beat both the uncompressed XLA
    layer and the decode path from 1 to 8192 tokens, benchmarks/RESULTS.md §7), "reference"
    decodes the layer (``_slot_weights``) and runs ``ragged_dot``; "mosaic" runs the pairs through the
    Mosaic-GPU grouped kernel (Hopper; ``mosaic_words`` = ``mosaic_layer_words(experts)``, built once,
    else built per call), the SwiGLU in the gate+up launch's epilogue (token blocks up to
    ``mosaic_pair.SWIGLU_MAX_BLOCK_M`` rows; in XLA between the launches above); ``mosaic_settings``:
    overrides of ``mosaic_config`` for the (gate+up, down) launches (benchmarks; gate+up's may also
    set ``swiglu``, ``out_dtype`` and the layout's token block ``block_m``).
    ``interpret=None``: interpret mode off GPU.  ``out_dtype``: of the result (default ``x.dtype``).
    """
    from puzzlemoe_jax.moe import combine, count_ids, dense_moe_ffn, sorted_position  # noqa: PLC0415 (moe imports us lazily)
    if impl not in PAIR_IMPLS:
        raise ValueError(f"impl must be one of {PAIR_IMPLS}, got {impl!r}")
    T, k = topk_ids.shape
    P = experts.pairs.shape[0]
    if P == 0 or T == 0:
        return dense_moe_ffn(x, topk_ids, topk_weights, experts.unpack(x.dtype), out_dtype)
    out_dtype = out_dtype or x.dtype
    slot_of, P, D = _slot_order(experts)   # dropped experts have no slot: they contribute zero
    slots = slot_of(topk_ids.reshape(-1))
    order = jnp.argsort(slots, stable=True)
    tokens = order // k
    sizes = count_ids(slots, D + 2 * P)
    pos = sorted_position(order)
    n_dense, n_held = jnp.sum(sizes[:D]), jnp.sum(sizes)
    if impl == "reference":
        # in the activations' dtype, as dense_moe_ffn on experts.unpack(x.dtype)
        dot = lambda a, name: lax.ragged_dot(a, _slot_weights(experts, name, x.dtype), sizes,  # noqa: E731
                                             preferred_element_type=jnp.float32)
        xs = x[tokens]
        h = (jax.nn.silu(dot(xs, "w_gate")) * dot(xs, "w_up")).astype(x.dtype)
        return combine([(dot(h, "w_down"), pos, pos < n_held)], topk_weights, out_dtype)
    xs = x[tokens].astype(jnp.bfloat16)
    in_pair = (pos >= n_dense) & (pos < n_held)
    if impl == "mosaic":
        y, row = _mosaic_pairs(x, tokens, slots[order], sizes, D, experts, mosaic_words, _interpret(interpret),
                               mosaic_settings)
        parts = [(y, row[pos], in_pair)]
    else:
        starts = jnp.cumsum(sizes) - sizes
        meta = jnp.stack([starts[D::2], sizes[D::2], starts[D + 1::2], sizes[D + 1::2]], axis=1)
        max_rows = T * k  # a group never exceeds the number of assignments
        pk = experts.packed
        h = grouped_dual_gemm(xs, meta, (pk["w_gate"], pk["w_up"]), max_rows=max_rows, silu_mul=True,
                              out_dtype=jnp.bfloat16, config=gate_up_config, interpret=interpret)
        y = grouped_dual_gemm(h, meta, pk["w_down"], max_rows=max_rows, silu_mul=False,
                              out_dtype=jnp.float32, config=down_config, interpret=interpret)
        parts = [(y, pos, in_pair)]
    if D:   # experts left dense: the first rows, through ragged_dot
        dn = {name: w.astype(jnp.bfloat16) for name, w in experts.dense.items()}
        dot = lambda a, w: lax.ragged_dot(a, w, sizes[:D], preferred_element_type=jnp.float32)  # noqa: E731
        h_dense = (jax.nn.silu(dot(xs, dn["w_gate"])) * dot(xs, dn["w_up"])).astype(jnp.bfloat16)
        parts.append((dot(h_dense, dn["w_down"]), pos, pos < n_dense))
    return combine(parts, topk_weights, out_dtype)
