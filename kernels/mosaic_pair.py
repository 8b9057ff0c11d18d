"""Mosaic-GPU (Hopper wgmma) variant of the pair decode-GEMM, beside the Pallas-Triton one.

Swap-AB: the kernel computes ``O^T = W^T A^T`` so that the decoded weights are the wgmma's A
operand, held in registers straight after the decode (no shared-memory round trip for an MMA
operand), and the few tokens are the wgmma's N side (8..128 per CTA; more tokens are split over CTAs).  The packed words are streamed
``[N, K]`` (K contiguous, i.e. stored transposed: ``words.T`` of the ``[K, N]`` layout) by TMA
through a ``max_concurrent_steps``-deep shared-memory pipeline; the activations ride along in the
same pipeline.  One CTA (one warpgroup) per ``block_n`` output columns, token block and K split.  The decode
works on two words per 32-bit register ("swar"): on 16-bit lanes it cost a third of the time.

Hopper only (sm_90a).  The tests run it in Mosaic GPU's CPU interpreter, which has neither
register-operand wgmma nor ``inline_mgpu``: there the decoded tiles are staged in shared memory and
decoded one word per op; the SWAR arithmetic is tested on every word pair in jnp
(``decode_pairs_swar``), the register path only on the GPU (benchmarks/bench_mosaic.py).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from puzzlemoe_jax import codec


SMEM_BYTES = 200 * 1024   # of the H100's 227 KB per block
TWO_PER_SM_BYTES = 112 * 1024   # shared memory per CTA with which two CTAs share an SM
NUM_SMS = 132   # H100 SXM and H200


def k_splits(k: int, n: int, block_n: int, block_k: int, min_ctas: int = 128, m_blocks: int = 1) -> int:
    """K splits (a power of two) until the launch has >= ``min_ctas`` CTAs, keeping >= 4 K steps each."""
    split = 1
    while (n // block_n) * m_blocks * split < min_ctas and (k // block_k) % (2 * split) == 0 and k // block_k // (2 * split) >= 4:
        split *= 2
    return split


MAX_BLOCK_M = 128   # tokens per CTA: two f32 accumulators of [64, 256] would not fit the registers


def _padded_tokens(m: int, block_m: int | None = None) -> tuple[int, int]:
    """(padded token count, tokens per CTA): a multiple of 8 (the wgmma N step) up to
    ``MAX_BLOCK_M``, beyond that a multiple of the token block."""
    mp = max(8, -(-m // 8) * 8)
    block_m = min(block_m or MAX_BLOCK_M, mp)
    return -(-mp // block_m) * block_m, block_m


def mosaic_config(m: int, k: int, n: int, m_blocks: int | None = None, word_tiles: int = 1) -> dict:
    """Default settings from the H100 runs (benchmarks/RESULTS.md §6, §7): 64-row word tiles, K
    split until the launch has >= 128 CTAs (about one per SM), SWAR decode, more than
    ``MAX_BLOCK_M`` tokens split over CTAs (each re-reads the words, mostly from L2).  Pipeline:
    a launch that fits one wave at one CTA per SM gets <= 4 stages of 128-deep K tiles in 200 KB
    (Mixtral w2); a larger one gets 2 stages small enough for two CTAs per SM, 128-deep K
    tiles if they fit (Mixtral w1/w3: 5-12 % faster than 4 stages up to 64 tokens, 21 % at 128).
    ``m_blocks``: token blocks of the launch when not ``m``'s (the grouped kernel: its live tiles).
    ``word_tiles``: word tiles per CTA and K step (2: the SwiGLU launch streams gate and up rows; its
    ``n`` output columns are ``n / 2`` CTA columns, and it never splits K)."""
    block_n = 64
    mp, block_m = _padded_tokens(m)
    m_blocks = mp // block_m if m_blocks is None else m_blocks
    stage = lambda bk: 2 * bk * (word_tiles * block_n + 2 * block_m)  # noqa: E731 (bytes of one stage)
    block_k = 128 if k % 128 == 0 else 64
    n //= word_tiles
    split = 1 if word_tiles > 1 else k_splits(k, n, block_n, block_k, m_blocks=m_blocks)
    if (n // block_n) * m_blocks * split > NUM_SMS:
        steps = 2
        if 2 * stage(block_k) > TWO_PER_SM_BYTES:
            block_k = 64
    else:
        steps = min(4, SMEM_BYTES // stage(block_k))
        if steps < 2:
            block_k, steps = 64, min(4, SMEM_BYTES // stage(64))
    return dict(block_n=block_n, block_k=block_k, block_m=block_m, steps=steps, split_k=split, decode="swar")


def mosaic_dual_decode_gemm(a_i: jax.Array, a_j: jax.Array, words_t: jax.Array, *, block_n: int | None = None,
                            block_k: int | None = None, block_m: int | None = None, split_k: int | None = None,
                            steps: int | None = None,
                            a_in_smem: bool | None = None, interpret: bool = False, out_dtype=jnp.bfloat16,
                            decode: str | None = None, _control: str | None = None) -> tuple[jax.Array, jax.Array]:
    """``(A_i @ W_i, A_j @ W_j)`` for one packed pair given as ``words_t`` uint16 ``[N, K]``.

    ``a_i``, ``a_j``: [M, K], any M (``block_m`` tokens per CTA, at most ``MAX_BLOCK_M``).  N must
    be a multiple of ``block_n`` (64 or 128) and
    K of ``block_k * split_k``.  f32 accumulation; split-K partials are summed by XLA.
    Settings left ``None`` come from ``mosaic_config`` (decode "select" in interpret mode).
    ``a_in_smem``: stage the decoded tiles in shared memory for the wgmma instead of feeding them
    from registers -- the only form Mosaic GPU's CPU interpreter runs (default: when ``interpret``).
    ``decode``: "swar" (two words per 32-bit register op, ``decode_pairs_swar``; GPU only, the
    interpreter has no ``inline_mgpu``) or "select" (``codec.decode_words``, one 16-bit word per op).
    ``_control`` (benchmark diagnostics, other functions): "no_decode" feeds the words bitcast to
    bf16 to both wgmmas; "stream_only" runs the TMA pipeline with an empty body.
    """
    N, K = words_t.shape
    m = max(a_i.shape[0], a_j.shape[0])
    auto = mosaic_config(m, K, N)
    if interpret:
        auto["decode"] = "select"
    block_n = auto["block_n"] if block_n is None else block_n
    block_k = auto["block_k"] if block_k is None else block_k
    block_m = auto["block_m"] if block_m is None else block_m
    steps = auto["steps"] if steps is None else steps
    split_k = auto["split_k"] if split_k is None else split_k
    decode = auto["decode"] if decode is None else decode
    if decode not in ("swar", "select"):
        raise ValueError(f"unknown decode form {decode!r} (swar or select)")
    a_in_smem = interpret if a_in_smem is None else a_in_smem
    if block_m % 8 or not 8 <= block_m <= MAX_BLOCK_M:
        raise ValueError(f"block_m={block_m} must be a multiple of 8 in [8, {MAX_BLOCK_M}]")
    if block_n not in (64, 128) or N % block_n:
        raise ValueError(f"N={N} must be a multiple of block_n={block_n} (64 or 128)")
    if K % (block_k * split_k):
        raise ValueError(f"K={K} must be a multiple of block_k*split_k={block_k * split_k}")
    mp, block_m = _padded_tokens(m, block_m)
    nk = K // block_k // split_k

    tile = functools.partial(_pair_tile, block_n=block_n, block_k=block_k, block_m=block_m, steps=steps, nk=nk,
                             decode=decode, a_in_smem=a_in_smem, control=_control)

    def body(ai_gmem, aj_gmem, w_gmem, oi_gmem, oj_gmem):
        t = lax.axis_index("m")
        tile(w_gmem, ai_gmem, aj_gmem, t, t, oi_gmem, oj_gmem)

    out = jax.ShapeDtypeStruct((split_k, N, mp), jnp.float32)
    kernel = _kernel(body, (out, out), (mp // block_m, N // block_n, split_k), interpret)
    o_i, o_j = kernel(_pad_rows(a_i, mp), _pad_rows(a_j, mp), words_t.astype(jnp.uint16))
    return _finish(o_i, a_i.shape[0], out_dtype), _finish(o_j, a_j.shape[0], out_dtype)


def _kernel(body, out_type, grid, interpret):
    return plgpu.kernel(
        body, out_type=out_type, grid=grid, grid_names=("m", "n", "s"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None)


def _silu(x):
    return x / (1.0 + jnp.exp(-x))


def _pair_tile(w_gmem, ai_gmem, aj_gmem, bi, bj, oi_gmem, oj_gmem, *, block_n, block_k, block_m, steps, nk,
               decode, a_in_smem, control=None, up_blocks=None, a_transposed=False):
    """One CTA's work: stream ``w_gmem`` [N, K] words for output columns ``n`` (grid axis) and K split
    ``s``, decode each tile, multiply by token block ``bi`` of ``ai_gmem`` and ``bj`` of ``aj_gmem``
    (rows of ``block_m``), store the ``O^T`` tiles at columns ``bi*block_m`` of ``oi_gmem[s]`` and
    ``bj*block_m`` of ``oj_gmem[s]``.
    ``up_blocks`` (the SwiGLU form, no K split): also stream the up rows ``up_blocks`` column tiles
    further down in the same pipeline and store bf16 ``silu(gate) * up`` instead, so the gate+up
    output never leaves the CTA in f32.
    ``a_transposed``: the activations are given as ``[K, rows]`` (the previous launch's ``O^T``), their
    token blocks are column blocks, fed to the wgmma as an MN-major operand (no transpose in between).
    The results are stored in ``oi_gmem``'s dtype."""
    n, s = lax.axis_index("n"), lax.axis_index("s")
    row_blocks = (0,) if up_blocks is None else (0, up_blocks)

    def acc_scope(*accs, dec_smem=None):
        def step(_, *refs):
            ai_smem, aj_smem = refs[-2:]
            if control == "stream_only":
                return
            for w_smem, acc_i, acc_j in zip(refs[:-2], accs[0::2], accs[1::2]):
                if control == "no_decode":
                    w_i = w_j = lax.bitcast_convert_type(w_smem[...], jnp.bfloat16)
                else:
                    w_i, w_j = _decode_bf16(w_smem[...], decode)
                if dec_smem is not None:
                    dec_smem[0] = w_i
                    dec_smem[1] = w_j
                    plgpu.commit_smem()
                    w_i, w_j = dec_smem.at[0], dec_smem.at[1]
                plgpu.wgmma(acc_i, w_i, ai_smem if a_transposed else ai_smem.T)
                plgpu.wgmma(acc_j, w_j, aj_smem if a_transposed else aj_smem.T)
                if dec_smem is not None:   # the staging buffer is reused by the next word tile
                    plgpu.wgmma_wait(0)
            plgpu.wgmma_wait(0)

        word_specs = [plgpu.BlockSpec((block_n, block_k), lambda k, r=r: (n + r, s * nk + k)) for r in row_blocks]
        if a_transposed:
            a_specs = [plgpu.BlockSpec((block_k, block_m), lambda k, b=b: (s * nk + k, b)) for b in (bi, bj)]
        else:
            a_specs = [plgpu.BlockSpec((block_m, block_k), lambda k, b=b: (b, s * nk + k)) for b in (bi, bj)]
        plgpu.emit_pipeline(
            step, grid=(nk,),
            in_specs=[*word_specs, *a_specs],
            max_concurrent_steps=steps,
        )(*[w_gmem] * len(row_blocks), ai_gmem, aj_gmem)
        return tuple(acc[...] for acc in accs)

    accs = [plgpu.ACC((block_n, block_m)) for _ in range(2 * len(row_blocks))]
    if a_in_smem:   # register (ACC) and shared-memory scopes cannot be opened together
        outs = pl.run_scoped(lambda dec: pl.run_scoped(functools.partial(acc_scope, dec_smem=dec), *accs),
                             plgpu.SMEM((2, block_n, block_k), jnp.bfloat16))
    else:
        outs = pl.run_scoped(acc_scope, *accs)
    if up_blocks is None:
        acc_i, acc_j = (acc.astype(oi_gmem.dtype) for acc in outs)
    else:   # (gate_i, gate_j, up_i, up_j)
        acc_i, acc_j = ((_silu(g) * u).astype(jnp.bfloat16) for g, u in zip(outs[:2], outs[2:]))

    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((2, block_n, block_m), acc_i.dtype))
    def _store(o_smem):
        o_smem[0] = acc_i
        o_smem[1] = acc_j
        plgpu.commit_smem()
        rows = pl.ds(n * block_n, block_n)
        plgpu.copy_smem_to_gmem(o_smem.at[0], oi_gmem.at[s, rows, pl.ds(bi * block_m, block_m)])
        plgpu.copy_smem_to_gmem(o_smem.at[1], oj_gmem.at[s, rows, pl.ds(bj * block_m, block_m)])
        plgpu.wait_smem_to_gmem(0)


