"""MoE layers on the Triton grouped kernels: two launches per step (gate+up with the SwiGLU
epilogue, then down), for the merged pairs (``triton_moe_ffn``) and for uncompressed experts
(``triton_dense_moe_ffn``, ``dense_swiglu``: only experts with tokens are read)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import routing
from kernels.triton_gemm import TritonConfig, triton_grouped_gemm, triton_grouped_pair_gemm


def triton_moe_ffn(x, topk_ids, topk_weights, experts, *, out_dtype,
                   configs: tuple[TritonConfig | None, TritonConfig | None] = (None, None),
                   interpret: bool = False) -> jax.Array:
    """Routed-expert output of a packed layer (``experts``: ``pairs``, ``packed``, ``dense_ids``,
    ``dense``, as ``puzzlemoe_jax.experts.PackedExperts``); ``configs`` override the tile tables of
    the (gate+up, down) launches."""
    g = routing.group_packed(topk_ids, experts.pairs, experts.dense_ids)
    D, sizes = g.num_dense, g.sizes
    starts = g.starts()
    meta = jnp.stack([starts[D::2], sizes[D::2], starts[D + 1::2], sizes[D + 1::2]], axis=1)
    max_rows = topk_ids.size   # a group never exceeds the number of assignments
    xs = x[g.tokens].astype(jnp.bfloat16)
    pk = experts.packed
    h = triton_grouped_pair_gemm(xs, meta, (pk["w_gate"], pk["w_up"]), max_rows=max_rows, swiglu=True,
                                 out_dtype=jnp.bfloat16, config=configs[0], interpret=interpret)
    y = triton_grouped_pair_gemm(h, meta, pk["w_down"], max_rows=max_rows, out_dtype=jnp.float32,
                                 config=configs[1], interpret=interpret)
    parts = [(y, g.pos, g.in_pair())]
    if D:
        parts.append(routing.dense_part(x, g, experts.dense, swiglu=functools.partial(
            dense_swiglu, max_rows=topk_ids.size, interpret=interpret)))
    return routing.combine(parts, topk_weights, out_dtype)


def dense_swiglu(xs, sizes, w_gate, w_up, w_down, *, max_rows: int, interpret: bool = False):
    """f32 ``down(silu(xs @ gate) * (xs @ up))`` for rows grouped by expert (``sizes`` [E] rows
    each, from row 0; the rest unused and unwritten), as ``routing.ragged_swiglu`` computes it
    (hidden activation rounded to bf16)."""
    sizes = sizes.astype(jnp.int32)
    meta = jnp.stack([jnp.cumsum(sizes) - sizes, sizes], axis=1)
    h = triton_grouped_gemm(xs, meta, (w_gate, w_up), max_rows=max_rows, swiglu=True, out_dtype=jnp.bfloat16,
                            interpret=interpret)
    return triton_grouped_gemm(h, meta, w_down, max_rows=max_rows, out_dtype=jnp.float32, interpret=interpret)


def triton_dense_moe_ffn(x, topk_ids, topk_weights, weights, *, out_dtype, interpret: bool = False) -> jax.Array:
    """Routed-expert output of an uncompressed layer (``weights``: ``w_gate``, ``w_up``, ``w_down``
    [E, K, N]); assignments to ids ``>= E`` contribute nothing."""
    swiglu = functools.partial(dense_swiglu, max_rows=topk_ids.size, interpret=interpret)
    return routing.dense_layer(x, topk_ids, topk_weights, weights, out_dtype, swiglu=swiglu)
