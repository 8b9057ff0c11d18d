"""Mosaic-GPU (Hopper wgmma) decode-GEMMs for packed expert pairs.

Swap-AB: a CTA computes ``O^T = W^T A^T`` so that the decoded weights are the wgmma's A operand,
held in registers straight after the decode (no shared-memory round trip), and the few tokens are
the wgmma's N side (8..128 per CTA; more tokens are split over CTAs).  The packed words are read
``transposed`` (``[N, K]``, K contiguous) by TMA through a ``num_stages``-deep shared-memory
pipeline that also carries the activations.  One CTA (one warpgroup) per ``block_n`` output
columns, token block and K split; the decode works on two words per 32-bit register
(``mosaic_swar``).

* ``mosaic_pair_gemm``: one pair, ``(A_i @ W_i, A_j @ W_j)``.
* ``mosaic_grouped_pair_gemm``: all pairs of a layer in one launch, over a tile table of
  (pair, token block of i, token block of j, live) rows (``mosaic_ffn.grouped_layout``), optionally
  with gate and up streamed together and the SwiGLU in the epilogue.

Hopper only (sm_90a).  The tests run these in Mosaic GPU's CPU interpreter, which has neither
register-operand wgmma nor ``inline_mgpu``: there the decoded tiles are staged in shared memory
and decoded one word per op ("select"); the SWAR arithmetic is tested on every word pair in jnp.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mosaic_swar, stream_k
from kernels.gpu import cdiv, k_splits, num_sms, silu, smem_budget, smem_two_per_sm

MAX_BLOCK_M = 128   # tokens per CTA: two f32 accumulators of [64, 256] would not fit the registers
# the SwiGLU form holds four [64, block_m] f32 accumulators in registers
SWIGLU_MAX_BLOCK_M = 64
MIN_CTAS = 128      # a launch splits K until it has about one CTA per SM
# K tile of the grouped tiles that carry an extra token block: three activation tiles a stage fit the
# shared memory of two 128-deep plain stages only at half the depth
EXTRA_BLOCK_K = 64


def reads_transposed(block_m: int) -> bool:
    """Whether a launch takes its activations as ``[K, rows]`` (``xs_transposed``): token blocks that
    fill whole swizzle rows of the MN-major wgmma operand (16 or 32 columns: one 32- or 64-byte row;
    multiples of 64: 128-byte rows).  Other multiples of 16 build, but their down launch measured far
    slower than reading the transposed copy (RESULTS.md, "Transposed reads")."""
    return block_m in (16, 32) or block_m % 64 == 0


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Settings of one Mosaic kernel call.  ``decode`` ("swar" | "prmt" | "select") and ``a_in_smem``
    (stage the decoded tiles in shared memory for the wgmma) left None follow the backend: "prmt"
    (the faster SWAR form, ``mosaic_swar``) and registers on the GPU, "select" and shared memory in
    the interpreter (which runs "select" whatever the form).  ``token_major_out`` (grouped launches
    with a bf16 result and no K split): write the result as ``[rows, N]``, the accumulators stored
    through a transposed shared-memory view, so that the next launch reads it without a transpose
    in between (``mosaic_ffn.layer_configs`` turns it on wherever it applies).  ``absorb_spills`` (a layer's
    gate+up config, like ``block_m``): let a tile carry a pair side's second token block where the launches
    allow it (``mosaic_ffn.absorbs_spills``).  ``consumer_wgs`` 2 (grouped launches): warp-specialized CTAs of
    ``2 * block_n`` columns, a memory warpgroup and two consumer warpgroups sharing one copy of the token
    blocks (``num_stages`` then counts the stages of the wider tiles).  ``stream_k`` G > 0 (grouped launches
    with token-major bf16 results, no K split, one warpgroup, plain tiles): G CTAs share the launch's K steps
    equally instead of one CTA per tile (``kernels.stream_k``), so no partial last wave idles the GPU."""
    block_m: int            # tokens per CTA, a multiple of 8 in [8, MAX_BLOCK_M]
    block_n: int = 64       # output columns (word rows) per CTA: 64 or 128
    block_k: int = 128
    num_stages: int = 2     # pipeline depth
    split_k: int = 1
    decode: str | None = None
    a_in_smem: bool | None = None
    token_major_out: bool = False
    absorb_spills: bool = True
    consumer_wgs: int = 1
    stream_k: int = 0

    def __post_init__(self):
        if self.block_m % 8 or not 8 <= self.block_m <= MAX_BLOCK_M:
            raise ValueError(f"block_m={self.block_m} must be a multiple of 8 in [8, {MAX_BLOCK_M}]")
        if self.block_n not in (64, 128):
            raise ValueError(f"block_n={self.block_n} must be 64 or 128")
        if self.decode not in (None, *mosaic_swar.DECODE_FORMS):
            raise ValueError(f"decode={self.decode!r} must be one of {mosaic_swar.DECODE_FORMS}")
        if self.consumer_wgs not in (1, 2):
            raise ValueError(f"consumer_wgs={self.consumer_wgs} must be 1 or 2")
        if self.num_stages < 1 or self.split_k < 1:
            raise ValueError(f"num_stages and split_k must be >= 1, got {self.num_stages}, {self.split_k}")
        if self.stream_k < 0 or (self.stream_k and (self.split_k != 1 or self.consumer_wgs != 1)):
            raise ValueError(f"stream_k={self.stream_k} must be >= 0, and > 0 only with split_k=1 and consumer_wgs=1")

    def for_backend(self, interpret: bool) -> "MosaicConfig":
        """The decode form and operand staging filled in for the interpreter or the GPU; the
        interpreter always decodes with "select" (the register forms are GPU-only)."""
        return dataclasses.replace(self, decode="select" if interpret else self.decode or "prmt",
                                   a_in_smem=interpret if self.a_in_smem is None else self.a_in_smem)


