"""Plain-jnp references of every kernel here: decode the packed words, then ordinary dots.

The tests compare each Pallas kernel with these on fresh random data; ``impl="reference"`` serves a
packed layer with ``packed_moe_ffn_reference`` (any backend, no Pallas).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import routing
from kernels.gpu import decode
from kernels.routing import MATRICES


def pair_gemm_reference(a_i, a_j, words, *, transposed: bool = False, out_dtype=jnp.bfloat16):
    """``(A_i @ W_i, A_j @ W_j)`` for one pair's words ([K, N], or [N, K] when ``transposed``)."""
    w_i, w_j = decode(words)
    if transposed:
        w_i, w_j = w_i.T, w_j.T
    dot = lambda a, w: jnp.dot(a.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)  # noqa: E731
    return dot(a_i, w_i).astype(out_dtype), dot(a_j, w_j).astype(out_dtype)


def grouped_pair_gemm_reference(xs, meta, words, *, swiglu: bool = False, out_dtype=jnp.float32):
    """Reference of the grouped kernels: ``xs`` [R, K] rows grouped by expert, ``meta`` [P, 4] =
    (start_i, size_i, start_j, size_j), ``words`` [P, K, N] (a ``(gate, up)`` pair with ``swiglu``).
    Rows of no pair are returned as 0."""
    ws = tuple(words) if swiglu else (words,)
    R = xs.shape[0]
    rows = jnp.arange(R)
    xs = xs.astype(jnp.bfloat16)
    out = jnp.zeros((R, ws[0].shape[2]), jnp.float32)
    for p in range(ws[0].shape[0]):
        prods = []
        for w in ws:
            w_i, w_j = decode(w[p])
            prods.append((jnp.dot(xs, w_i, preferred_element_type=jnp.float32),
                          jnp.dot(xs, w_j, preferred_element_type=jnp.float32)))
        if swiglu:
            y_i, y_j = (jax.nn.silu(prods[0][t]) * prods[1][t] for t in range(2))
        else:
            y_i, y_j = prods[0]
        in_i = (rows >= meta[p, 0]) & (rows < meta[p, 0] + meta[p, 1])
        in_j = (rows >= meta[p, 2]) & (rows < meta[p, 2] + meta[p, 3])
        out = jnp.where(in_i[:, None], y_i, jnp.where(in_j[:, None], y_j, out))
    return out.astype(out_dtype)


def slot_weights(experts, name: str, dtype) -> jax.Array:
    """Decoded ``[D + 2P, K, N]`` weights of one matrix in slot order (``routing.slot_order``):
    one decode fusion, no ``[E, K, N]`` scatter."""
    hat_i, hat_j = decode(experts.packed[name])
    pairs = jnp.stack([hat_i, hat_j], 1).reshape((-1,) + hat_i.shape[1:]).astype(dtype)
    if experts.dense_ids.shape[0] == 0:
        return pairs
    return jnp.concatenate([experts.dense[name].astype(dtype), pairs])


def packed_moe_ffn_reference(x, topk_ids, topk_weights, experts, out_dtype=None):
    """A packed layer's routed-expert output, in the activations' dtype: the layer's words decoded
    into slot order, then ``ragged_dot`` SwiGLU; equal to the dense layer on ``experts.unpack``."""
    g = routing.group_packed(topk_ids, experts.pairs, experts.dense_ids)
    w = [slot_weights(experts, n, x.dtype) for n in MATRICES]
    y = routing.ragged_swiglu(x[g.tokens], g.sizes, *w)
    return routing.combine([(y, g.pos, g.pos < jnp.sum(g.sizes))], topk_weights, out_dtype or x.dtype)


def dense_moe_ffn_reference(x, topk_ids, topk_weights, weights, out_dtype=None):
    """``sum_k topk_weights[t,k] * expert_{topk_ids[t,k]}(x[t])`` with uncompressed ``[E, K, N]``
    weights, grouped by expert through ``jax.lax.ragged_dot`` (ids ``>= E`` contribute nothing)."""
    return routing.dense_layer(x, topk_ids, topk_weights, weights, out_dtype or x.dtype)
