"""A packed MoE layer on the grouped Mosaic-GPU kernel (Hopper): two launches per step, gate+up
(SwiGLU in the epilogue for token blocks up to ``SWIGLU_MAX_BLOCK_M`` rows, else between the
launches) and down, which reads the first launch's token-major output (``MosaicConfig.
token_major_out``, the default) or, with that off, its transposed output as it comes where the
token block allows (``reads_transposed``), else a transposed copy.
Around them: the row layout (Pallas-Triton, ``routing_kernel``, where it fits; else sorts and
gathers in XLA), the gather of the padded rows and the combine.

The kernel reads the words transposed and gate's and up's stacked (``to_mosaic_words``); models
that serve with it hold that layout, and ``from_mosaic_words`` gives back the stored ``[K, N]`` words.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from kernels import routing, routing_kernel
from kernels.gpu import num_sms
from kernels.mosaic_gemm import (EXTRA_BLOCK_K, MAX_BLOCK_M, SWIGLU_MAX_BLOCK_M, MosaicConfig, mosaic_config,
                                 mosaic_grouped_pair_gemm, reads_transposed, stage_bytes)
from kernels.swiglu_transpose import swiglu_transposed


def to_mosaic_words(packed) -> dict[str, jax.Array]:
    """``{"gate_up": [P, 2I, H] (gate's then up's transposed words), "down": [P, H, I]}`` from the
    ``[P, K, N]`` words ``packed`` (``w_gate``, ``w_up``, ``w_down``): a full copy, made once."""
    t = lambda w: jnp.swapaxes(w, 1, 2)  # noqa: E731
    return {"gate_up": jnp.concatenate([t(packed["w_gate"]), t(packed["w_up"])], axis=1), "down": t(packed["w_down"])}


def from_mosaic_words(words) -> dict[str, jax.Array]:
    """The inverse of ``to_mosaic_words``: the ``[P, K, N]`` words of each matrix."""
    i = words["gate_up"].shape[1] // 2
    t = lambda w: jnp.swapaxes(w, 1, 2)  # noqa: E731
    return {"w_gate": t(words["gate_up"][:, :i]), "w_up": t(words["gate_up"][:, i:]), "w_down": t(words["down"])}


# the largest token block whose K-major launches keep 128-deep K tiles at two CTAs per SM; blocks
# between it and MAX_BLOCK_M take 64-deep tiles and ran slower than either
WIDE_BLOCK_M = 80
# the cap of the four-times-the-mean floor of layers with up to 16 experts (grouped_block_m)
FEW_EXPERTS_MIN_BLOCK_M = 32


def grouped_block_m(rows: int, num_experts: int, tokens: int | None = None) -> int:
    """Token block of the grouped kernel for ``rows`` routed rows over ``num_experts``.

    Every tile computes a whole block, so a block much above an expert's rows wastes MMA work on
    padding, while an expert with more rows than the block costs its pair a second tile, which
    streams the pair's words again: a larger share of the launch the fewer pairs a layer has.  So
    the block holds the mean rows per expert plus ``z`` standard deviations of a uniform router's
    count (each of ``tokens`` tokens picks ``rows / tokens`` distinct experts), z = 3 for layers of
    up to 16 experts and 2 for more, rounded up to 8 (the wgmma N step), at least 8.  Layers of
    up to 16 experts also take at least four times the mean rows, up to 32: there, smaller blocks
    measured slower down launches even where no expert overflowed them (the cause is not isolated;
    the layers of more experts measured the other way).  Above ``WIDE_BLOCK_M`` the block is that
    when the mean plus two deviations fits, else ``MAX_BLOCK_M``.  No expert gets more rows than
    there are tokens, so it is never larger than ``tokens`` rounded up to 8
    (``benchmarks/sweep_mosaic.py --block-m``, RESULTS.md "Token blocks")."""
    mean = rows / num_experts
    share = min(1.0, rows / (tokens * num_experts)) if tokens else 1 / num_experts
    sd = math.sqrt(mean * (1 - share))
    up8 = lambda v: max(8, -(-math.ceil(v) // 8) * 8)  # noqa: E731
    few = num_experts <= 16
    block = up8(mean + (3 if few else 2) * sd)
    if few:
        block = max(block, up8(min(4 * mean, FEW_EXPERTS_MIN_BLOCK_M)))
    if block > WIDE_BLOCK_M:
        block = WIDE_BLOCK_M if mean + 2 * sd <= WIDE_BLOCK_M else MAX_BLOCK_M
    return block if tokens is None else min(block, up8(tokens))


def grouped_layout(sizes: jax.Array, num_dense: int, block_m: int, rows: int):
    """Block-aligned row layout of a layer's pair slots for ``mosaic_grouped_pair_gemm``.

    ``sizes`` int32 [D + 2P]: rows per slot (dense experts first, then pair p's i and j at D+2p,
    D+2p+1, as ``routing.slot_order``); ``rows`` a static bound on their sum.  Each pair slot
    gets its rows rounded up to ``block_m``; one spare block at the end belongs to nobody.
    Returns ``(pad_start [D+2P], tiles [T, 4], padded_rows)``: the padded row where each pair slot
    starts (dense slots: 0, unused), and per tile (pair, block of i, block of j, live), where a pair
    side with no rows left in the tile reads and writes the spare block; ``T`` (``routing_kernel.
    layout_sizes``) bounds the live tiles, the rest have live = 0.
    """
    D = num_dense
    P = (sizes.shape[0] - D) // 2
    blocks = jnp.where(jnp.arange(sizes.shape[0]) >= D, -(-sizes // block_m), 0)
    pad_start = (jnp.cumsum(blocks) - blocks) * block_m
    T, padded_rows = routing_kernel.layout_sizes(rows, P, block_m)
    spare = padded_rows // block_m - 1
    n_i, n_j = blocks[D::2], blocks[D + 1::2]
    per_pair = jnp.maximum(n_i, n_j)
    pair = jnp.repeat(jnp.arange(P, dtype=jnp.int32), per_pair, total_repeat_length=T)
    t = jnp.arange(T, dtype=jnp.int32) - (jnp.cumsum(per_pair) - per_pair)[pair]
    live = jnp.arange(T) < per_pair.sum()
    b_i = jnp.where(t < n_i[pair], pad_start[D::2][pair] // block_m + t, spare)
    b_j = jnp.where(t < n_j[pair], pad_start[D + 1::2][pair] // block_m + t, spare)
    tiles = jnp.stack([pair, b_i, b_j, live.astype(jnp.int32)], 1).astype(jnp.int32)
    return pad_start, tiles, padded_rows


def absorb_spills(tiles: jax.Array, spare: int) -> jax.Array:
    """``grouped_layout``'s (or ``routing_kernel.pair_layout``'s) tile table [T, 4] -> [T, 6] with two more
    columns per tile, (extra block, side: 0 none, 1 i, 2 j): a pair whose one side needs two token blocks
    and the other at most one gets one tile that also multiplies that side's second block (the same decoded
    words, a third accumulator), and its second tile goes dead, so the pair's words are streamed once.
    Pairs with more blocks keep their tiles.  A pair's tiles are consecutive; ``spare`` is the block of
    nobody (the side of a tile with no rows left)."""
    p, b_i, b_j, live = (tiles[:, c] for c in range(4))
    live = live > 0
    shift = lambda v, k, fill: jnp.concatenate([v[k:], jnp.full((k,), fill, v.dtype)])  # noqa: E731 (v[t + k])
    same = lambda k: live & shift(live, k, False) & (shift(p, k, -1) == p)  # noqa: E731 (tile t + k: same pair)
    first = live & jnp.concatenate([jnp.ones((1,), bool), ~same(1)[:-1]])   # a pair's first tile
    next_i, next_j = shift(b_i, 1, spare), shift(b_j, 1, spare)             # the blocks of the tile after it
    i_only = (next_j == spare) & (next_i != spare)
    j_only = (next_i == spare) & (next_j != spare)
    merge = first & same(1) & ~same(2) & (i_only | j_only)
    side = jnp.where(merge, jnp.where(i_only, 1, 2), 0)
    b_x = jnp.where(merge, jnp.where(i_only, next_i, next_j), spare)
    absorbed = jnp.concatenate([jnp.zeros((1,), bool), merge[:-1]])
    return jnp.stack([p, b_i, b_j, (live & ~absorbed).astype(jnp.int32), b_x, side], 1).astype(jnp.int32)


def swiglu_in_kernel(block_m: int, gate_up: MosaicConfig) -> bool:
    """Whether a layer's gate+up launch applies the SwiGLU in its epilogue (no K split, small blocks)."""
    return block_m <= SWIGLU_MAX_BLOCK_M and gate_up.split_k == 1


