"""The SwiGLU between the packed Mosaic layer's launches when its token blocks are too large for the
gate+up launch's epilogue and not whole 128-byte swizzle rows (the down launch then reads the rows
K-major): ``silu(gate) * up`` of the transposed gate+up result, written transposed, in one
Pallas-Triton pass (XLA fused the two into strided transposes)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BLOCK_I = 64   # hidden columns per program (the launches' column tiles are 64)


def swiglu_transposed(gu_t: jax.Array, *, interpret: bool = False) -> jax.Array:
    """bf16 [R, I] ``silu(g) * u`` (in f32, as the layer's f32 reference rounds its hidden
    activation) of ``gu_t`` [2I, R] (gate's rows, then up's; I a multiple of 64, R of 8)."""
    two_i, rows = gu_t.shape
    inter = two_i // 2
    if inter % BLOCK_I or rows % 8:
        raise ValueError(f"gu_t {gu_t.shape}: I must be a multiple of {BLOCK_I} and R of 8")
    block_r = min(64, rows & -rows)   # the largest power of two dividing R, up to 64
    up_blocks = inter // BLOCK_I

    def kernel(g_ref, u_ref, o_ref):
        g = g_ref[...].astype(jnp.float32)
        o_ref[...] = (jax.nn.sigmoid(g) * g * u_ref[...].astype(jnp.float32)).astype(o_ref.dtype).T

    spec = lambda off: pl.BlockSpec((BLOCK_I, block_r), lambda i, r: (i + off, r))  # noqa: E731
    return pl.pallas_call(
        kernel, name="swiglu_transposed", grid=(up_blocks, rows // block_r),
        in_specs=[spec(0), spec(up_blocks)], out_specs=pl.BlockSpec((block_r, BLOCK_I), lambda i, r: (r, i)),
        out_shape=jax.ShapeDtypeStruct((rows, inter), jnp.bfloat16), interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1))(gu_t, gu_t)
