"""Mosaic-GPU (Hopper wgmma) variant of the pair decode-GEMM, beside the Pallas-Triton one.

Swap-AB: the kernel computes ``O^T = W^T A^T`` so that the decoded weights are the wgmma's A
operand, held in registers straight after the decode (no shared-memory round trip for an MMA
operand), and the few tokens are the wgmma's N side (8..256).  The packed words are streamed
``[N, K]`` (K contiguous, i.e. stored transposed: ``words.T`` of the ``[K, N]`` layout) by TMA
through a ``max_concurrent_steps``-deep shared-memory pipeline; the activations ride along in the
same pipeline.  One CTA (one warpgroup) per ``block_n`` output columns and K split.

Hopper only (sm_90a); the tests run it in Mosaic GPU's CPU interpreter.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from puzzlemoe_jax import codec


def mosaic_dual_decode_gemm(a_i: jax.Array, a_j: jax.Array, words_t: jax.Array, *, block_n: int = 64,
                            block_k: int = 128, split_k: int = 1, steps: int = 4,
                            a_in_smem: bool | None = None, interpret: bool = False,
                            out_dtype=jnp.bfloat16) -> tuple[jax.Array, jax.Array]:
    """``(A_i @ W_i, A_j @ W_j)`` for one packed pair given as ``words_t`` uint16 ``[N, K]``.

    ``a_i``, ``a_j``: [M, K] with M <= 256.  N must be a multiple of ``block_n`` (64 or 128) and
    K of ``block_k * split_k``.  f32 accumulation; split-K partials are summed by XLA.
    ``a_in_smem``: stage the decoded tiles in shared memory for the wgmma instead of feeding them
    from registers -- the only form Mosaic GPU's CPU interpreter runs (default: when ``interpret``).
    """
    a_in_smem = interpret if a_in_smem is None else a_in_smem
    N, K = words_t.shape
    m = max(a_i.shape[0], a_j.shape[0])
    if m > 256:
        raise ValueError(f"at most 256 tokens per expert, got {m}")
    if block_n not in (64, 128) or N % block_n:
        raise ValueError(f"N={N} must be a multiple of block_n={block_n} (64 or 128)")
    if K % (block_k * split_k):
        raise ValueError(f"K={K} must be a multiple of block_k*split_k={block_k * split_k}")
    mp = max(8, -(-m // 8) * 8)   # wgmma N: a multiple of 8
    nk = K // block_k // split_k

    def pad(a):
        return jnp.pad(a.astype(jnp.bfloat16), ((0, mp - a.shape[0]), (0, 0)))

    def body(ai_gmem, aj_gmem, w_gmem, oi_gmem, oj_gmem):
        n, s = lax.axis_index("n"), lax.axis_index("s")

        def acc_scope(acc_i, acc_j):
            def step(_, w_smem, ai_smem, aj_smem):
                bits_i, bits_j = codec.decode_words(w_smem[...])
                w_i = lax.bitcast_convert_type(bits_i, jnp.bfloat16)
                w_j = lax.bitcast_convert_type(bits_j, jnp.bfloat16)
                if a_in_smem:
                    dec_smem[0] = w_i
                    dec_smem[1] = w_j
                    plgpu.commit_smem()
                    w_i, w_j = dec_smem.at[0], dec_smem.at[1]
                plgpu.wgmma(acc_i, w_i, ai_smem.T)
                plgpu.wgmma(acc_j, w_j, aj_smem.T)
                plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(
                step, grid=(nk,),
                in_specs=[plgpu.BlockSpec((block_n, block_k), lambda k: (n, s * nk + k)),
                          plgpu.BlockSpec((mp, block_k), lambda k: (0, s * nk + k)),
                          plgpu.BlockSpec((mp, block_k), lambda k: (0, s * nk + k))],
                max_concurrent_steps=steps,
            )(w_gmem, ai_gmem, aj_gmem)
            return acc_i[...], acc_j[...]

        def dec_scope(smem):
            nonlocal dec_smem
            dec_smem = smem
            return pl.run_scoped(acc_scope, plgpu.ACC((block_n, mp)), plgpu.ACC((block_n, mp)))

        dec_smem = None
        if a_in_smem:
            acc_i, acc_j = pl.run_scoped(dec_scope, plgpu.SMEM((2, block_n, block_k), jnp.bfloat16))
        else:
            acc_i, acc_j = pl.run_scoped(acc_scope, plgpu.ACC((block_n, mp)), plgpu.ACC((block_n, mp)))

        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((2, block_n, mp), jnp.float32))
        def _store(o_smem):
            o_smem[0] = acc_i
            o_smem[1] = acc_j
            plgpu.commit_smem()
            rows = pl.ds(n * block_n, block_n)
            plgpu.copy_smem_to_gmem(o_smem.at[0], oi_gmem.at[s, rows])
            plgpu.copy_smem_to_gmem(o_smem.at[1], oj_gmem.at[s, rows])
            plgpu.wait_smem_to_gmem(0)

    out = jax.ShapeDtypeStruct((split_k, N, mp), jnp.float32)
    kernel = plgpu.kernel(
        body, out_type=(out, out), grid=(N // block_n, split_k), grid_names=("n", "s"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None)
    o_i, o_j = kernel(pad(a_i), pad(a_j), words_t.astype(jnp.uint16))
    finish = lambda o, rows: o.sum(0).T[:rows].astype(out_dtype)   # noqa: E731
    return finish(o_i, a_i.shape[0]), finish(o_j, a_j.shape[0])
