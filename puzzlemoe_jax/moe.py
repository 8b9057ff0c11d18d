"""Routed-expert FFN of a MoE layer, for dense (original) or packed (merged) experts.

Every family we support uses SwiGLU experts: ``down(silu(x @ w_gate) * (x @ w_up))``.  Dense
experts go to ``kernels.dense_moe_ffn`` (on a GPU a grouped kernel that reads only the experts
with tokens; elsewhere ``jax.lax.ragged_dot``), packed layers to ``kernels.packed_moe_ffn``, each
with the implementation chosen by ``kernels.resolve_impl``.
"""
from __future__ import annotations

from typing import Mapping

import jax

from kernels import dense_moe_ffn as kernels_dense_moe_ffn
from kernels import packed_moe_ffn
from kernels.reference import dense_moe_ffn_reference
from puzzlemoe_jax.experts import PackedExperts


def dense_moe_ffn(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array,
                  weights: Mapping[str, jax.Array], out_dtype=None) -> jax.Array:
    """``sum_k topk_weights[t,k] * expert_{topk_ids[t,k]}(x[t])`` with dense ``[E, K, N]`` weights
    through ``jax.lax.ragged_dot`` (assignments to ids ``>= E`` contribute nothing): the
    reference the other paths are checked against."""
    return dense_moe_ffn_reference(x, topk_ids, topk_weights, weights, out_dtype)


def moe_ffn(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array,
            experts: PackedExperts | Mapping[str, jax.Array], *, impl: str = "auto", interpret: bool = False,
            out_dtype=None, mosaic_words: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """Routed-expert output for dense weights (a dict of ``[E, K, N]``) or a ``PackedExperts`` layer
    (``impl``, ``interpret``, ``mosaic_words`` as ``kernels.packed_moe_ffn``).  ``out_dtype``: of
    the result (default ``x.dtype``); experts accumulate in f32 either way."""
    if not isinstance(experts, PackedExperts):
        return kernels_dense_moe_ffn(x, topk_ids, topk_weights, experts, impl=impl, interpret=interpret,
                                     out_dtype=out_dtype)
    return packed_moe_ffn(x, topk_ids, topk_weights, experts, impl=impl, interpret=interpret,
                          out_dtype=out_dtype, mosaic_words=mosaic_words)
