"""Routing glue shared by every MoE-layer implementation: group the routed (token, expert)
assignments by expert slot, run grouped SwiGLU experts, and gather the outputs back into tokens.

Written with compares, sorts and gathers only: on the GPU a scatter costs a kernel launch each
(``bincount``, scatter-add), which these replace.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

MATRICES = ("w_gate", "w_up", "w_down")   # an expert's SwiGLU matrices: x @ W layout, [K, N]


def count_ids(ids: jax.Array, n: int) -> jax.Array:
    """int32 [n]: how often each of 0..n-1 occurs in ``ids`` (others are not counted)."""
    return jnp.sum(ids.reshape(-1)[:, None] == jnp.arange(n, dtype=ids.dtype), axis=0, dtype=jnp.int32)


def sorted_position(order: jax.Array) -> jax.Array:
    """Where each assignment landed in the sorted order (the inverse permutation of ``order``)."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def group_by_slot(slots: jax.Array, k: int, num_slots: int):
    """Sort the T*k assignments by slot: ``(order, token of each sorted row, rows per slot [num_slots],
    sorted position of each assignment)``.  Slots ``>= num_slots`` sort last and are in no group."""
    order = jnp.argsort(slots, stable=True)
    return order, order // k, count_ids(slots, num_slots), sorted_position(order)


def combine(parts, topk_weights: jax.Array, out_dtype, materialize_index: bool = True) -> jax.Array:
    """``sum_k topk_weights[t, k] * out[t*k + k]``: [T, H] in ``out_dtype``.  ``parts``: ``(y, row,
    valid)`` triples; assignment a's expert output is ``y[row[a]]`` of the part whose ``valid[a]``
    holds (at most one; none: zero, whatever the unselected rows hold); a ``y`` [rows, S, H] holds S
    partial sums of each row, added in the same reduction as the top-k terms (one kernel).
    ``materialize_index``: computed indices stay materialized (fused into the gather, XLA may
    recompute them per element); off where they come from a kernel and cost one select each."""
    T, k = topk_weights.shape
    index = [(row, valid) for _, row, valid in parts]
    if materialize_index:
        index = lax.optimization_barrier(index)
    ys = [y if y.ndim == 3 else y[:, None] for y, _, _ in parts]
    terms = [jnp.where(valid[:, None, None], y[row].astype(jnp.float32), 0.0) for y, (row, valid) in zip(ys, index)]
    out = (terms[0] if len(terms) == 1 else jnp.concatenate(terms, 1)) * topk_weights.reshape(-1, 1, 1).astype(jnp.float32)
    return out.reshape(T, -1, out.shape[-1]).sum(1).astype(out_dtype)


def ragged_swiglu(xs: jax.Array, sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array) -> jax.Array:
    """f32 ``down(silu(xs @ gate) * (xs @ up))`` for rows grouped by expert (``sizes`` rows each,
    the rest unused) with ``jax.lax.ragged_dot``; the hidden activation is rounded to
    ``w_down``'s dtype, as the uncompressed model does."""
    dot = lambda a, w: lax.ragged_dot(a.astype(w.dtype), w, sizes, preferred_element_type=jnp.float32)  # noqa: E731
    h = (jax.nn.silu(dot(xs, w_gate)) * dot(xs, w_up)).astype(w_down.dtype)
    return dot(h, w_down)


def slot_order(pairs: jax.Array, dense_ids: jax.Array):
    """Expert id -> slot of a packed layer: kept-dense experts first (slots 0..D-1), then pair p's
    i at D+2p and j at D+2p+1.  Returns ``(slot_of, P, D)``; ``slot_of(ids)`` maps ids the layer does
    not hold (dropped, or held by another device) to D+2P, which is in no group."""
    P, D = pairs.shape[0], dense_ids.shape[0]
    held = pairs.reshape(-1).astype(jnp.int32)
    if D:   # (no zero-sized concatenate: XLA:CPU crashed on one under shard_map)
        held = jnp.concatenate([dense_ids.astype(jnp.int32), held])

    def slot_of(ids):
        eq = ids[..., None] == held
        return jnp.where(eq.any(-1), jnp.argmax(eq, -1), D + 2 * P).astype(jnp.int32)
    return slot_of, P, D


class Grouped(NamedTuple):
    """A packed layer's assignments grouped by slot (``slot_order``): row r of the sorted rows is
    token ``tokens[r]``'s assignment to slot ``slots[r]``; assignment a sits at row ``pos[a]``."""
    tokens: jax.Array      # [T*k]
    slots: jax.Array       # [T*k] sorted
    sizes: jax.Array       # [D + 2P] rows per slot
    pos: jax.Array         # [T*k]
    num_dense: int
    num_pairs: int

    def starts(self) -> jax.Array:
        return jnp.cumsum(self.sizes) - self.sizes

    def in_dense(self) -> jax.Array:
        return self.pos < jnp.sum(self.sizes[:self.num_dense])

    def in_pair(self) -> jax.Array:
        return ~self.in_dense() & (self.pos < jnp.sum(self.sizes))


def group_packed(topk_ids: jax.Array, pairs: jax.Array, dense_ids: jax.Array) -> Grouped:
    """Group a packed layer's top-k assignments by slot (dropped experts: no slot, no output)."""
    slot_of, P, D = slot_order(pairs, dense_ids)
    slots = slot_of(topk_ids.reshape(-1))
    order, tokens, sizes, pos = group_by_slot(slots, topk_ids.shape[-1], D + 2 * P)
    return Grouped(tokens, slots[order], sizes, pos, D, P)


def dense_layer(x, topk_ids, topk_weights, weights, out_dtype, swiglu=None):
    """An uncompressed layer ``[E, K, N]`` (ids ``>= E`` contribute nothing): group by expert, run
    ``swiglu`` (``ragged_swiglu``'s signature; default it), gather back into tokens."""
    E = weights["w_gate"].shape[0]
    _, tokens, sizes, pos = group_by_slot(topk_ids.reshape(-1), topk_ids.shape[-1], E)
    y = (swiglu or ragged_swiglu)(x[tokens], sizes, weights["w_gate"], weights["w_up"], weights["w_down"])
    return combine([(y, pos, pos < jnp.sum(sizes))], topk_weights, out_dtype)


def dense_part(x: jax.Array, g: Grouped, dense: dict, dtype=jnp.bfloat16, swiglu=None):
    """The kept-dense experts' ``(y, row, valid)`` part for ``combine`` (they are the first slots).
    ``swiglu``: the grouped SwiGLU to run them with (``ragged_swiglu``'s signature; default it)."""
    w = {n: dense[n].astype(dtype) for n in MATRICES}
    y = (swiglu or ragged_swiglu)(x[g.tokens], g.sizes[:g.num_dense], w["w_gate"], w["w_up"], w["w_down"])
    return y, g.pos, g.in_dense()
