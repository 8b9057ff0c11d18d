"""The packed Mosaic layer's routing and row layout in Pallas-Triton: one launch for small steps,
two for larger ones.

``pair_layout`` turns a step's ``topk_ids`` and the layer's pair table into everything the grouped
launches and the combine need, as ``kernels.mosaic_ffn.xla_pair_layout`` computes it from the
sorted assignments, with compares and scatter stores instead of a sort and some fifteen small XLA
kernels.  Assignments are ranked within their slot by assignment index (what a stable sort gives),
so both layouts are identical.

The assignments are cut into chunks of ``chunk`` rows, one program each.  A chunk's program
compares its ids with the pair table (``[chunk, pairs]``): the slot of each assignment, its rank
among the chunk's earlier assignments to that slot, and the chunk's rows per slot.  Where there is
more than one chunk a second launch places them: each program adds up the chunks' counts (totals:
where each slot starts; earlier chunks: where this chunk's rows of each slot start), writes its
assignments' rows and tokens, and the tile entries of every ``chunks``-th pair.  The first launch
also clears the token table and the tile table (padding and dead tiles), so nothing has to order
stores across programs of one launch.  ``pair_layout_and_rows`` also has the placing launch copy each
routed token's row of activations to its padded row (the grouped launches' input), in ``H / ROW_SPAN``
programs per chunk, so the step needs no gather kernel of its own, and, from ``ZERO_TAILS_FROM``-row token
blocks, zero the padding rows the tiles read.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.gpu import largest_pow2_divisor, next_pow2 as _pow2

MAX_ROWS = 4096        # routed rows (T * top-k) the launches take
# rows per program: of 32, 64 and 128, 32 ran fastest at every size and shape timed
# (benchmarks/check_routing_kernel.py, H200)
CHUNK = 32
FILL = 1024            # elements per store when clearing the tables
ROW_PIECE = 256        # elements of a token's row per load and store when gathering the rows
ROW_SPAN = 512         # elements of the rows each program gathers: the placing launch runs H / ROW_SPAN
                       # programs per chunk (one copy loop of a whole row on one SM was slow)
ZERO_TAILS_FROM = 48   # token blocks from which the placing launch zeroes the padding rows the tiles read:
                       # faster grouped launches there, slower routing launches at smaller blocks (RESULTS)


def fits(rows: int, num_pairs: int, num_dense: int, block_m: int) -> bool:
    """Whether a layer's step takes ``pair_layout``: no kept-dense experts (their grouping stays in
    XLA), at least one pair, and at most ``MAX_ROWS`` routed rows."""
    del block_m   # the launches' cost grows with the chunks, not with the token block
    return not num_dense and num_pairs > 0 and 0 < rows <= MAX_ROWS


def default_chunk(rows: int) -> int:
    """Rows per program: ``CHUNK``, or the rows (power-of-two padded) where fewer: one launch."""
    return min(_pow2(rows), CHUNK)


def layout_sizes(rows: int, num_pairs: int, block_m: int) -> tuple[int, int]:
    """``(tiles, padded_rows)`` of the layout: every pair slot's rows rounded up to ``block_m``
    (each slot with rows adds at most one block to ``rows / block_m``; at most ``min(2P, rows)``
    slots have rows) and one spare block that belongs to nobody; at most ``rows / block_m +
    min(P, rows)`` live tiles likewise.  Small steps of many pairs get small tables: the activation
    gather writes, and the launches cover, ``padded_rows`` rows and ``tiles`` tiles."""
    blocks = -(-rows // block_m)
    return blocks + min(num_pairs, rows), (blocks + min(2 * num_pairs, rows) + 1) * block_m


class _Dims:
    """Static sizes shared by the launches (``H``: the width of the gathered rows, 0 without)."""

    def __init__(self, R, k, P, block_m, chunk, H=0):
        self.R, self.k, self.P, self.bm, self.CH, self.H = R, k, P, block_m, chunk, H
        self.NH = 1   # row slices, one program each
        if H:
            piece, per_program = _row_pieces(H)
            self.NH = -(-(H // piece) // per_program)
        self.C = -(-R // chunk)
        self.NT, self.Q = layout_sizes(R, P, block_m)
        self.PP, self.CP = _pow2(P), _pow2(self.C)
        self.spare = self.Q // block_m - 1


def _assign(ids_ref, pairs_ref, c, d: _Dims):
    """Chunk ``c``: its assignment indices, each one's slot (2p: pair p's i, 2p+1: its j; -1: no
    pair holds the id) and rank among the chunk's earlier assignments to that slot, and the chunk's
    rows per i and j slot ``[PP]``."""
    i32 = jnp.int32
    p = lax.iota(i32, d.PP)
    held_i = pltriton.load(pairs_ref.at[jnp.minimum(2 * p, 2 * d.P - 2)], mask=p < d.P, other=-1)
    held_j = pltriton.load(pairs_ref.at[jnp.minimum(2 * p + 1, 2 * d.P - 1)], mask=p < d.P, other=-1)
    r = lax.iota(i32, d.CH)
    a = c * d.CH + r
    ids = pltriton.load(ids_ref.at[jnp.minimum(a, d.R - 1)], mask=a < d.R, other=-2)
    oh_i = (ids[:, None] == held_i[None, :]).astype(i32)
    oh_j = (ids[:, None] == held_j[None, :]).astype(i32)
    slot = (oh_i * (2 * p + 1)[None, :] + oh_j * (2 * p + 2)[None, :]).sum(1) - 1
    # an id belongs to one slot, so equal held ids = same slot
    earlier = (ids[:, None] == ids[None, :]) & (r[None, :] < r[:, None])
    return a, slot, earlier.astype(i32).sum(1), oh_i.sum(0), oh_j.sum(0)


def _off(mask, index, size):
    """``index`` where ``mask`` holds, else ``size`` (past the end): the GPU skips masked lanes, the
    interpreter writes them back unchanged, which must not land on a lane that does write."""
    return jnp.where(mask, index, size)


def _fill(ref, c, G, n, value, write=True):
    """Program ``c`` of ``G`` sets its stripe of ``ref[:n]`` to ``value`` (if ``write``)."""
    stripe = -(-n // G)
    width = min(FILL, _pow2(stripe))
    for off in range(0, stripe, width):
        q = c * stripe + off + lax.iota(jnp.int32, width)
        m = (q < n) & (q < (c + 1) * stripe) & write
        pltriton.store(ref.at[_off(m, q, n)], jnp.full(q.shape, value, jnp.int32), mask=m)


def _clear(src_ref, tiles_ref, c, G, d: _Dims, write=True):
    """Program ``c`` of ``G``'s part of the cleared tables: every padded row's token -1, every
    tile dead (the last pair, both sides on the spare block, live 0) until the placing overwrites it."""
    _fill(src_ref, c, G, d.Q, -1, write)
    t = lax.iota(jnp.int32, _pow2(d.NT))
    mine = (t < d.NT) & (c == 0) & write
    for col, v in enumerate((d.P - 1, d.spare, d.spare, 0)):
        pltriton.store(tiles_ref.at[_off(mine, 4 * t + col, 4 * d.NT)], jnp.full(t.shape, v, jnp.int32), mask=mine)


def _gather_rows(x_ref, xs_ref, a, row, valid, j, d: _Dims):
    """Copy slice ``j`` (of ``d.NH``) of each valid assignment's token row of ``x_ref`` [T * H] to its
    padded row of ``xs_ref`` [Q * H] (bf16), in pieces of a power of two dividing H.  Addresses are a
    row base plus a run of a piece (no select per element), so that the loads and stores stay
    contiguous vectors; masked lanes point past the end (``_off``)."""
    _, per_program = _row_pieces(d.H)
    src_base = (jnp.where(valid, lax.div(a, d.k), 0) * d.H)[:, None]
    dst_base = (_off(valid, row, d.Q) * d.H)[:, None]

    def copy(p, carry):
        h, in_row = _piece_columns(j, p, d)
        mq = valid[:, None] & in_row
        vals = pltriton.load(x_ref.at[src_base + h], mask=mq, other=0)
        pltriton.store(xs_ref.at[dst_base + h], vals.astype(xs_ref.dtype), mask=mq)
        return carry
    lax.fori_loop(0, per_program, copy, 0)


def _zero_tails(xs_ref, slots, mine, c, j, d: _Dims):
    """Zero slice ``j`` of the padding rows the tiles multiply: in each of the pairs ``mine`` (``[PP]``)
    the rows after each side's tokens up to the end of its last block (``slots``: (first block, rows,
    blocks) per side, ``[PP]`` each), and in program ``c == 0`` the spare block (the side of a tile
    with no block of its own).  No output depends on them, but the tensor cores multiply stale bits at
    a higher energy than zeros.  One masked store per side and piece, in a loop over the pairs that
    have a tail, so a step of many pairs and few rows pays for the few."""
    i32 = jnp.int32
    _, per_program = _row_pieces(d.H)
    r = lax.iota(i32, _pow2(d.bm))

    def zero(first_row, n, on=True):   # rows [first_row, first_row + n), n <= bm, where ``on``
        m = (r < n) & on
        base = (_off(m, first_row + r, d.Q) * d.H)[:, None]
        for q in range(per_program):
            h, in_row = _piece_columns(j, q, d)
            pltriton.store(xs_ref.at[base + h], jnp.zeros((r.shape[0], h.shape[1]), xs_ref.dtype),
                           mask=m[:, None] & in_row)

    tails = [blocks * d.bm - count for _, count, blocks in slots]
    has = mine & ((tails[0] > 0) | (tails[1] > 0))
    nth = jnp.cumsum(has.astype(i32)) - 1

    def pair(l, carry):
        at = has & (nth == l)
        for (first, count, _), tail in zip(slots, tails):
            pick = lambda v, at=at: jnp.sum(jnp.where(at, v, 0))  # noqa: E731
            zero(pick(first) * d.bm + pick(count), pick(tail))
        return carry
    lax.fori_loop(0, jnp.sum(has.astype(i32)), pair, 0)
    zero(d.spare * d.bm, d.bm, c == 0)


def _piece_columns(j, p, d: _Dims):
    """Columns ``[1, piece]`` of piece ``p`` of row slice ``j``, and whether that piece is inside the row
    (the last slice may hold fewer pieces; its spare ones repeat the last piece's columns, masked off)."""
    piece, per_program = _row_pieces(d.H)
    q = j * per_program + p
    return jnp.minimum(q, d.H // piece - 1) * piece + lax.iota(jnp.int32, piece)[None, :], q < d.H // piece


def _row_pieces(H: int) -> tuple[int, int]:
    """(elements per copy: the largest power of two up to ``ROW_PIECE`` dividing ``H``, pieces per program)."""
    piece = largest_pow2_divisor(H, ROW_PIECE)
    return piece, max(1, ROW_SPAN // piece)


def _place(a, slot, rank, tot_i, tot_j, prior_i, prior_j, c, G, base_ref, src_ref, row_ref, tiles_ref,
           d: _Dims, barrier: bool, x_ref=None, xs_ref=None):
    """Write chunk ``c``'s rows and tokens, and the tile entries of pairs ``c, c + G, ...``, from the
    totals per slot and the earlier chunks' counts (``[PP]`` each, i and j sides).  Given ``x_ref``,
    program ``(c, j)`` also gathers slice ``j`` of the chunk's token rows into ``xs_ref``, and only the
    programs ``(c, 0)`` write the tables (the others compute the same rows)."""
    j = pl.program_id(1)   # the row slice (0 where no rows are gathered)
    write = j == 0
    i32, bm = jnp.int32, d.bm
    p = lax.iota(i32, d.PP)
    blocks_i, blocks_j = lax.div(tot_i + bm - 1, bm), lax.div(tot_j + bm - 1, bm)
    # slots in the order i0, j0, i1, j1, ...: each starts where the ones before it end (in blocks)
    start_i = jnp.cumsum(blocks_i + blocks_j) - (blocks_i + blocks_j)
    start_j = start_i + blocks_i
    # this chunk's first row of each slot, gathered per assignment through memory
    base = c * 2 * d.PP + 2 * p
    pltriton.store(base_ref.at[base], start_i * bm + prior_i)
    pltriton.store(base_ref.at[base + 1], start_j * bm + prior_j)
    if barrier:   # the base (and a fused launch's clearing stores) land before they are read / overwritten
        pltriton.debug_barrier()
    valid = (slot >= 0) & (a < d.R)
    row = pltriton.load(base_ref.at[c * 2 * d.PP + jnp.maximum(slot, 0)], mask=valid, other=0) + rank
    in_rows = (a < d.R) & write
    pltriton.store(row_ref.at[_off(in_rows, a, d.R)], jnp.where(valid, row, -1), mask=in_rows)
    pltriton.store(src_ref.at[_off(valid & write, row, d.Q)], lax.div(a, d.k), mask=valid & write)
    if x_ref is not None:
        _gather_rows(x_ref, xs_ref, a, row, valid, j, d)

    # tiles: pair p's run starts after the runs of the pairs before it, one tile per block of its
    # longer side; a side with no block left in a tile reads and writes the spare block
    per_pair = jnp.maximum(blocks_i, blocks_j)
    first = jnp.cumsum(per_pair) - per_pair
    mine = (p < d.P) & (lax.rem(p, G) == c) & write
    n = jnp.where(mine, per_pair, 0)

    def tile(l, carry):
        m = mine & (l < per_pair)
        t4 = _off(m, 4 * (first + l), 4 * d.NT)
        pltriton.store(tiles_ref.at[t4], p, mask=m)
        pltriton.store(tiles_ref.at[t4 + 1], jnp.where(l < blocks_i, start_i + l, d.spare), mask=m)
        pltriton.store(tiles_ref.at[t4 + 2], jnp.where(l < blocks_j, start_j + l, d.spare), mask=m)
        pltriton.store(tiles_ref.at[t4 + 3], jnp.ones_like(p), mask=m)
        return carry
    lax.fori_loop(0, jnp.max(n), tile, 0)
    if x_ref is not None and d.bm >= ZERO_TAILS_FROM:
        _zero_tails(xs_ref, ((start_i, tot_i, blocks_i), (start_j, tot_j, blocks_j)),
                    (p < d.P) & (lax.rem(p, G) == c), c, j, d)


def _fused_kernel(ids_ref, pairs_ref, *refs, d: _Dims, interpret):
    x_ref, (tiles_ref, src_ref, row_ref, base_ref, *xs_ref) = (refs[0], refs[1:]) if d.H else (None, refs)
    a, slot, rank, cnt_i, cnt_j = _assign(ids_ref, pairs_ref, 0, d)
    _clear(src_ref, tiles_ref, 0, 1, d, write=pl.program_id(1) == 0)
    zero = jnp.zeros_like(cnt_i)
    _place(a, slot, rank, cnt_i, cnt_j, zero, zero, 0, 1, base_ref, src_ref, row_ref, tiles_ref, d, not interpret,
           x_ref, *xs_ref)


def _count_kernel(ids_ref, pairs_ref, counts_ref, slot_ref, rank_ref, tiles_ref, src_ref, *, d: _Dims):
    c = pl.program_id(0)
    a, slot, rank, cnt_i, cnt_j = _assign(ids_ref, pairs_ref, c, d)
    p = lax.iota(jnp.int32, d.PP)
    pltriton.store(counts_ref.at[c * 2 * d.PP + p], cnt_i)
    pltriton.store(counts_ref.at[c * 2 * d.PP + d.PP + p], cnt_j)
    pltriton.store(slot_ref.at[a], slot)
    pltriton.store(rank_ref.at[a], rank)
    _clear(src_ref, tiles_ref, c, d.C, d)


def _place_kernel(counts_ref, slot_ref, rank_ref, tiles_in, src_in, *refs, d: _Dims, interpret):
    del tiles_in, src_in   # aliased to tiles_ref, src_ref: the first launch's cleared tables
    x_ref, (tiles_ref, src_ref, row_ref, base_ref, *xs_ref) = (refs[0], refs[1:]) if d.H else (None, refs)
    c = pl.program_id(0)
    i32 = jnp.int32
    cc = lax.iota(i32, d.CP)[:, None]
    p = lax.iota(i32, d.PP)[None, :]
    m = cc < d.C
    cnt_i = pltriton.load(counts_ref.at[cc * 2 * d.PP + p], mask=m, other=0)
    cnt_j = pltriton.load(counts_ref.at[cc * 2 * d.PP + d.PP + p], mask=m, other=0)
    before = cc < c
    a = c * d.CH + lax.iota(i32, d.CH)
    slot, rank = pltriton.load(slot_ref.at[a]), pltriton.load(rank_ref.at[a])
    _place(a, slot, rank, cnt_i.sum(0), cnt_j.sum(0), jnp.where(before, cnt_i, 0).sum(0),
           jnp.where(before, cnt_j, 0).sum(0), c, d.C, base_ref, src_ref, row_ref, tiles_ref, d, not interpret,
           x_ref, *xs_ref)


def pair_layout(topk_ids: jax.Array, pairs: jax.Array, *, block_m: int, chunk: int | None = None,
                interpret: bool = False):
    """The row layout of a packed layer without kept-dense experts (any size up to ``MAX_ROWS``
    rows; ``fits`` says where a layer uses it): one launch where the rows fit one ``chunk``
    (default ``default_chunk``, a power of two), else two.

    ``topk_ids`` [T, k]; ``pairs`` [P, 2] expert ids (ids in neither column: no rows, no output).
    Returns ``(tiles [n_tiles, 4], src [padded_rows], row [T*k])`` int32: the tile table of
    ``mosaic_grouped_pair_gemm`` (pair, block of i, block of j, live); the token each padded row
    holds (-1: padding); the padded row of each assignment (-1: its expert is in no pair)."""
    return _layout(topk_ids, pairs, None, block_m=block_m, chunk=chunk, interpret=interpret)


def pair_layout_and_rows(topk_ids: jax.Array, pairs: jax.Array, x: jax.Array, *, block_m: int,
                         chunk: int | None = None, interpret: bool = False):
    """``pair_layout``'s ``(tiles, src, row)`` and the grouped launches' input rows ``xs`` bf16
    [padded_rows, H], ``x[src]`` where ``src >= 0``, gathered by the same launches (no gather kernel
    of its own).  From ``ZERO_TAILS_FROM``-row blocks the padding rows the tiles read (the tails of the
    slots' last blocks, the spare block) are zero; other padding rows are not written (no output
    depends on them)."""
    return _layout(topk_ids, pairs, x, block_m=block_m, chunk=chunk, interpret=interpret)


def _layout(topk_ids, pairs, x, *, block_m, chunk, interpret):
    T, k = topk_ids.shape
    R, P = T * k, pairs.shape[0]
    if not (0 < R <= MAX_ROWS and P > 0):
        raise ValueError(f"pair_layout takes 1..{MAX_ROWS} rows and at least one pair, got {R} and {P}")
    chunk = chunk or default_chunk(R)
    if chunk != _pow2(chunk):
        raise ValueError(f"pair_layout's chunk must be a power of two, got {chunk}")
    H = 0 if x is None else x.shape[1]
    d = _Dims(R, k, P, block_m, min(chunk, _pow2(R)), H)
    i32 = jnp.int32
    sds = lambda n: jax.ShapeDtypeStruct((n,), i32)  # noqa: E731
    ids, flat_pairs = topk_ids.reshape(-1).astype(i32), pairs.reshape(-1).astype(i32)
    rows_in, rows_out = ([x.reshape(-1)], [jax.ShapeDtypeStruct((d.Q * H,), jnp.bfloat16)]) if H else ([], [])
    params = pltriton.CompilerParams(num_warps=4, num_stages=1)
    if d.C == 1:
        tiles, src, row, _, *xs = pl.pallas_call(
            functools.partial(_fused_kernel, d=d, interpret=interpret), name="routing_layout", grid=(1, d.NH),
            out_shape=(sds(4 * d.NT), sds(d.Q), sds(R), sds(2 * d.PP), *rows_out), interpret=interpret,
            compiler_params=params)(ids, flat_pairs, *rows_in)
    else:
        counts, slot, rank, tiles, src = pl.pallas_call(
            functools.partial(_count_kernel, d=d), grid=(d.C,), name="routing_count",
            out_shape=(sds(d.C * 2 * d.PP), sds(d.C * d.CH), sds(d.C * d.CH), sds(4 * d.NT), sds(d.Q)),
            interpret=interpret, compiler_params=params)(ids, flat_pairs)
        tiles, src, row, _, *xs = pl.pallas_call(
            functools.partial(_place_kernel, d=d, interpret=interpret), grid=(d.C, d.NH), name="routing_place",
            out_shape=(sds(4 * d.NT), sds(d.Q), sds(R), sds(d.C * 2 * d.PP), *rows_out),
            input_output_aliases={3: 0, 4: 1}, interpret=interpret, compiler_params=params)(
                counts, slot, rank, tiles, src, *rows_in)
    layout = (tiles.reshape(d.NT, 4), src, row)
    return layout if not H else (*layout, xs[0].reshape(d.Q, H))