# the SwiGLU form holds four [64, block_m] f32 accumulators in registers; at 64 it still beat the
# SwiGLU in XLA (H100: T = 96 and 128 tokens, benchmarks/RESULTS.md §8)
SWIGLU_MAX_BLOCK_M = 64


def grouped_block_m(rows: int, num_experts: int, tokens: int | None = None) -> int:
    """Token block of the grouped kernel for ``rows`` routed rows over ``num_experts``.

    An expert with more rows than the block costs its pair a second tile, which streams the pair's
    words again (H100, T = 64 tokens: +22 %), and routers are uneven, so the block holds 3x the mean
    rows per expert, in multiples of 16 (24- and 40-row blocks ran slower than 32 and 48), as long as
    the SwiGLU epilogue takes it (``SWIGLU_MAX_BLOCK_M``); where 3x does not fit there, 2x the mean
    or at least that maximum, up to ``MAX_BLOCK_M``.  No expert gets more than ``tokens`` rows (a
    token picks distinct experts), so the block is never larger than that (rounded up to 8: at
    T <= 8, 8-row blocks were 2-3 % faster than 16).  benchmarks/RESULTS.md §8."""
    def up(v, m):
        return -(-math.ceil(v) // m) * m
    mean = rows / num_experts
    block = max(16, up(3 * mean, 16))
    if block > SWIGLU_MAX_BLOCK_M:
        block = max(SWIGLU_MAX_BLOCK_M, up(2 * mean, 16))
    if tokens is not None:
        block = min(block, max(8, up(tokens, 8)))
    return min(MAX_BLOCK_M, block)


def grouped_layout(sizes: jax.Array, num_dense: int, block_m: int, rows: int):
    """Block-aligned row layout of a layer's pair slots for ``mosaic_grouped_dual_gemm``.

    ``sizes`` int32 [D + 2P]: rows per slot (dense experts first, then pair p's i and j at D+2p,
    D+2p+1, as ``decode_gemm._slot_order``); ``rows`` a static bound on their sum.  Each pair slot
    gets its rows rounded up to ``block_m``; one spare block at the end belongs to nobody.
    Returns ``(pad_start [D+2P], tiles [T, 4], padded_rows)``: the padded row where each pair slot
    starts (dense slots: 0, unused), and per tile (pair, block of i, block of j, live), where a pair
    side with no rows left in the tile reads and writes the spare block; ``T`` = ``rows /
    block_m + P`` bounds the live tiles, the rest have live = 0.
    """
    D = num_dense
    P = (sizes.shape[0] - D) // 2
    blocks = jnp.where(jnp.arange(sizes.shape[0]) >= D, -(-sizes // block_m), 0)
    pad_start = (jnp.cumsum(blocks) - blocks) * block_m
    padded_rows = (-(-rows // block_m) + 2 * P + 1) * block_m   # sum of blocks <= rows/bm + 2P, + spare
    spare = padded_rows // block_m - 1
    n_i, n_j = blocks[D::2], blocks[D + 1::2]
    per_pair = jnp.maximum(n_i, n_j)
    T = -(-rows // block_m) + P
    pair = jnp.repeat(jnp.arange(P, dtype=jnp.int32), per_pair, total_repeat_length=T)
    t = jnp.arange(T, dtype=jnp.int32) - (jnp.cumsum(per_pair) - per_pair)[pair]
    live = jnp.arange(T) < per_pair.sum()
    b_i = jnp.where(t < n_i[pair], pad_start[D::2][pair] // block_m + t, spare)
    b_j = jnp.where(t < n_j[pair], pad_start[D + 1::2][pair] // block_m + t, spare)
    tiles = jnp.stack([pair, b_i, b_j, live.astype(jnp.int32)], 1).astype(jnp.int32)
    return pad_start, tiles, padded_rows


def mosaic_grouped_dual_gemm(xs: jax.Array, tiles: jax.Array, words_t: jax.Array, *, block_m: int,
                             live_tiles: int | None = None, swiglu: bool = False, xs_transposed: bool = False,
                             out_dtype=jnp.float32, interpret: bool = False, **settings) -> jax.Array:
    """All pairs of a layer in one launch: ``xs`` [R_pad, K] in ``grouped_layout``'s row layout,
    ``tiles`` its tile table, ``words_t`` uint16 [P, N, K] (transposed words).  Returns the
    transposed result, as the swap-AB kernel writes it: [N, R_pad] in ``out_dtype``, column r = W^T xs[r] of the
    pair side owning r's block; columns of the spare block and of blocks no live tile covers are
    **not written** (garbage: select them away by index).
    ``swiglu``: ``words_t`` is gate's then up's words ([P, 2I, K], ``mosaic_layer_words``) and the
    result is bf16 [I, R_pad], ``silu(W_gate^T xs) * (W_up^T xs)``, computed in the CTA (block_m <=
    ``SWIGLU_MAX_BLOCK_M``, no K split).
    ``xs_transposed``: ``xs`` is given as [K, R_pad] (a previous launch's result, as it comes;
    ``block_m`` a multiple of 64, a whole 128-byte swizzle row).  ``out_dtype``: of the result
    without ``swiglu`` (f32, or bf16 to halve the bytes the next op reads; rounded after a K split's sum).
    ``live_tiles``: expected live tiles, for the grid rule (default P); ``settings`` as
    ``mosaic_dual_decode_gemm``'s (``block_n``, ``block_k``, ``split_k``, ``steps``, ``decode``, ``a_in_smem``).
    """
    P, N, K = words_t.shape
    auto = mosaic_config(block_m, K, N, m_blocks=live_tiles or P, word_tiles=2 if swiglu else 1)
    cfg = {**auto, "decode": "select" if interpret else auto["decode"], "a_in_smem": interpret,
           **{k: v for k, v in settings.items() if v is not None}}
    block_n, block_k, split_k = cfg["block_n"], cfg["block_k"], cfg["split_k"]
    rows = xs.shape[1] if xs_transposed else xs.shape[0]
    if block_m % 8 or not 8 <= block_m <= MAX_BLOCK_M or rows % block_m:
        raise ValueError(f"block_m={block_m} must be a multiple of 8 in [8, {MAX_BLOCK_M}] dividing the "
                         f"{rows} rows")
    if xs_transposed and block_m % 64:
        raise ValueError(f"xs_transposed=True takes block_m a multiple of 64, got {block_m}")
    if xs.shape[0 if xs_transposed else 1] != K:
        raise ValueError(f"xs {xs.shape} (transposed: {xs_transposed}) does not match the words' K = {K}")
    n_out = N // 2 if swiglu else N
    if block_n not in (64, 128) or n_out % block_n or K % (block_k * split_k):
        raise ValueError(f"[N, K]=[{n_out}{' x 2' if swiglu else ''}, {K}] must be multiples of block_n={block_n} "
                         f"and block_k*split_k={block_k * split_k}")
    if swiglu and (split_k != 1 or block_m > SWIGLU_MAX_BLOCK_M):
        raise ValueError(f"swiglu=True takes split_k=1 and block_m <= {SWIGLU_MAX_BLOCK_M}, got split_k={split_k}, "
                         f"block_m={block_m}")
    nk = K // block_k // split_k
    tile = functools.partial(_pair_tile, block_n=block_n, block_k=block_k, block_m=block_m, steps=cfg["steps"],
                             nk=nk, decode=cfg["decode"], a_in_smem=cfg["a_in_smem"],
                             up_blocks=n_out // block_n if swiglu else None, a_transposed=xs_transposed)

    def body(tiles_gmem, x_gmem, w_gmem, o_gmem):
        t = lax.axis_index("m")
        p, b_i, b_j, live = (tiles_gmem[t, c] for c in range(4))   # scalar loads from GMEM

        @pl.when(live > 0)
        def _():
            tile(w_gmem.at[p], x_gmem, x_gmem, b_i, b_j, o_gmem, o_gmem)

    kernel_dtype = jnp.bfloat16 if swiglu else out_dtype if split_k == 1 else jnp.float32
    out = jax.ShapeDtypeStruct((split_k, n_out, rows), kernel_dtype)
    o = _kernel(body, out, (tiles.shape[0], n_out // block_n, split_k), interpret)(
        tiles.astype(jnp.int32), xs.astype(jnp.bfloat16), words_t.astype(jnp.uint16))
    return o[0] if split_k == 1 else o.sum(0).astype(out_dtype)


def _pad_rows(a, rows):
    return jnp.pad(a.astype(jnp.bfloat16), ((0, rows - a.shape[0]), (0, 0)))


def _finish(o, rows, dtype):
    """[S, N, Mp] f32 split-K partials of O^T -> O [rows, N]."""
    return o.sum(0).T[:rows].astype(dtype)


# SWAR form: two words per 32-bit lane ("swar" below); no carry crosses the halves because each
# half's field + offset stays below 0x4800 and the masks are built per half.
SWAR_FIELD, SWAR_OFFSET, SWAR_SIGN, SWAR_ONES = 0x0FFF0FFF, 0x38003800, 0x80008000, 0x00010001


def decode_pairs_swar(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint32 lanes holding two words each -> (expert i, expert j) uint32 lanes of two bf16 bit
    patterns each: the math of the in-kernel SWAR decode, in jnp (tests compare it with the codec)."""
    u = jnp.uint32
    x = x.astype(u)
    base = (x & u(SWAR_FIELD)) + u(SWAR_OFFSET)
    mask_i = ((x >> codec.MASK_I_BIT) & u(SWAR_ONES)) * u(0xFFFF)
    mask_j = ((x >> codec.MASK_J_BIT) & u(SWAR_ONES)) * u(0xFFFF)
    return (base | (x & u(SWAR_SIGN))) & mask_i, (base | ((x << 1) & u(SWAR_SIGN))) & mask_j


def _swar_decode_registers(words):
    """In-kernel SWAR decode at the register level (``plgpu.inline_mgpu``): each 32-bit register
    of the WGMMA-layout uint16 array holds two words; decode both with 32-bit ops."""
    import numpy as np  # noqa: PLC0415
    from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415
    from jaxlib.mlir import ir  # noqa: PLC0415
    from jaxlib.mlir.dialects import arith, vector  # noqa: PLC0415

    layout = plgpu.Layout.WGMMA
    out = plgpu.ShapeDtypeStruct(words.shape, jnp.bfloat16, layout=layout)

    @plgpu.inline_mgpu(arg_types=(layout,), return_type=(out, out))
    def dec(ctx, w):
        del ctx
        i32, bf16 = ir.IntegerType.get_signless(32), ir.BF16Type.get()
        regs_i, regs_j = np.empty_like(w.registers), np.empty_like(w.registers)
        for idx, reg in np.ndenumerate(w.registers):
            n = ir.VectorType(reg.type).shape[0]
            vt = ir.VectorType.get([n // 2], i32)

            def c(v, vt=vt):   # i32 splat; bit patterns >= 2**31 as their signed value
                v = v - (1 << 32) if v >= 1 << 31 else v
                return arith.constant(vt, ir.DenseElementsAttr.get_splat(vt, ir.IntegerAttr.get(i32, v)))
            x = vector.bitcast(vt, reg)
            base = arith.addi(arith.andi(x, c(SWAR_FIELD)), c(SWAR_OFFSET))
            ones = lambda bit: arith.muli(arith.andi(arith.shrui(x, c(bit)), c(SWAR_ONES)), c(0xFFFF))  # noqa: E731
            b_i = arith.andi(arith.ori(base, arith.andi(x, c(SWAR_SIGN))), ones(codec.MASK_I_BIT))
            b_j = arith.andi(arith.ori(base, arith.andi(arith.shli(x, c(1)), c(SWAR_SIGN))), ones(codec.MASK_J_BIT))
            bt = ir.VectorType.get([n], bf16)
            regs_i[idx], regs_j[idx] = vector.bitcast(bt, b_i), vector.bitcast(bt, b_j)
        return (mgpu.FragmentedArray(_registers=regs_i, _layout=w.layout, _is_signed=None),
                mgpu.FragmentedArray(_registers=regs_j, _layout=w.layout, _is_signed=None))

    return dec(words)


def _decode_bf16(words, form: str):
    if form == "swar":
        return _swar_decode_registers(words)
    bits_i, bits_j = codec.decode_words(words)
    return (lax.bitcast_convert_type(bits_i, jnp.bfloat16), lax.bitcast_convert_type(bits_j, jnp.bfloat16))