def absorbs_spills(block_m: int, gate_up: MosaicConfig, down: MosaicConfig) -> bool:
    """Whether a layer's tiles may carry an extra token block (``absorb_spills``): the gate+up config asks
    for it, neither launch is the SwiGLU form or stream-K (plain tiles only), and an extended tile's 64-deep
    stages take no more shared memory than each launch's plain ones (else every tile would lose occupancy)."""
    plain_only = swiglu_in_kernel(block_m, gate_up) or gate_up.stream_k or down.stream_k
    return gate_up.absorb_spills and not plain_only and all(
        stage_bytes(EXTRA_BLOCK_K, c.block_n * c.consumer_wgs, block_m, token_blocks=3)
        <= stage_bytes(c.block_k, c.block_n * c.consumer_wgs, block_m)
        for c in (gate_up, down))


def live_tiles(rows: int, num_pairs: int, block_m: int) -> int:
    """A static bound on the live tiles of ``grouped_layout`` for ``rows`` routed rows: every live
    tile holds at least one row, and there are at most ``rows / block_m + min(P, rows)`` of them."""
    return max(1, min(rows, routing_kernel.layout_sizes(rows, num_pairs, block_m)[0]))


def layer_configs(block_m: int, rows: int, num_pairs: int, hidden: int, inter: int) -> tuple[MosaicConfig, MosaicConfig]:
    """Default (gate+up, down) launch settings of a layer with ``rows`` routed rows: ``mosaic_config``
    sized for the tiles that carry work (``live_tiles``), not for every pair, and the down launch's K
    split until its live CTAs fill two per SM (at a few live pairs one CTA column per SM left half
    the read bandwidth unused: ``benchmarks/sweep_mosaic.py``).  The gate+up launch has the SwiGLU
    epilogue (no K split) when ``block_m`` fits it.  Launches without a K split write token-major
    bf16 rows (``token_major_out``: no transpose between the launches, contiguous rows for the
    combine), and a down launch split in two decodes with "swar"; both measured faster on the H200
    (RESULTS.md, "Token-major outputs")."""
    live = live_tiles(rows, num_pairs, block_m)
    fused = block_m <= SWIGLU_MAX_BLOCK_M
    gate_up = mosaic_config(block_m, hidden, 2 * inter, m_blocks=live, word_tiles=2 if fused else 1)
    down = mosaic_config(block_m, inter, hidden, m_blocks=live, min_ctas=2 * num_sms())
    return (dataclasses.replace(gate_up, token_major_out=gate_up.split_k == 1),
            dataclasses.replace(down, token_major_out=down.split_k == 1, decode="swar" if down.split_k == 2 else None))


