"""Routed-expert FFN of a MoE layer, for dense (original) or packed (merged) experts.

Every family we support uses SwiGLU experts: ``down(silu(x @ w_gate) * (x @ w_up))``.
Tokens are grouped by expert and multiplied with ``jax.lax.ragged_dot`` (a grouped GEMM), so the
dense path is also the uncompressed baseline that benchmarks compare against.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from puzzlemoe_jax.merge import PackedExperts

IMPLS = ("auto", "pallas", "reference")


def group_by_expert(topk_ids: jax.Array, num_experts: int):
    """Sort the T*k (token, slot) assignments by expert: (order, token index, group sizes [E])."""
    flat = topk_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    tokens = order // topk_ids.shape[-1]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, tokens, group_sizes


def dense_moe_ffn(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array,
                  weights: Mapping[str, jax.Array]) -> jax.Array:
    """``sum_k topk_weights[t,k] * expert_{topk_ids[t,k]}(x[t])`` with dense ``[E, K, N]`` weights."""
    w_gate, w_up, w_down = weights["w_gate"], weights["w_up"], weights["w_down"]
    order, tokens, sizes = group_by_expert(topk_ids, w_gate.shape[0])
    xs = x[tokens].astype(w_gate.dtype)
    dot = lambda a, w: jax.lax.ragged_dot(a, w, sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(dot(xs, w_gate)) * dot(xs, w_up)).astype(w_down.dtype)
    y = dot(h, w_down) * topk_weights.reshape(-1)[order][:, None].astype(jnp.float32)
    return jnp.zeros(x.shape, jnp.float32).at[tokens].add(y).astype(x.dtype)


def moe_ffn(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array,
            experts: PackedExperts | Mapping[str, jax.Array], impl: str = "auto") -> jax.Array:
    """Routed-expert output for dense weights (dict) or a ``PackedExperts`` layer.

    ``impl`` (packed only): "pallas" forces the fused GPU kernel, "reference" decodes to dense
    weights with plain jnp, "auto" uses the kernel on GPU and the reference elsewhere.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(experts, PackedExperts):
        return dense_moe_ffn(x, topk_ids, topk_weights, experts)
    if impl == "pallas" or (impl == "auto" and jax.default_backend() == "gpu"):
        from kernels import packed_moe_ffn  # noqa: PLC0415 (the kernel package imports Pallas)
        return packed_moe_ffn(x, topk_ids, topk_weights, experts)
    return dense_moe_ffn(x, topk_ids, topk_weights, experts.unpack(x.dtype))
