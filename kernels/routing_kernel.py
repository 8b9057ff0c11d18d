"""The packed Mosaic layer's routing and row layout in one Pallas-Triton launch.

``pair_layout`` turns a step's ``topk_ids`` and the layer's pair table into everything the grouped
launches and the combine need, as ``kernels.mosaic_ffn.xla_pair_layout`` computes it from the
sorted assignments, but with compares, prefix sums and one scatter store inside one program: the
XLA form is a sort and some fifteen small kernels around the two launches.  Assignments are ranked
within their slot by assignment index (what a stable sort gives), so both layouts are identical.

One program walks the assignments in chunks of ``[rows, pairs]`` compares and the tile table in one
``[tiles, pairs]`` compare, so its time grows with rows x pairs; ``fits`` takes it only for small
steps, layers with kept-dense experts and larger steps keep the XLA layout.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MAX_ROWS = 1024        # routed rows (T * top-k) the one program takes
CHUNK_ELEMS = 4096     # [chunk rows, pairs] compares per step of the assignment loop
FILL_CHUNK = 1024      # padded rows written per store when clearing the source table
# the layer uses the launch up to two assignment chunks and this many [tiles, pairs] compares: past
# them (more chunks, more pairs) it ran slower than the XLA layout (bench_moe_layer, H200)
MAX_FUSED_ELEMS = 2 * CHUNK_ELEMS


def fits(rows: int, num_pairs: int, num_dense: int, block_m: int) -> bool:
    """Whether a layer's step takes ``pair_layout``: no kept-dense experts, and ``[rows, pairs]``
    and ``[tiles, pairs]`` (power-of-two padded) of at most ``MAX_FUSED_ELEMS`` each."""
    if num_dense or not 0 < num_pairs or not 0 < rows <= MAX_ROWS:
        return False
    tiles, _ = layout_sizes(rows, num_pairs, block_m)
    return max(_pow2(rows), _pow2(tiles)) * _pow2(num_pairs) <= MAX_FUSED_ELEMS


def _pow2(n: int) -> int:
    return max(2, 1 << (n - 1).bit_length())


def layout_sizes(rows: int, num_pairs: int, block_m: int) -> tuple[int, int]:
    """``(tiles, padded_rows)`` of the layout: at most ``rows / block_m + P`` live tiles; every pair
    slot's rows rounded up to ``block_m`` (at most ``rows / block_m + 2P`` blocks) and one spare
    block that belongs to nobody."""
    blocks = -(-rows // block_m)
    return blocks + num_pairs, (blocks + 2 * num_pairs + 1) * block_m


def _kernel(ids_ref, pairs_ref, tiles_ref, src_ref, row_ref, *, R, k, P, block_m, interpret):
    NT, Q = layout_sizes(R, P, block_m)
    PP, RP = _pow2(P), _pow2(R)
    CH = min(RP, max(16, CHUNK_ELEMS // PP))
    QP = src_ref.shape[0]
    i32 = jnp.int32
    p = lax.iota(i32, PP)
    held_i = pltriton.load(pairs_ref.at[jnp.minimum(2 * p, 2 * P - 2)], mask=p < P, other=-1)
    held_j = pltriton.load(pairs_ref.at[jnp.minimum(2 * p + 1, 2 * P - 1)], mask=p < P, other=-1)

    def one_hot(c):
        """Assignments c*CH.. of the chunk, and their [CH, PP] matches with each pair's i and j."""
        a = c * CH + lax.iota(i32, CH)
        ids = pltriton.load(ids_ref.at[jnp.minimum(a, R - 1)], mask=a < R, other=-2)
        return a, (ids[:, None] == held_i[None, :]).astype(i32), (ids[:, None] == held_j[None, :]).astype(i32)

    n_chunks = RP // CH
    count_i = count_j = jnp.zeros((PP,), i32)
    for c in range(n_chunks):
        _, oh_i, oh_j = one_hot(c)
        count_i, count_j = count_i + oh_i.sum(0), count_j + oh_j.sum(0)
    blocks_i, blocks_j = lax.div(count_i + block_m - 1, block_m), lax.div(count_j + block_m - 1, block_m)
    # slots in the order i0, j0, i1, j1, ...: each starts where the ones before it end (in blocks)
    start_i = jnp.cumsum(blocks_i + blocks_j) - (blocks_i + blocks_j)
    start_j = start_i + blocks_i

    # source token of every padded row: -1 (padding), then each assignment's token at its row
    for c in range(QP // FILL_CHUNK if QP > FILL_CHUNK else 1):
        q = c * FILL_CHUNK + lax.iota(i32, min(QP, FILL_CHUNK))
        pltriton.store(src_ref.at[q], jnp.full(q.shape, -1, i32))
    if not interpret:   # the clearing stores land before the scatter (the interpreter runs in order)
        pltriton.debug_barrier()
    seen_i = seen_j = jnp.zeros((PP,), i32)
    for c in range(n_chunks):
        a, oh_i, oh_j = one_hot(c)
        # rank of an assignment within its slot = earlier assignments to the same slot
        rank_i = jnp.cumsum(oh_i, axis=0) - 1 + seen_i[None, :]
        rank_j = jnp.cumsum(oh_j, axis=0) - 1 + seen_j[None, :]
        row = ((oh_i * (start_i[None, :] * block_m + rank_i)).sum(1)
               + (oh_j * (start_j[None, :] * block_m + rank_j)).sum(1))
        valid = (oh_i.sum(1) + oh_j.sum(1)) > 0
        seen_i, seen_j = seen_i + oh_i.sum(0), seen_j + oh_j.sum(0)
        pltriton.store(row_ref.at[a], jnp.where(valid, row, -1))
        # rows of no assignment write -1 into the last row, beyond the layout (QP > Q)
        pltriton.store(src_ref.at[jnp.where(valid, row, QP - 1)], jnp.where(valid, lax.div(a, k), -1))

    # tile t: pair jnp.repeat(arange(P), tiles per pair) would give (the last pair past the end)
    per_pair = jnp.maximum(blocks_i, blocks_j)
    ends = jnp.cumsum(per_pair)
    t = jnp.minimum(lax.iota(i32, _pow2(NT)), NT - 1)   # lanes past the table repeat its last row
    pair = jnp.minimum(((ends[None, :] <= t[:, None]) & (p < P)[None, :]).astype(i32).sum(1), P - 1)
    sel = p[None, :] == pair[:, None]

    def of_pair(v):
        return jnp.where(sel, v[None, :], 0).sum(1)
    local = t - of_pair(ends - per_pair)
    spare = Q // block_m - 1
    b_i = jnp.where(local < of_pair(blocks_i), of_pair(start_i) + local, spare)
    b_j = jnp.where(local < of_pair(blocks_j), of_pair(start_j) + local, spare)
    live = (t < per_pair.sum()).astype(i32)
    for col, v in enumerate((pair, b_i, b_j, live)):
        pltriton.store(tiles_ref.at[4 * t + col], v)


def pair_layout(topk_ids: jax.Array, pairs: jax.Array, *, block_m: int, interpret: bool = False):
    """The row layout of a packed layer without kept-dense experts, in one launch (any size up to
    ``MAX_ROWS`` rows; ``fits`` says where a layer uses it).

    ``topk_ids`` [T, k]; ``pairs`` [P, 2] expert ids (ids in neither column: no rows, no output).
    Returns ``(tiles [n_tiles, 4], src [padded_rows], row [T*k])`` int32: the tile table of
    ``mosaic_grouped_pair_gemm`` (pair, block of i, block of j, live); the token each padded row
    holds (-1: padding); the padded row of each assignment (-1: its expert is in no pair)."""
    T, k = topk_ids.shape
    R, P = T * k, pairs.shape[0]
    if not (0 < R <= MAX_ROWS and P > 0):
        raise ValueError(f"pair_layout takes 1..{MAX_ROWS} rows and at least one pair, got {R} and {P}")
    NT, Q = layout_sizes(R, P, block_m)
    QP, RP = _pow2(Q + 1), _pow2(R)
    out = (jax.ShapeDtypeStruct((4 * NT,), jnp.int32), jax.ShapeDtypeStruct((QP,), jnp.int32),
           jax.ShapeDtypeStruct((RP,), jnp.int32))
    kernel = functools.partial(_kernel, R=R, k=k, P=P, block_m=block_m, interpret=interpret)
    tiles, src, row = pl.pallas_call(
        kernel, out_shape=out, interpret=interpret, name="routing_layout",
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
    )(topk_ids.reshape(-1).astype(jnp.int32), pairs.reshape(-1).astype(jnp.int32))
    return tiles.reshape(NT, 4), src[:Q], row[:R]