def xla_pair_layout(g: routing.Grouped, block_m: int):
    """``routing_kernel.pair_layout``'s ``(tiles, src, row)`` from the sorted assignments ``g`` in
    XLA (any layer; the reference of the one-launch form): the tile table, the token of each padded
    row (-1: padding) and the padded row of each assignment (-1: not in a pair)."""
    R, D, P = g.tokens.shape[0], g.num_dense, g.num_pairs
    sizes, tokens, slots = g.sizes, g.tokens, g.slots
    pad_start, tiles, padded_rows = grouped_layout(sizes, D, block_m, R)
    starts = g.starts()
    # padded row q -> the last pair slot starting at or before it; a real row if inside its size
    q = jnp.arange(padded_rows)
    slot_q = D - 1 + jnp.sum(q[:, None] >= pad_start[D:], axis=1)
    off = q - pad_start[slot_q]
    src = jnp.where(off < sizes[slot_q], tokens[jnp.minimum(starts[slot_q] + off, R - 1)], -1)
    # materialize the small index array: fused into the gather, XLA recomputed the [rows, 2P]
    # comparison for every element of xs_pad
    src = lax.optimization_barrier(src)
    slot_r = jnp.clip(slots, D, D + 2 * P - 1)
    row = jnp.clip(pad_start[slot_r] + jnp.arange(R) - starts[slot_r], 0, padded_rows - 1)
    return tiles, src.astype(jnp.int32), jnp.where(g.in_pair(), row[g.pos], -1).astype(jnp.int32)