def padded_tokens(m: int, block_m: int | None = None) -> tuple[int, int]:
    """(padded token count, tokens per CTA): a multiple of 8 (the wgmma N step) up to
    ``MAX_BLOCK_M``, beyond that a multiple of the token block."""
    mp = max(8, cdiv(m, 8) * 8)
    block_m = min(block_m or MAX_BLOCK_M, mp)
    return cdiv(mp, block_m) * block_m, block_m


def stage_bytes(block_k: int, block_n: int, block_m: int, word_tiles: int = 1, token_blocks: int = 2) -> int:
    """Shared memory of one pipeline stage: ``word_tiles`` word tiles and ``token_blocks`` token blocks
    (both sides', plus an extra one in tiles that carry it; bf16)."""
    return 2 * block_k * (word_tiles * block_n + token_blocks * block_m)


def mosaic_config(m: int, k: int, n: int, m_blocks: int | None = None, word_tiles: int = 1,
                  min_ctas: int = MIN_CTAS) -> MosaicConfig:
    """Default settings: 64-row word tiles, K split until the launch has about ``min_ctas`` CTAs,
    more than ``MAX_BLOCK_M`` tokens split over CTAs (each re-reads the words, mostly from L2).
    A launch that fits one wave at one CTA per SM gets up to 4 stages of 128-deep K tiles; a larger
    one runs two CTAs per SM with 2 stages (128-deep K tiles if they fit, else 64), or, when its K is
    split, as many stages (2 to 4) as fit two per SM.
    ``m_blocks``: token blocks of the launch when not ``m``'s (the grouped kernel: its live tiles).
    ``word_tiles``: word tiles per CTA and K step (2: the SwiGLU launch streams gate and up rows;
    its ``n`` output columns are ``n / 2`` CTA columns, and it never splits K)."""
    block_n = 64
    mp, block_m = padded_tokens(m)
    m_blocks = mp // block_m if m_blocks is None else m_blocks
    stage = lambda bk: stage_bytes(bk, block_n, block_m, word_tiles)  # noqa: E731
    block_k = 128 if k % 128 == 0 else 64
    n //= word_tiles
    split = 1 if word_tiles > 1 else k_splits(k // block_k, (n // block_n) * m_blocks, min_ctas)
    if (n // block_n) * m_blocks * split > num_sms():
        if 2 * stage(block_k) > smem_two_per_sm():
            block_k = 64
        # deeper pipelines paid off only for K-split launches (few live pairs); elsewhere 2 stages
        stages = max(2, min(4, smem_two_per_sm() // stage(block_k))) if split > 1 else 2
    else:
        budget = smem_budget()
        stages = min(4, budget // stage(block_k))
        if stages < 2:
            block_k, stages = 64, min(4, budget // stage(64))
    return MosaicConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_stages=stages, split_k=split)


def mosaic_pair_gemm(a_i: jax.Array, a_j: jax.Array, words: jax.Array, *, config: MosaicConfig | None = None,
                     interpret: bool = False, out_dtype=jnp.bfloat16,
                     diagnostic: str | None = None) -> tuple[jax.Array, jax.Array]:
    """``(A_i @ W_i, A_j @ W_j)`` for one pair's transposed ``words`` (uint16 ``[N, K]``).

    ``a_i``, ``a_j``: [M, K], any M.  N must be a multiple of ``block_n`` and K of
    ``block_k * split_k``; f32 accumulation, split-K partials summed by XLA.  ``config`` defaults
    to ``mosaic_config``.  ``diagnostic`` (benchmarks only): "no_decode" feeds the words bitcast to
    bf16 to both wgmmas; "stream_only" runs the TMA pipeline with an empty body.
    """
    N, K = words.shape
    m = max(a_i.shape[0], a_j.shape[0])
    cfg = (config or mosaic_config(m, K, N)).for_backend(interpret)
    if cfg.token_major_out or cfg.consumer_wgs != 1 or cfg.stream_k:
        raise ValueError("token_major_out, consumer_wgs and stream_k are grouped-launch settings; the pair kernel "
                         "writes O^T with one warpgroup per CTA")
    if N % cfg.block_n:
        raise ValueError(f"N={N} must be a multiple of block_n={cfg.block_n}")
    if K % (cfg.block_k * cfg.split_k):
        raise ValueError(f"K={K} must be a multiple of block_k*split_k={cfg.block_k * cfg.split_k}")
    mp, block_m = padded_tokens(m, cfg.block_m)
    nk = K // cfg.block_k // cfg.split_k
    tile = functools.partial(_pair_tile, block_n=cfg.block_n, block_k=cfg.block_k, block_m=block_m,
                             num_stages=cfg.num_stages, nk=nk, decode=cfg.decode, a_in_smem=cfg.a_in_smem,
                             diagnostic=diagnostic)

    def body(ai_gmem, aj_gmem, w_gmem, oi_gmem, oj_gmem):
        t = lax.axis_index("m")
        tile(w_gmem, ai_gmem, aj_gmem, t, t, oi_gmem, oj_gmem)

    out = jax.ShapeDtypeStruct((cfg.split_k, N, mp), jnp.float32)
    kernel = _kernel(body, (out, out), (mp // block_m, N // cfg.block_n, cfg.split_k), interpret, "mosaic_pair_gemm")
    o_i, o_j = kernel(_pad_rows(a_i, mp), _pad_rows(a_j, mp), words.astype(jnp.uint16))
    return _finish(o_i, a_i.shape[0], out_dtype), _finish(o_j, a_j.shape[0], out_dtype)


def _kernel(body, out_type, grid, interpret, name, warpgroups=1):
    """``name``: the launch's kernel name (benchmarks time each launch of a layer by it);
    ``warpgroups`` > 1: that many warpgroups per CTA, axis "wg"."""
    threads = dict(num_threads=warpgroups, thread_name="wg") if warpgroups > 1 else {}
    return plgpu.kernel(
        body, out_type=out_type, grid=grid, grid_names=("m", "n", "s"), kernel_name=name, **threads,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None)


def _pair_tile(w_gmem, ai_gmem, aj_gmem, bi, bj, oi_gmem, oj_gmem, *, block_n, block_k, block_m, num_stages, nk,
               decode, a_in_smem, diagnostic=None, up_blocks=None, a_transposed=False, token_major_out=False,
               extra=None, consumer_wgs=1, col=None, k_first=None, k_steps=None, partial=None):
    """One CTA's work: stream ``w_gmem`` [N, K] words for output columns ``n`` (grid axis) and K split
    ``s``, decode each tile, multiply by token block ``bi`` of ``ai_gmem`` and ``bj`` of ``aj_gmem``
    (rows of ``block_m``), store the ``O^T`` tiles at columns ``bi*block_m`` of ``oi_gmem[s]`` and
    ``bj*block_m`` of ``oj_gmem[s]``.
    ``up_blocks`` (the SwiGLU form, no K split): also stream the up rows ``up_blocks`` column tiles
    further down in the same pipeline and store bf16 ``silu(gate) * up`` instead, so the gate+up
    output never leaves the CTA in f32.
    ``a_transposed``: the activations are given as ``[K, rows]`` (the previous launch's ``O^T``), their
    token blocks are column blocks, fed to the wgmma as an MN-major operand (no transpose in between).
    ``token_major_out``: store the ``O`` tiles at rows ``bi*block_m`` / ``bj*block_m`` of ``[S, rows, N]``
    outputs instead (16-bit results).  The results are stored in ``oi_gmem``'s dtype.
    ``extra`` ``(block, side)`` (grouped launches without the SwiGLU form: one activation and one output
    array, ``ai_gmem`` is ``aj_gmem``): also multiply the decoded tile of expert i (``side`` 1) or j (2;
    a traced scalar) by that side's second token block ``block``, so a pair side one block over the token
    block costs a third accumulator instead of a second tile.
    ``consumer_wgs`` 2 (a kernel of ``consumer_wgs + 1`` warpgroups, axis "wg"): warp-specialized, a CTA
    covers ``2 * block_n`` columns; a memory warpgroup streams the word tiles and one copy of the token
    blocks, and each consumer warpgroup decodes and multiplies its ``block_n`` rows of them.
    ``col``, ``k_first``, ``k_steps`` (stream-K): the column block and the K steps ``[k_first, k_first +
    k_steps)`` (traced) instead of the grid's; ``partial`` ``(ws, record, cut)``: where ``cut`` holds, store
    the f32 accumulators at ``ws[record * accumulators + q]`` (``ws`` [records * accumulators, block_n,
    block_m]) instead of the results."""
    n, s = lax.axis_index("n"), lax.axis_index("s")
    n = n if col is None else col
    k_base = s * nk if k_first is None else k_first
    row_blocks = (0,) if up_blocks is None else (0, up_blocks)
    if extra is not None and up_blocks is not None:
        raise ValueError("a tile's extra token block is not supported with the SwiGLU form")
    blocks = (bi, bj) if extra is None else (bi, bj, extra[0])
    n_act = len(blocks)
    o_shape = (n_act, block_m, block_n) if token_major_out else (n_act, block_n, block_m)
    o_gmems = (oi_gmem, oj_gmem, oi_gmem)[:n_act]
    word_specs = [plgpu.BlockSpec((consumer_wgs * block_n, block_k), lambda k, r=r: (n + r, k_base + k))
                  for r in row_blocks]
    if a_transposed:
        a_specs = [plgpu.BlockSpec((block_k, block_m), lambda k, b=b: (k_base + k, b)) for b in blocks]
    else:
        a_specs = [plgpu.BlockSpec((block_m, block_k), lambda k, b=b: (b, k_base + k)) for b in blocks]
    gmems = (*[w_gmem] * len(row_blocks), ai_gmem, aj_gmem, *([] if extra is None else [ai_gmem]))
    accs = [plgpu.ACC((block_n, block_m)) for _ in range(2 * len(row_blocks) + (extra is not None))]

    def mmas(w_smems, a_refs, accs, dec_smem):
        """One pipeline step: decode each word tile and multiply it by the token blocks."""
        a_smems = [a if a_transposed else a.T for a in a_refs]
        if diagnostic == "stream_only":
            return
        for w_smem, acc_i, acc_j in zip(w_smems, accs[0::2], accs[1::2]):
            if diagnostic == "no_decode":
                w_i = w_j = lax.bitcast_convert_type(w_smem[...], jnp.bfloat16)
            else:
                w_i, w_j = mosaic_swar.decode(w_smem[...], decode)
            if dec_smem is not None:
                dec_smem[0] = w_i
                dec_smem[1] = w_j
                plgpu.commit_smem()
                w_i, w_j = dec_smem.at[0], dec_smem.at[1]
            plgpu.wgmma(acc_i, w_i, a_smems[0])
            plgpu.wgmma(acc_j, w_j, a_smems[1])
            if extra is not None:   # the side's decoded tile: chosen per element, one branch to compile
                pick_i = extra[1] == 1
                if dec_smem is not None:
                    w_x = dec_smem.at[jnp.where(pick_i, 0, 1)]
                else:
                    w_x = jnp.where(jnp.broadcast_to(pick_i, w_i.shape), w_i, w_j)
                plgpu.wgmma(accs[2], w_x, a_smems[2])
            if dec_smem is not None:   # the staging buffer is reused by the next word tile
                plgpu.wgmma_wait(0)
        plgpu.wgmma_wait(0)

    def store(outs, o_smem, col_block):
        """The accumulators through ``o_smem`` to the outputs' ``block_n`` columns ``col_block``."""
        if up_blocks is None:
            results = [acc.astype(oi_gmem.dtype) for acc in outs]
        else:   # (gate_i, gate_j, up_i, up_j)
            results = [(silu(g) * u).astype(jnp.bfloat16) for g, u in zip(outs[:2], outs[2:])]
        cols = pl.ds(col_block * block_n, block_n)
        for q, acc in enumerate(results):
            if token_major_out:   # O tiles [block_m, block_n]: the accumulators stored through a transposed view
                o_smem.at[q].transpose((1, 0))[...] = acc
            else:
                o_smem[q] = acc
        plgpu.commit_smem()
        for q, (o_gmem, b) in enumerate(zip(o_gmems, blocks)):
            rows = pl.ds(b * block_m, block_m)
            plgpu.copy_smem_to_gmem(o_smem.at[q], o_gmem.at[s, rows, cols] if token_major_out else o_gmem.at[s, cols, rows])
        plgpu.wait_smem_to_gmem(0)

    if consumer_wgs > 1:
        _pair_tile_ws(mmas, store, word_specs, a_specs, gmems, accs, n_words=len(row_blocks), block_n=block_n,
                      block_k=block_k, nk=nk, num_stages=num_stages, consumer_wgs=consumer_wgs,
                      o_type=plgpu.SMEM((consumer_wgs, *o_shape), oi_gmem.dtype), a_in_smem=a_in_smem)
        return

    def acc_scope(*accs, dec_smem=None):
        def step(_, *refs):
            mmas(refs[:-n_act], refs[-n_act:], accs, dec_smem)

        plgpu.emit_pipeline(step, grid=(nk if k_steps is None else k_steps,), in_specs=[*word_specs, *a_specs],
                            max_concurrent_steps=num_stages)(*gmems)
        return tuple(acc[...] for acc in accs)

    if a_in_smem:   # register (ACC) and shared-memory scopes cannot be opened together
        outs = pl.run_scoped(lambda dec: pl.run_scoped(functools.partial(acc_scope, dec_smem=dec), *accs),
                             plgpu.SMEM((2, block_n, block_k), jnp.bfloat16))
    else:
        outs = pl.run_scoped(acc_scope, *accs)

    def finish():
        pl.run_scoped(lambda o_smem: store(outs, o_smem, n), plgpu.SMEM(o_shape, oi_gmem.dtype))

    if partial is None:
        finish()
        return
    ws, record, cut = partial

    def store_piece(w_smem):
        for q, acc in enumerate(outs):
            w_smem[q] = acc
        plgpu.commit_smem()
        for q in range(len(outs)):
            plgpu.copy_smem_to_gmem(w_smem.at[q], ws.at[record * len(outs) + q])
        plgpu.wait_smem_to_gmem(0)
    pl.when(~cut)(finish)
    pl.when(cut)(lambda: pl.run_scoped(store_piece, plgpu.SMEM((len(outs), block_n, block_m), jnp.float32)))


def _pair_tile_ws(mmas, store, word_specs, a_specs, gmems, accs, *, n_words, block_n, block_k, nk, num_stages,
                  consumer_wgs, o_type, a_in_smem):
    """``_pair_tile``'s warp-specialized form: ``emit_pipeline_warp_specialized`` with ``consumer_wgs``
    consumer warpgroups, each taking its ``block_n`` rows of every word tile.  Shared memory the consumers
    use outside the pipeline (output staging, the interpreter's decoded tiles) is allocated by all
    warpgroups together, one slice per consumer."""
    wg, n = lax.axis_index("wg"), lax.axis_index("n")
    rows = pl.ds(wg * block_n, block_n)

    def scoped(o_smem, dec_smem=None):
        dec = None if dec_smem is None else dec_smem.at[wg]

        def body(_, *refs):   # (word tiles, token blocks, carry: the accumulators)
            *in_refs, acc_refs = refs
            mmas([w.at[rows] for w in in_refs[:n_words]], in_refs[n_words:], acc_refs, dec)
            return acc_refs

        def compute(eval_pipeline):
            def acc_scope(*acc_refs):
                eval_pipeline(acc_refs)
                return tuple(acc[...] for acc in acc_refs)
            store(pl.run_scoped(acc_scope, *accs), o_smem.at[wg], n * consumer_wgs + wg)

        pipe = plgpu.emit_pipeline_warp_specialized(
            body, grid=(nk,), memory_registers=40, in_specs=[*word_specs, *a_specs], wg_axis="wg",
            num_compute_wgs=consumer_wgs, max_concurrent_steps=num_stages, compute_context=compute)
        pl.run_scoped(lambda allocs: pipe(*gmems, allocations=allocs), pipe.get_allocations(*gmems),
                      collective_axes="wg")

    dec_type = [plgpu.SMEM((consumer_wgs, 2, block_n, block_k), jnp.bfloat16)] if a_in_smem else []
    pl.run_scoped(scoped, o_type, *dec_type, collective_axes="wg")


def mosaic_grouped_pair_gemm(xs: jax.Array, tiles: jax.Array, words: jax.Array, *, block_m: int,
                             swiglu: bool = False, xs_transposed: bool = False,
                             out_dtype=jnp.float32, config: MosaicConfig | None = None,
                             interpret: bool = False, name: str = "mosaic_grouped_pair_gemm",
                             sum_splits: bool = True, n_live: jax.Array | None = None) -> jax.Array:
    """All pairs of a layer in one launch: ``xs`` [R_pad, K] in ``mosaic_ffn.grouped_layout``'s row
    layout with token blocks of ``block_m`` rows, ``tiles`` its tile table (with ``mosaic_ffn.
    absorb_spills``' two more columns, a tile may carry one extra token block: such tiles run 64-deep
    K tiles, so that their shared memory stays within the plain tiles'; not with ``swiglu``), ``words`` uint16
    [P, N, K] (transposed).  Returns the transposed result, as the swap-AB kernel writes it:
    [N, R_pad] in ``out_dtype``, column r = W^T xs[r] of the pair side owning r's block; columns of
    the spare block and of blocks no live tile covers are **not written** (select them away); with
    the config's ``token_major_out`` the same as [R_pad, N] (rows of it unwritten instead).
    ``swiglu``: ``words`` is gate's then up's words ([P, 2I, K]) and the result is bf16
    [I, R_pad], ``silu(W_gate^T xs) * (W_up^T xs)``, computed in the CTA (block_m <=
    ``SWIGLU_MAX_BLOCK_M``, no K split).  ``xs_transposed``: ``xs`` is given as [K, R_pad] (a
    previous launch's result, as it comes; ``reads_transposed(block_m)``).  ``config`` (default:
    ``mosaic_config`` sized for every pair; a layer passes ``mosaic_ffn.layer_configs``'): its
    ``block_m`` must be ``block_m``.  ``name``: the launch's kernel name.
    ``sum_splits=False``: the f32 K-split partials [split_k, N, R_pad] as written, for a consumer that
    sums them itself (one kernel fewer).  ``n_live`` (int32 [1], the config's ``stream_k``): the live tiles,
    which must be a prefix of the table.
    """
    P, N, K = words.shape
    cfg = config or mosaic_config(block_m, K, N, m_blocks=P, word_tiles=2 if swiglu else 1)
    cfg = cfg.for_backend(interpret)
    block_n, block_k, split_k, wgs = cfg.block_n, cfg.block_k, cfg.split_k, cfg.consumer_wgs
    rows = xs.shape[1] if xs_transposed else xs.shape[0]
    if cfg.block_m != block_m or rows % block_m:
        raise ValueError(f"block_m={block_m} (config: {cfg.block_m}) must divide the {rows} rows and equal "
                         "the config's block_m")
    if xs_transposed and not reads_transposed(block_m):
        raise ValueError(f"xs_transposed=True takes block_m 16, 32 or a multiple of 64, got {block_m}")
    if xs.shape[0 if xs_transposed else 1] != K:
        raise ValueError(f"xs {xs.shape} (transposed: {xs_transposed}) does not match the words' K = {K}")
    n_out = N // 2 if swiglu else N
    if n_out % (block_n * wgs) or K % (block_k * split_k):
        raise ValueError(f"[N, K]=[{n_out}{' x 2' if swiglu else ''}, {K}] must be multiples of block_n*consumer_wgs="
                         f"{block_n * wgs} and block_k*split_k={block_k * split_k}")
    if swiglu and (split_k != 1 or block_m > SWIGLU_MAX_BLOCK_M):
        raise ValueError(f"swiglu=True takes split_k=1 and block_m <= {SWIGLU_MAX_BLOCK_M}, got split_k={split_k}, "
                         f"block_m={block_m}")
    extended = tiles.shape[1] == 6
    if tiles.shape[1] not in (4, 6) or (extended and (swiglu or K % (EXTRA_BLOCK_K * split_k))):
        raise ValueError(f"tiles {tiles.shape} must have 4 columns, or 6 without swiglu and with K={K} a multiple of "
                         f"{EXTRA_BLOCK_K}*split_k={EXTRA_BLOCK_K * split_k}")
    tile_kw = dict(block_n=block_n, block_m=block_m, num_stages=cfg.num_stages, decode=cfg.decode,
                   a_in_smem=cfg.a_in_smem, up_blocks=n_out // (block_n * wgs) if swiglu else None,
                   a_transposed=xs_transposed, token_major_out=cfg.token_major_out, consumer_wgs=wgs)
    tile = functools.partial(_pair_tile, block_k=block_k, nk=K // block_k // split_k, **tile_kw)
    tile_extra = functools.partial(_pair_tile, block_k=EXTRA_BLOCK_K, nk=K // EXTRA_BLOCK_K // split_k, **tile_kw)

    def body(tiles_gmem, x_gmem, w_gmem, o_gmem):
        t = lax.axis_index("m")
        p, b_i, b_j, live = (tiles_gmem[t, c] for c in range(4))   # scalar loads from GMEM
        run = lambda f, **kw: f(w_gmem.at[p], x_gmem, x_gmem, b_i, b_j, o_gmem, o_gmem, **kw)  # noqa: E731
        if not extended:
            pl.when(live > 0)(lambda: run(tile))
            return
        b_x, side = tiles_gmem[t, 4], tiles_gmem[t, 5]
        pl.when((live > 0) & (side == 0))(lambda: run(tile))
        pl.when((live > 0) & (side > 0))(lambda: run(tile_extra, extra=(b_x, side)))

    kernel_dtype = jnp.bfloat16 if swiglu else out_dtype if split_k == 1 else jnp.float32
    if cfg.token_major_out and (split_k != 1 or kernel_dtype != jnp.bfloat16):
        raise ValueError(f"token_major_out=True takes a bf16 result without K split, got split_k={split_k}, "
                         f"out_dtype={jnp.dtype(out_dtype).name}")
    if cfg.stream_k:
        if not cfg.token_major_out or extended or n_live is None:
            raise ValueError("stream_k takes token_major_out=True, a 4-column tile table and n_live")
        return _stream_k_launch(xs, tiles, words, n_live, tile, cfg, rows=rows, n_out=n_out, swiglu=swiglu,
                                interpret=interpret, name=name)
    out = jax.ShapeDtypeStruct((split_k, rows, n_out) if cfg.token_major_out else (split_k, n_out, rows), kernel_dtype)
    o = _kernel(body, out, (tiles.shape[0], n_out // (block_n * wgs), split_k), interpret, name,
                warpgroups=1 if wgs == 1 else wgs + 1)(
        tiles.astype(jnp.int32), xs.astype(jnp.bfloat16), words.astype(jnp.uint16))
    if not sum_splits:
        return o
    return o[0] if split_k == 1 else o.sum(0).astype(out_dtype)


def _stream_k_launch(xs, tiles, words, n_live, tile, cfg: MosaicConfig, *, rows, n_out, swiglu, interpret, name):
    """The grouped launch as ``cfg.stream_k`` CTAs, each taking an equal share of the live tiles' K steps
    (``stream_k.share_start``; tile u = live tile u // columns, column block u % columns), then the pass
    that finishes the tiles cut between shares (``stream_k.finish_split_tiles``)."""
    ctas, block_n, block_m = cfg.stream_k, cfg.block_n, cfg.block_m
    n_cols, nk = n_out // block_n, words.shape[2] // cfg.block_k
    n_acc = 4 if swiglu else 2
    i32 = jnp.int32

    def body(tiles_gmem, live_gmem, x_gmem, w_gmem, o_gmem, ws_gmem):
        g = lax.axis_index("m")
        total = live_gmem[0] * (n_cols * nk)
        start, end = stream_k.share_start(g, total, ctas), stream_k.share_start(g + 1, total, ctas)
        first = start // nk

        def one(u, carry):
            t, col = u // n_cols, u % n_cols
            k0 = jnp.maximum(start, u * nk) - u * nk
            k1 = jnp.minimum(end, u * nk + nk) - u * nk
            p, b_i, b_j = (tiles_gmem[t, c] for c in range(3))
            tile(w_gmem.at[p], x_gmem, x_gmem, b_i, b_j, o_gmem, o_gmem, col=col, k_first=k0, k_steps=k1 - k0,
                 partial=(ws_gmem, 2 * g + (u != first).astype(i32), (k0 > 0) | (k1 < nk)))
            return carry
        lax.fori_loop(first, jnp.where(start < end, (end - 1) // nk + 1, first), one, 0)

    out = jax.ShapeDtypeStruct((1, rows, n_out), jnp.bfloat16)
    ws = jax.ShapeDtypeStruct((ctas * 2 * n_acc, block_n, block_m), jnp.float32)
    o, pieces = _kernel(body, (out, ws), (ctas, 1, 1), interpret, name)(
        tiles.astype(i32), n_live.astype(i32), xs.astype(jnp.bfloat16), words.astype(jnp.uint16))
    return stream_k.finish_split_tiles(o[0], pieces.reshape(ctas, 2, n_acc, block_n, block_m), tiles, n_live, nk=nk,
                                       block_n=block_n, block_m=block_m, swiglu=swiglu, interpret=interpret)


def _pad_rows(a, rows):
    return jnp.pad(a.astype(jnp.bfloat16), ((0, rows - a.shape[0]), (0, 0)))


def _finish(o, rows, dtype):
    """[S, N, Mp] f32 split-K partials of O^T -> O [rows, N]."""
    return o.sum(0).T[:rows].astype(dtype)
