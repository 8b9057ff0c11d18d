"""Routed-expert FFN of a MoE layer, for dense (original) or packed (merged) experts.

Every family we support uses SwiGLU experts: ``down(silu(x @ w_gate) * (x @ w_up))``.
Tokens are grouped by expert and multiplied with ``jax.lax.ragged_dot`` (a grouped GEMM), so the
dense path is also the uncompressed baseline that benchmarks compare against.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from puzzlemoe_jax.experts import PackedExperts

IMPLS = ("auto", "pallas", "reference", "mosaic")


def group_by_expert(topk_ids: jax.Array, num_experts: int):
    """Sort the T*k (token, slot) assignments by expert: (order, token index, group sizes [E]).

    Ids ``>= num_experts`` (experts another device holds, see ``sharding.sharded_moe_ffn``) sort
    last and belong to no group.
    """
    flat = topk_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    tokens = order // topk_ids.shape[-1]
    return order, tokens, count_ids(flat, num_experts)


def count_ids(ids: jax.Array, n: int) -> jax.Array:
    """int32 [n]: how often each of 0..n-1 occurs in ``ids`` (others are not counted).  A compare
    and a reduction, one small fusion on the GPU, where ``jnp.bincount`` is a scatter kernel."""
    return jnp.sum(ids.reshape(-1)[:, None] == jnp.arange(n, dtype=ids.dtype), axis=0, dtype=jnp.int32)


def sorted_position(order: jax.Array) -> jax.Array:
    """Where each assignment landed in the sorted order (the inverse permutation of ``order``)."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def combine(parts, topk_weights: jax.Array, out_dtype) -> jax.Array:
    """``sum_k topk_weights[t, k] * out[t*k + k]``: [T, H] in ``out_dtype``.  ``parts``: ``(y, row,
    valid)`` triples; assignment a's expert output is ``y[row[a]]`` of the part whose ``valid[a]``
    holds (at most one; none: zero, whatever the unselected rows hold).  Gathers each token's rows
    (a scatter-add of the rows into the tokens costs atomics on the GPU)."""
    T, k = topk_weights.shape
    # computed indices stay materialized (fused into the gather, XLA may recompute them per element)
    index = jax.lax.optimization_barrier([(row, valid) for _, row, valid in parts])
    ys = [y for y, _, _ in parts]
    out = sum(jnp.where(valid[:, None], y[row].astype(jnp.float32), 0.0) for y, (row, valid) in zip(ys, index))
    out = out * topk_weights.reshape(-1, 1).astype(jnp.float32)
    return out.reshape(T, k, -1).sum(1).astype(out_dtype)


def dense_moe_ffn(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array,
                  weights: Mapping[str, jax.Array], out_dtype=None) -> jax.Array:
    """``sum_k topk_weights[t,k] * expert_{topk_ids[t,k]}(x[t])`` with dense ``[E, K, N]`` weights
    (assignments to ids ``>= E`` contribute nothing)."""
    w_gate, w_up, w_down = weights["w_gate"], weights["w_up"], weights["w_down"]
    order, tokens, sizes = group_by_expert(topk_ids, w_gate.shape[0])
    xs = x[tokens].astype(w_gate.dtype)
    dot = lambda a, w: jax.lax.ragged_dot(a, w, sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(dot(xs, w_gate)) * dot(xs, w_up)).astype(w_down.dtype)
    pos = sorted_position(order)
    return combine([(dot(h, w_down), pos, pos < jnp.sum(sizes))], topk_weights, out_dtype or x.dtype)


def moe_ffn(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array,
            experts: PackedExperts | Mapping[str, jax.Array], impl: str = "auto", mesh=None,
            out_dtype=None, mosaic_words: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """Routed-expert output for dense weights (dict) or a ``PackedExperts`` layer.

    ``impl`` (packed only): "pallas" forces the fused GPU kernel, "reference" decodes to dense
    weights with plain jnp, "auto" uses the kernel on GPU and the reference elsewhere, "mosaic"
    the grouped Mosaic-GPU kernel (Hopper, one device; ``mosaic_words`` as
    ``kernels.mosaic_layer_words``, built per call if not given).
    ``mesh`` (a ``sharding.make_mesh`` mesh of > 1 device): expert parallel under ``shard_map``
    (``sharding.sharded_moe_ffn``), each device running this function on its own experts.
    ``out_dtype``: of the result (default ``x.dtype``); experts accumulate in f32 either way.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if mesh is not None and mesh.size > 1:
        if impl == "mosaic":
            raise ValueError('impl="mosaic" runs on one device; on a mesh use "auto" or "pallas"')
        from puzzlemoe_jax.sharding import sharded_moe_ffn  # noqa: PLC0415 (sharding imports us)
        return sharded_moe_ffn(x, topk_ids, topk_weights, experts, mesh, impl=impl)
    if not isinstance(experts, PackedExperts):
        return dense_moe_ffn(x, topk_ids, topk_weights, experts, out_dtype)
    if impl in ("pallas", "mosaic") or (impl == "auto" and jax.default_backend() == "gpu"):
        from kernels import packed_moe_ffn  # noqa: PLC0415 (the kernel package imports Pallas)
        return packed_moe_ffn(x, topk_ids, topk_weights, experts, out_dtype=out_dtype,
                              impl="mosaic" if impl == "mosaic" else "pallas", mosaic_words=mosaic_words)
    return dense_moe_ffn(x, topk_ids, topk_weights, experts.unpack(x.dtype), out_dtype)