def _pair_rows(xs_pad, tiles, words, rows: int, block_m: int, configs, interpret: bool):
    """The merged pairs' down-projected outputs, [R_pad, S, H] as ``routing.combine`` takes them: the
    sum over S (the down launch's K split) of row r is the output of padded row r (``xs_pad``: the
    padded rows' inputs, ``pair_layout_and_rows``; ``tiles``: the launches' tile table; ``rows``: the
    routed rows, which size the launches).  f32 ``O^T`` partials as the down launch writes them,
    transposed in the combine's gather; with the down config's ``token_major_out`` bf16 rows (S = 1)."""
    P = words["down"].shape[0]
    inter = words["gate_up"].shape[1] // 2
    default = layer_configs(block_m, rows, P, xs_pad.shape[1], inter)
    cfg_gu, cfg_down = (c or d for c, d in zip(configs, default))
    if absorbs_spills(block_m, cfg_gu, cfg_down):
        tiles = absorb_spills(tiles, xs_pad.shape[0] // block_m - 1)
    # stream-K launches share the live tiles' K steps: they take how many there are
    n_live = jnp.sum(tiles[:, 3] > 0, dtype=jnp.int32).reshape(1) if cfg_gu.stream_k or cfg_down.stream_k else None
    gemm = functools.partial(mosaic_grouped_pair_gemm, tiles=tiles, block_m=block_m, interpret=interpret, n_live=n_live)
    swiglu = lambda g, u: (jax.nn.silu(g.astype(jnp.float32)) * u).astype(jnp.bfloat16)  # noqa: E731
    if swiglu_in_kernel(block_m, cfg_gu):   # SwiGLU in the kernel's epilogue
        h = gemm(xs=xs_pad, words=words["gate_up"], swiglu=True, config=cfg_gu, name="mosaic_gate_up")
        if cfg_gu.token_major_out:   # h [R_pad, I]
            h_in = dict(xs=h)
        else:                        # h^T [I, R_pad]
            h_in = dict(xs=h, xs_transposed=True) if reads_transposed(block_m) else dict(xs=h.T)
    else:
        # one launch writes gate and up rounded to bf16 (as the bf16 model's projections are): half
        # the bytes of f32 to write and to read back for the SwiGLU; K-split partials sum in f32
        gu_dtype = jnp.bfloat16 if cfg_gu.split_k == 1 else jnp.float32
        gu = gemm(xs=xs_pad, words=words["gate_up"], config=cfg_gu, out_dtype=gu_dtype, name="mosaic_gate_up")
        if cfg_gu.token_major_out:      # [R_pad, 2I]
            h_in = dict(xs=swiglu(gu[:, :inter], gu[:, inter:]))
        elif reads_transposed(block_m):   # h^T [I, R_pad] as it comes
            h_in = dict(xs=swiglu(gu[:inter], gu[inter:]), xs_transposed=True)
        else:
            h_in = dict(xs=swiglu_transposed(gu, interpret=interpret))
    if cfg_down.token_major_out:
        y = gemm(words=words["down"], config=cfg_down, name="mosaic_down", out_dtype=jnp.bfloat16, **h_in)
        return y[:, None]
    y_t = gemm(words=words["down"], config=cfg_down, name="mosaic_down", sum_splits=False, **h_in)
    return jnp.transpose(y_t, (2, 0, 1))


def mosaic_moe_ffn(x, topk_ids, topk_weights, experts, words, *, out_dtype,
                   configs: tuple[MosaicConfig | None, MosaicConfig | None] = (None, None),
                   interpret: bool = False) -> jax.Array:
    """Routed-expert output of a packed layer (``experts`` as ``puzzlemoe_jax.experts.PackedExperts``
    for the pair table and the kept-dense experts; ``words``: ``to_mosaic_words`` of its packed
    words, else made here per call).  ``configs`` override the (gate+up, down) launches' settings;
    the gate+up config's ``block_m`` sets the layout's token block (default ``grouped_block_m``);
    a None launch gets ``layer_configs``'s.  A gate+up config with ``split_k > 1`` runs the SwiGLU
    between the launches."""
    R, P, D = topk_ids.size, experts.pairs.shape[0], experts.dense_ids.shape[0]
    words = words or to_mosaic_words(experts.packed)
    block_m = configs[0].block_m if configs[0] is not None else grouped_block_m(R, experts.num_experts, x.shape[0])
    fused = routing_kernel.fits(R, P, D, block_m)
    if fused:   # the layout and the row gather in Pallas-Triton; its outputs need no materializing
        g = None
        tiles, _, row, xs_pad = routing_kernel.pair_layout_and_rows(topk_ids, experts.pairs, x, block_m=block_m,
                                                                    interpret=interpret)
    else:
        g = routing.group_packed(topk_ids, experts.pairs, experts.dense_ids)
        tiles, src, row = xla_pair_layout(g, block_m)
        xs_pad = jnp.where(src[:, None] >= 0, x[jnp.maximum(src, 0)], 0).astype(jnp.bfloat16)
    y = _pair_rows(xs_pad, tiles, words, R, block_m, configs, interpret)
    # the combine gathers the rows and adds the K-split partials itself
    parts = [(y, jnp.maximum(row, 0), row >= 0)]
    if D:
        from kernels.triton_ffn import dense_swiglu  # noqa: PLC0415
        parts.append(routing.dense_part(x, g, experts.dense, swiglu=functools.partial(
            dense_swiglu, max_rows=R, interpret=interpret)))
    return routing.combine(parts, topk_weights, out_dtype, materialize_index=not fused)
