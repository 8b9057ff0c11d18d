"""A packed MoE layer on the Triton grouped kernels: two launches per step (gate+up with the
SwiGLU epilogue, then down) for the merged pairs; kept-dense experts through ``ragged_dot``."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import routing
from kernels.triton_gemm import TritonConfig, triton_grouped_pair_gemm


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
        parts.append(routing.dense_part(x, g, experts.dense))
    return routing.combine(parts, topk_weights, out_dtype)
