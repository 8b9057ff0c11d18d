"""Stream-K work split of a grouped Mosaic launch, and the pass that finishes the split tiles.

A grouped launch of ``W`` tiles (live pair tiles x column blocks) of ``nk`` K steps each runs in
whole waves of CTAs: when ``W`` is not a multiple of the CTAs that fit the GPU at once, the last
wave leaves most SMs idle while its few CTAs stream at the rate one CTA per SM reaches.  With
``MosaicConfig.stream_k`` = ``G`` the launch instead runs ``G`` CTAs and gives each an equal share
of the ``W * nk`` K steps (``share_start``), in order: a CTA finishes the tiles that lie wholly in its
share as usual, and writes its f32 accumulators of a tile cut by a share boundary (at most its first
and its last tile) to a workspace, slot 0 and 1.  ``finish_split_tiles`` then adds up each cut
tile's pieces and writes its result (the SwiGLU, or the bf16 rows) where the launch would have.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.gpu import next_pow2, silu


def share_start(g, total, ctas: int):
    """First K step of CTA ``g``'s share when ``ctas`` CTAs split ``total`` steps: ``total // ctas``
    each, one more for the first ``total % ctas``; CTA ``g``'s share ends where ``g + 1``'s starts.
    (No product that could overflow int32.)"""
    q, r = total // ctas, total % ctas
    return g * q + jnp.minimum(g, r)


def _fixup_kernel(live_ref, tiles_ref, ws_ref, out_in, out_ref, *, ctas, nk, n_cols, n_acc, block_n, block_m,
                  n_out, swiglu):
    """Program ``g``: if CTA ``g``'s share starts inside a tile and no earlier share start lies in it,
    sum that tile's pieces (CTAs ``g - 1``, ``g``, ... while their shares start inside it) and write it."""
    del out_in   # aliased to out_ref: the launch's result, of which only the cut tiles are written here
    i32 = jnp.int32
    g = pl.program_id(0)
    total = live_ref[0] * (n_cols * nk)
    start = share_start(g, total, ctas)
    u = start // nk
    first_cut = (g > 0) & (start < total) & (start % nk != 0) & (share_start(g - 1, total, ctas) <= u * nk)

    @pl.when(first_cut)
    def _():
        c_blk, r_blk = lax.iota(i32, block_n)[:, None], lax.iota(i32, next_pow2(block_m))[None, :]
        in_block = r_blk < block_m
        piece = n_acc * block_n * block_m

        def add(carry):
            c, accs = carry
            slot = (share_start(c, total, ctas) // nk != u).astype(i32)   # u is c's first tile (0) or its last (1)
            base = (c * 2 + slot) * piece
            loads = tuple(pltriton.load(ws_ref.at[base + q * block_n * block_m + c_blk * block_m + r_blk],
                                        mask=in_block, other=0.0) for q in range(n_acc))
            return c + 1, tuple(a + x for a, x in zip(accs, loads))

        more = lambda carry: (carry[0] < ctas) & (share_start(carry[0], total, ctas) < (u + 1) * nk)  # noqa: E731
        zeros = tuple(jnp.zeros((block_n, next_pow2(block_m)), jnp.float32) for _ in range(n_acc))
        _, accs = lax.while_loop(more, add, (g - 1, zeros))
        if swiglu:   # (gate_i, gate_j, up_i, up_j)
            results = [silu(gate) * up for gate, up in zip(accs[:2], accs[2:])]
        else:
            results = list(accs)
        t, col = u // n_cols, u % n_cols
        for side, res in enumerate(results):
            b = tiles_ref[t * 4 + 1 + side]
            at = (b * block_m + r_blk) * n_out + col * block_n + c_blk
            pltriton.store(out_ref.at[at], res.astype(out_ref.dtype), mask=in_block)


def finish_split_tiles(out: jax.Array, ws: jax.Array, tiles: jax.Array, n_live: jax.Array, *, nk: int,
                       block_n: int, block_m: int, swiglu: bool, interpret: bool = False) -> jax.Array:
    """``out`` (a stream-K launch's token-major result [rows, n_out], written for every tile not cut)
    with the cut tiles written: ``ws`` [G, 2, n_acc, block_n, block_m] f32 the pieces, ``tiles`` the
    launch's tile table [T, 4], ``n_live`` int32 [1] its live tiles (a prefix of the table)."""
    ctas, _, n_acc = ws.shape[:3]
    rows, n_out = out.shape
    kernel = functools.partial(_fixup_kernel, ctas=ctas, nk=nk, n_cols=n_out // block_n, n_acc=n_acc,
                               block_n=block_n, block_m=block_m, n_out=n_out, swiglu=swiglu)
    flat = pl.pallas_call(
        kernel, grid=(ctas,), name="stream_k_fixup", out_shape=jax.ShapeDtypeStruct((rows * n_out,), out.dtype),
        input_output_aliases={3: 0}, interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
    )(n_live.astype(jnp.int32), tiles.reshape(-1).astype(jnp.int32), ws.reshape(-1), out.reshape(-1))
    return flat.reshape(rows, n_out)
