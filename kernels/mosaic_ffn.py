"""A packed MoE layer on the grouped Mosaic-GPU kernel (Hopper): two launches per step, gate+up
(SwiGLU in the epilogue for token blocks up to ``SWIGLU_MAX_BLOCK_M`` rows, else in XLA between the
launches) and down, which reads the first launch's transposed output as it comes.  Around them: the
row layout (Pallas-Triton, ``routing_kernel``, where it fits; else sorts and gathers in XLA), the
gather of the padded rows and the combine.

The kernel reads the words transposed and gate's and up's stacked (``to_mosaic_words``); models
that serve with it hold that layout, and ``from_mosaic_words`` gives back the stored ``[K, N]`` words.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from kernels import routing, routing_kernel
from kernels.gpu import num_sms
from kernels.mosaic_gemm import MAX_BLOCK_M, SWIGLU_MAX_BLOCK_M, MosaicConfig, mosaic_config, mosaic_grouped_pair_gemm


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


def grouped_block_m(rows: int, num_experts: int, tokens: int | None = None) -> int:
    """Token block of the grouped kernel for ``rows`` routed rows over ``num_experts``.

    An expert with more rows than the block costs its pair a second tile, which streams the pair's
    words again, and routers are uneven, so the block holds 3x the mean
    rows per expert, in multiples of 16 (24- and 40-row blocks ran slower than 32 and 48), as long as
    the SwiGLU epilogue takes it (``SWIGLU_MAX_BLOCK_M``); where 3x does not fit there, 2x the mean
    or at least that maximum, up to ``MAX_BLOCK_M``.  No expert gets more than ``tokens`` rows (a
    token picks distinct experts), so the block is never larger than that (rounded up to 8: at
    T <= 8, 8-row blocks were faster than 16)."""
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


def live_tiles(rows: int, num_pairs: int, block_m: int) -> int:
    """A static bound on the live tiles of ``grouped_layout`` for ``rows`` routed rows: every live
    tile holds at least one row, and there are at most ``rows / block_m + min(P, rows)`` of them."""
    return max(1, min(rows, routing_kernel.layout_sizes(rows, num_pairs, block_m)[0]))


def layer_configs(block_m: int, rows: int, num_pairs: int, hidden: int, inter: int) -> tuple[MosaicConfig, MosaicConfig]:
    """Default (gate+up, down) launch settings of a layer with ``rows`` routed rows: ``mosaic_config``
    sized for the tiles that carry work (``live_tiles``), not for every pair, and the down launch's K
    split until its live CTAs fill two per SM (at a few live pairs one CTA column per SM left half
    the read bandwidth unused: ``benchmarks/sweep_mosaic.py``).  The gate+up launch has the SwiGLU
    epilogue (no K split) when ``block_m`` fits it."""
    live = live_tiles(rows, num_pairs, block_m)
    fused = block_m <= SWIGLU_MAX_BLOCK_M
    gate_up = mosaic_config(block_m, hidden, 2 * inter, m_blocks=live, word_tiles=2 if fused else 1)
    return gate_up, mosaic_config(block_m, inter, hidden, m_blocks=live, min_ctas=2 * num_sms())


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


def _pair_rows(x, tiles, src, words, rows: int, block_m: int, configs, interpret: bool):
    """The merged pairs' down-projected outputs as the down launch writes them: f32 [S, H, R_pad],
    the sum over S (the launch's K split) of column r is the output of padded row r (``src``: its
    token, -1 padding; ``tiles``: the launches' tile table; ``rows``: the routed rows, which size
    the launches)."""
    P = words["down"].shape[0]
    inter = words["gate_up"].shape[1] // 2
    xs_pad = jnp.where(src[:, None] >= 0, x[jnp.maximum(src, 0)], 0).astype(jnp.bfloat16)
    default = layer_configs(block_m, rows, P, x.shape[1], inter)
    cfg_gu, cfg_down = (c or d for c, d in zip(configs, default))
    gemm = lambda **kw: mosaic_grouped_pair_gemm(tiles=tiles, block_m=block_m, interpret=interpret, **kw)  # noqa: E731
    if block_m <= SWIGLU_MAX_BLOCK_M and cfg_gu.split_k == 1:   # SwiGLU in the kernel's epilogue
        h_t = gemm(xs=xs_pad, words=words["gate_up"], swiglu=True, config=cfg_gu, name="mosaic_gate_up")
    else:
        # one launch writes gate and up rounded to bf16 (as the bf16 model's projections are): half
        # the bytes of f32 to write and to read back for the SwiGLU; K-split partials sum in f32
        gu_dtype = jnp.bfloat16 if cfg_gu.split_k == 1 else jnp.float32
        gu_t = gemm(xs=xs_pad, words=words["gate_up"], config=cfg_gu, out_dtype=gu_dtype, name="mosaic_gate_up")
        h_t = (jax.nn.silu(gu_t[:inter].astype(jnp.float32)) * gu_t[inter:]).astype(jnp.bfloat16)
    # h^T [I, R_pad] as it comes when its token blocks fill whole swizzle rows, else transposed (the
    # SwiGLU kept apart from the transpose: fused into it, XLA read gate and up with strides)
    h_in = dict(xs=h_t, xs_transposed=True) if block_m % 64 == 0 else dict(xs=lax.optimization_barrier(h_t).T)
    return gemm(words=words["down"], config=cfg_down, name="mosaic_down", sum_splits=False, **h_in)


def mosaic_moe_ffn(x, topk_ids, topk_weights, experts, words, *, out_dtype,
                   configs: tuple[MosaicConfig | None, MosaicConfig | None] = (None, None),
                   interpret: bool = False) -> jax.Array:
    """Routed-expert output of a packed layer (``experts`` as ``puzzlemoe_jax.experts.PackedExperts``
    for the pair table and the kept-dense experts; ``words``: ``to_mosaic_words`` of its packed
    words, else made here per call).  ``configs`` override the (gate+up, down) launches' settings;
    the gate+up config's ``block_m`` sets the layout's token block (default ``grouped_block_m``);
    a None launch gets ``layer_configs``'s.  A gate+up config with ``split_k > 1`` runs the SwiGLU in
    XLA between the launches."""
    R, P, D = topk_ids.size, experts.pairs.shape[0], experts.dense_ids.shape[0]
    words = words or to_mosaic_words(experts.packed)
    block_m = configs[0].block_m if configs[0] is not None else grouped_block_m(R, experts.num_experts, x.shape[0])
    fused = routing_kernel.fits(R, P, D, block_m)
    if fused:   # the layout in Pallas-Triton; its outputs need no materializing
        g = None
        tiles, src, row = routing_kernel.pair_layout(topk_ids, experts.pairs, block_m=block_m, interpret=interpret)
    else:
        g = routing.group_packed(topk_ids, experts.pairs, experts.dense_ids)
        tiles, src, row = xla_pair_layout(g, block_m)
    y_t = _pair_rows(x, tiles, src, words, R, block_m, configs, interpret)
    # the combine gathers the launch's columns and adds its K-split partials itself
    parts = [(jnp.transpose(y_t, (2, 0, 1)), jnp.maximum(row, 0), row >= 0)]
    if D:
        from kernels.triton_ffn import dense_swiglu  # noqa: PLC0415
        parts.append(routing.dense_part(x, g, experts.dense, swiglu=functools.partial(
            dense_swiglu, max_rows=R, interpret=interpret)))
    return routing.combine(parts, topk_weights, out_dtype, materialize_index=not fused)
