"""Routed-expert FFN of a MoE layer, for dense (original) or packed (merged) experts.

Every family we support uses SwiGLU experts: ``down(silu(x @ w_gate) * (x @ w_up))``.  Dense
experts are grouped by expert and multiplied with ``jax.lax.ragged_dot`` (a grouped GEMM); packed
layers go to ``kernels.packed_moe_ffn`` with the implementation chosen by ``kernels.resolve_impl``.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from kernels import packed_moe_ffn, routing
from puzzlemoe_jax.experts import PackedExperts


def dense_moe_ffn(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array,
                  weights: Mapping[str, jax.Array], out_dtype=None) -> jax.Array:
    """``sum_k topk_weights[t,k] * expert_{topk_ids[t,k]}(x[t])`` with dense ``[E, K, N]`` weights
    (assignments to ids ``>= E`` contribute nothing)."""
    E = weights["w_gate"].shape[0]
    order, tokens, sizes, pos = routing.group_by_slot(topk_ids.reshape(-1), topk_ids.shape[-1], E)
    y = routing.ragged_swiglu(x[tokens], weights["w_gate"], weights["w_up"], weights["w_down"], sizes)
    return routing.combine([(y, pos, pos < jnp.sum(sizes))], topk_weights, out_dtype or x.dtype)


def moe_ffn(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array,
            experts: PackedExperts | Mapping[str, jax.Array], *, impl: str = "auto", interpret: bool = False,
            out_dtype=None, mosaic_words: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """Routed-expert output for dense weights (a dict of ``[E, K, N]``) or a ``PackedExperts`` layer
    (``impl``, ``interpret``, ``mosaic_words`` as ``kernels.packed_moe_ffn``).  ``out_dtype``: of
    the result (default ``x.dtype``); experts accumulate in f32 either way."""
    if not isinstance(experts, PackedExperts):
        return dense_moe_ffn(x, topk_ids, topk_weights, experts, out_dtype)
    return packed_moe_ffn(x, topk_ids, topk_weights, experts, impl=impl, interpret=interpret,
                          out_dtype=out_dtype, mosaic_words=mosaic_words)
