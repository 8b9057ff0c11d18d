"""Pallas-Triton kernels (kernels/triton_*.py): interpret mode on CPU against the jnp references,
and a lowering of every variant to Triton IR for an abstract H100 (no GPU needed)."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.reference import grouped_pair_gemm_reference, pair_gemm_reference
from kernels.triton_ffn import triton_moe_ffn
from kernels.triton_gemm import TritonConfig, triton_grouped_pair_gemm, triton_pair_gemm
from puzzlemoe_jax.experts import PackedExperts
from tests.kernel_cases import SDS, check, lower_for_h100, random_words, rng_for

PAIR_CASES = [  # (M_i, M_j, K, N, transposed, config or None for the tile table)
    (1, 1, 256, 128, False, None),
    (0, 0, 128, 64, False, None),
    (0, 5, 128, 64, False, None),
    (3, 7, 200, 96, False, None),             # K, N not multiples of any tile: masked edges
    (17, 2, 176, 88, False, None),            # 2 row tiles
    (5, 5, 1408, 64, False, None),            # DeepSeek/Qwen intermediate size (11 * 128)
    (16, 40, 512, 256, False, TritonConfig(block_m=16, block_n=64, block_k=64, split_k=2)),
    (33, 33, 384, 192, False, TritonConfig(block_m=64, block_n=128, block_k=128)),
    (4, 9, 256, 128, True, None),             # transposed words [N, K] (down projection as W^T)
    (7, 2, 192, 80, True, TritonConfig(block_m=16, block_n=32, block_k=64, swap_ab=True, split_k=2)),
    (7, 2, 256, 128, False, TritonConfig(block_m=16, block_n=32, block_k=64, swap_ab=True)),
    (70, 3, 256, 128, False, TritonConfig(block_m=128, block_n=128, block_k=64, evict_first=True)),
]


@pytest.mark.parametrize("mi,mj,k,n,transposed,cfg", PAIR_CASES)
def test_pair_kernel_matches_reference(mi, mj, k, n, transposed, cfg):
    rng = rng_for(mi * 1000 + k + n)
    words = random_words(rng, (n, k) if transposed else (k, n))
    a_i = jnp.asarray(rng.standard_normal((mi, k)), jnp.bfloat16)
    a_j = jnp.asarray(rng.standard_normal((mj, k)), jnp.bfloat16)
    got = triton_pair_gemm(a_i, a_j, words, transposed=transposed, config=cfg, interpret=True)
    ref = pair_gemm_reference(a_i, a_j, words, transposed=transposed, out_dtype=jnp.float32)
    for g, r, name in zip(got, ref, "ij"):
        assert g.dtype == jnp.bfloat16
        check(g, r, f"O_{name}")


def test_tile_config_rejects_bad_blocks():
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        TritonConfig(block_m=24)
    with pytest.raises(ValueError, match="split_k"):
        TritonConfig(split_k=0)


@pytest.mark.parametrize("sizes,swiglu,k,n,cfg", [
    ([3, 0, 5, 1, 0, 0], False, 128, 64, None),
    ([3, 0, 5, 1, 0, 0], False, 200, 64, TritonConfig(block_m=16, block_n=32, block_k=32, split_k=3)),
    ([1, 2, 17, 4], True, 192, 96, None),     # masked K and N, 2 row tiles for one expert
    ([0, 6, 9, 0, 2, 2], True, 256, 128, TritonConfig(block_m=32, block_n=64, block_k=64)),
    ([130, 3, 0, 40], True, 128, 64, TritonConfig(block_m=128, block_n=64, block_k=64, num_warps=8)),
])
def test_grouped_kernel_matches_reference(sizes, swiglu, k, n, cfg):
    rng = rng_for(sum(sizes) + k)
    P = len(sizes) // 2
    sizes = np.asarray(sizes, np.int32)
    extra = 3  # rows that belong to no pair (e.g. dense experts) at the front
    starts = extra + np.cumsum(sizes) - sizes
    meta = jnp.asarray(np.stack([starts[0::2], sizes[0::2], starts[1::2], sizes[1::2]], 1))
    R = extra + int(sizes.sum())
    xs = jnp.asarray(rng.standard_normal((R, k)), jnp.bfloat16)
    ws = (random_words(rng, (P, k, n)), random_words(rng, (P, k, n))) if swiglu else random_words(rng, (P, k, n))
    got = triton_grouped_pair_gemm(xs, meta, ws, max_rows=R, swiglu=swiglu, config=cfg, interpret=True)
    ref = grouped_pair_gemm_reference(xs, meta, ws, swiglu=swiglu)
    check(got[extra:], ref[extra:], "grouped")


@pytest.mark.parametrize("m,k,n,transposed,cfg", [
    (1, 4096, 14336, False, None),            # Mixtral w1/w3
    (16, 14336, 4096, False, None),           # Mixtral w2 (split-K from the table)
    (256, 4096, 14336, False, None),
    (3, 2048, 1408, False, None),             # DeepSeek-V2-Lite / Qwen1.5-MoE
    (5, 1408, 2048, True, None),
    (9, 200, 96, False, None),                # masked edges
    (8, 4096, 14336, False, TritonConfig(block_m=16, block_n=128, block_k=64, swap_ab=True, num_warps=8)),
    (8, 4096, 14336, False, TritonConfig(block_m=16, block_n=64, block_k=128, evict_first=True)),
])
def test_pair_kernel_lowers_to_triton_for_h100(m, k, n, transposed, cfg):
    a = SDS((m, k), jnp.bfloat16)
    w = SDS((n, k) if transposed else (k, n), jnp.uint16)
    fn = functools.partial(triton_pair_gemm, transposed=transposed, config=cfg)
    assert lower_for_h100(fn, a, a, w).count("__gpu$xla.gpu.triton") == 1


MIXTRAL = (8, 4096, 14336, 2)       # experts, hidden, expert intermediate, top-k
DEEPSEEK_V3 = (256, 7168, 2048, 8)  # DeepSeek-V3 / R1 / Kimi-K2 routed experts


@pytest.mark.parametrize("ratio,t,shape", [(0.5, 64, MIXTRAL), (0.25, 64, MIXTRAL), (0.5, 1024, MIXTRAL),  # t = 1024: 128-row tiles
                                           (0.5, 64, DEEPSEEK_V3), (0.25, 256, DEEPSEEK_V3)])
def test_packed_layer_lowers_to_triton_for_h100(ratio, t, shape):
    e, h, i, k = shape
    p = int(ratio * e)
    d = e - 2 * p
    experts = PackedExperts(
        pairs=SDS((p, 2), jnp.int32),
        packed={"w_gate": SDS((p, h, i), jnp.uint16), "w_up": SDS((p, h, i), jnp.uint16),
                "w_down": SDS((p, i, h), jnp.uint16)},
        dense_ids=SDS((d,), jnp.int32),
        dense={"w_gate": SDS((d, h, i), jnp.bfloat16), "w_up": SDS((d, h, i), jnp.bfloat16),
               "w_down": SDS((d, i, h), jnp.bfloat16)},
        num_experts=e)
    fn = functools.partial(triton_moe_ffn, out_dtype=jnp.bfloat16)
    args = (SDS((t, h), jnp.bfloat16), SDS((t, k), jnp.int32), SDS((t, k), jnp.float32), experts)
    # two launches for the pairs, two for the kept-dense experts (grouped dense kernel)
    assert lower_for_h100(fn, *args).count("__gpu$xla.gpu.triton") == (4 if d else 2)
