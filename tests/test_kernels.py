"""Decode-GEMM kernels (kernels/): Pallas interpret mode on CPU against the plain-jnp references,
and a lowering of every kernel variant to Triton IR for an abstract H100 (no GPU needed)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import kernels as K
from puzzlemoe_jax import codec
from puzzlemoe_jax.experts import PackedExperts
from puzzlemoe_jax.moe import dense_moe_ffn, moe_ffn
from puzzlemoe_jax.pairing import compress_layer

TOL = 1e-2  # relative Frobenius error allowed for bf16 operands / bf16 outputs


def _rng(seed):
    return np.random.default_rng([seed, 20261124])


def _words(rng, shape):
    return jnp.asarray(rng.integers(0, 1 << 16, size=shape, dtype=np.uint16))


def _check(got, ref, what, tol=None):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    if ref.size == 0:
        return
    err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err < (tol or TOL), f"{what}: relative error {err:.2e}"


def test_in_kernel_decode_is_bit_identical_to_codec_on_every_word():
    words = jnp.arange(1 << 16, dtype=jnp.uint32).astype(jnp.uint16).reshape(256, 256)

    def kernel(w_ref, i_ref, j_ref):
        w_i, w_j = K.decode_tile(w_ref[...])
        i_ref[...], j_ref[...] = w_i, w_j

    out = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16)
    got_i, got_j = pl.pallas_call(kernel, out_shape=[out, out], interpret=True)(words)
    ref_i, ref_j = codec.decode(words)
    bits = lambda x: np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint16))
    np.testing.assert_array_equal(bits(got_i), bits(ref_i))
    np.testing.assert_array_equal(bits(got_j), bits(ref_j))


PAIR_CASES = [  # (M_i, M_j, K, N, transpose_w, config or None for the tile table)
    (1, 1, 256, 128, False, None),
    (0, 0, 128, 64, False, None),
    (0, 5, 128, 64, False, None),
    (3, 7, 200, 96, False, None),             # K, N not multiples of any tile: masked edges
    (17, 2, 176, 88, False, None),            # 2 row tiles
    (5, 5, 1408, 64, False, None),            # DeepSeek/Qwen intermediate size (11 * 128)
    (16, 40, 512, 256, False, K.TileConfig(bm=16, bn=64, bk=64, split_k=2)),
    (33, 33, 384, 192, False, K.TileConfig(bm=64, bn=128, bk=128)),
    (4, 9, 256, 128, True, None),             # transposed words [N, K] (down projection as W^T)
    (7, 2, 192, 80, True, K.TileConfig(bm=16, bn=32, bk=64, swap_ab=True, split_k=2)),
    (7, 2, 256, 128, False, K.TileConfig(bm=16, bn=32, bk=64, swap_ab=True)),
    (70, 3, 256, 128, False, K.TileConfig(bm=128, bn=128, bk=64, evict_first=True)),
]


@pytest.mark.parametrize("mi,mj,k,n,transpose_w,cfg", PAIR_CASES)
def test_pair_kernel_matches_reference(mi, mj, k, n, transpose_w, cfg):
    rng = _rng(mi * 1000 + k + n)
    words = _words(rng, (n, k) if transpose_w else (k, n))
    a_i = jnp.asarray(rng.standard_normal((mi, k)), jnp.bfloat16)
    a_j = jnp.asarray(rng.standard_normal((mj, k)), jnp.bfloat16)
    got = K.dual_decode_gemm(a_i, a_j, words, transpose_w=transpose_w, config=cfg,
                             impl="pallas", interpret=True)
    ref = K.dual_decode_gemm_reference(a_i, a_j, words, transpose_w=transpose_w,
                                       out_dtype=jnp.float32)
    for g, r, name in zip(got, ref, "ij"):
        assert g.dtype == jnp.bfloat16
        _check(g, r, f"O_{name}")
    # the reference itself against decoded dense weights in f32
    w_i, w_j = codec.decode(words)
    if transpose_w:
        w_i, w_j = w_i.T, w_j.T
    f32 = lambda x: np.asarray(x, np.float32)
    _check(ref[0], f32(a_i) @ f32(w_i), "reference O_i")
    _check(ref[1], f32(a_j) @ f32(w_j), "reference O_j")


def test_pair_fallback_and_flags():
    rng = _rng(7)
    words = _words(rng, (128, 64))
    a = jnp.asarray(rng.standard_normal((K.PAIR_KERNEL_MAX_M_SMALL + 1, 128)), jnp.bfloat16)
    assert K.pair_kernel_wins(128, 4096, 14336) and not K.pair_kernel_wins(129, 4096, 14336)
    assert not K.pair_kernel_wins(65, 2048, 1408)
    jaxpr = str(jax.make_jaxpr(functools.partial(K.dual_decode_gemm, interpret=True))(a, a, words))
    assert "pallas_call" not in jaxpr  # past the table's limit "auto" takes the reference path
    jaxpr = str(jax.make_jaxpr(functools.partial(K.dual_decode_gemm, interpret=True))(a[:8], a[:8], words))
    assert "pallas_call" in jaxpr
    with pytest.raises(ValueError):
        K.dual_decode_gemm(a, a, words, impl="nope")
    with pytest.raises(ValueError):
        K.TileConfig(bm=24)


@pytest.mark.parametrize("sizes,silu_mul,k,n,cfg", [
    ([3, 0, 5, 1, 0, 0], False, 128, 64, None),
    ([3, 0, 5, 1, 0, 0], False, 200, 64, K.TileConfig(bm=16, bn=32, bk=32, split_k=3)),
    ([1, 2, 17, 4], True, 192, 96, None),     # masked K and N, 2 row tiles for one expert
    ([0, 6, 9, 0, 2, 2], True, 256, 128, K.TileConfig(bm=32, bn=64, bk=64)),
    ([130, 3, 0, 40], True, 128, 64, K.TileConfig(bm=128, bn=64, bk=64, num_warps=8)),  # layer_config's prefill tile
])
def test_grouped_kernel_matches_reference(sizes, silu_mul, k, n, cfg):
    rng = _rng(sum(sizes) + k)
    P = len(sizes) // 2
    sizes = np.asarray(sizes, np.int32)
    extra = 3  # rows that belong to no pair (e.g. dense experts) at the front
    starts = extra + np.cumsum(sizes) - sizes
    meta = jnp.asarray(np.stack([starts[0::2], sizes[0::2], starts[1::2], sizes[1::2]], 1))
    R = extra + int(sizes.sum())
    xs = jnp.asarray(rng.standard_normal((R, k)), jnp.bfloat16)
    ws = (_words(rng, (P, k, n)), _words(rng, (P, k, n))) if silu_mul else _words(rng, (P, k, n))
    got = K.grouped_dual_gemm(xs, meta, ws, max_rows=R, silu_mul=silu_mul, config=cfg,
                              interpret=True)
    ref = K.grouped_dual_gemm_reference(xs, meta, ws, silu_mul=silu_mul)
    _check(got[extra:], ref[extra:], "grouped")


def _layer(rng, e, h, i, ratio):
    w = {"w_gate": rng.standard_normal((e, h, i)) * 0.05, "w_up": rng.standard_normal((e, h, i)) * 0.05,
         "w_down": rng.standard_normal((e, i, h)) * 0.05}
    return compress_layer({n: jnp.asarray(v, jnp.bfloat16) for n, v in w.items()}, ratio)[0]


@pytest.mark.parametrize("e,h,i,t,k,ratio,dtype", [
    (8, 128, 192, 1, 2, 0.5, jnp.bfloat16),
    (8, 128, 192, 7, 2, 0.25, jnp.bfloat16),   # 4 experts left dense: ragged_dot beside the kernel
    (6, 96, 176, 5, 3, 0.5, jnp.float32),      # non-power-of-2 H and I, f32 activations
])
def test_packed_moe_ffn_matches_dense_reference(e, h, i, t, k, ratio, dtype):
    rng = _rng(e * h + t)
    experts = _layer(rng, e, h, i, ratio)
    x = jnp.asarray(rng.standard_normal((t, h)), dtype)
    ids = jnp.asarray(np.argsort(-rng.standard_normal((t, e)), 1)[:, :k], jnp.int32)
    tw = jnp.asarray(rng.random((t, k)), jnp.float32)
    f = jax.jit(functools.partial(K.packed_moe_ffn, impl="pallas", interpret=True))
    got = f(x, ids, tw, experts)
    assert got.dtype == dtype
    ref = dense_moe_ffn(x, ids, tw, experts.unpack(dtype))
    _check(got, ref, "packed_moe_ffn")
    # the decode path (slot-ordered weights + ragged_dot in x.dtype): the reference's function, up to sum order
    ref_path = jax.jit(functools.partial(K.packed_moe_ffn, impl="reference"))(x, ids, tw, experts)
    assert ref_path.dtype == dtype
    _check(ref_path, ref, "packed_moe_ffn(impl='reference')", tol=1e-5)
    _check(moe_ffn(x, ids, tw, experts, impl="pallas"), ref, "moe_ffn(impl='pallas')")


def test_packed_moe_ffn_gives_zero_for_dropped_experts():
    """A layer with pairs, dense and dropped experts (routed to anyway): same as the reference."""
    rng = _rng(5)
    e, h, i, t = 8, 64, 96, 6
    w = {n: jnp.asarray(rng.standard_normal(s) * 0.05, jnp.bfloat16) for n, s in
         (("w_gate", (e, h, i)), ("w_up", (e, h, i)), ("w_down", (e, i, h)))}
    merged = compress_layer(w, 0.25)[0]                      # 2 pairs, 4 dense
    keep = np.asarray(merged.dense_ids)[:2]
    experts = dataclasses.replace(merged, dense_ids=jnp.asarray(keep), dense={n: v[:2] for n, v in merged.dense.items()},
                                  dropped_ids=jnp.asarray(np.asarray(merged.dense_ids)[2:]))
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    ids = jnp.asarray(np.argsort(-rng.standard_normal((t, e)), 1)[:, :3], jnp.int32)
    tw = jnp.asarray(rng.random((t, 3)), jnp.float32)
    assert np.isin(np.asarray(ids), np.asarray(experts.dropped_ids)).any()
    ref = dense_moe_ffn(x, ids, tw, experts.unpack(jnp.bfloat16))
    for impl in ("pallas", "reference"):
        got = K.packed_moe_ffn(x, ids, tw, experts, impl=impl, interpret=True)
        _check(got, ref, f"packed_moe_ffn(impl={impl!r}) with dropped experts")


# ---------------------------------------------------------------------------------------------
# Lowering to Triton IR for an abstract H100: catches ops the real lowering rejects (interpret
# mode accepts far more), at the full model shapes, without running anything.
# ---------------------------------------------------------------------------------------------

def _lower_for_h100(fn, *args):
    ad = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                     platform="gpu")
    am = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,), abstract_device=ad)
    with jax.sharding.use_abstract_mesh(am):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return text.count("__gpu$xla.gpu.triton")


SDS = jax.ShapeDtypeStruct


@pytest.mark.parametrize("m,k,n,transpose_w,cfg", [
    (1, 4096, 14336, False, None),            # Mixtral w1/w3
    (16, 14336, 4096, False, None),           # Mixtral w2 (split-K from the table)
    (256, 4096, 14336, False, None),
    (3, 2048, 1408, False, None),             # DeepSeek-V2-Lite / Qwen1.5-MoE
    (5, 1408, 2048, True, None),
    (9, 200, 96, False, None),                # masked edges
    (8, 4096, 14336, False, K.TileConfig(bm=16, bn=128, bk=64, swap_ab=True, num_warps=8)),
    (8, 4096, 14336, False, K.TileConfig(bm=16, bn=64, bk=128, evict_first=True)),
])
def test_pair_kernel_lowers_to_triton_for_h100(m, k, n, transpose_w, cfg):
    a = SDS((m, k), jnp.bfloat16)
    w = SDS((n, k) if transpose_w else (k, n), jnp.uint16)
    fn = functools.partial(K.dual_decode_gemm, transpose_w=transpose_w, config=cfg,
                           impl="pallas", interpret=False)
    assert _lower_for_h100(fn, a, a, w) == 1


@pytest.mark.parametrize("ratio,t", [(0.5, 64), (0.25, 64), (0.5, 1024)])   # t = 1024: 128-row tiles
def test_packed_layer_lowers_to_triton_for_h100(ratio, t):
    e, h, i, k = 8, 4096, 14336, 2      # Mixtral layer shapes
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
    fn = functools.partial(K.packed_moe_ffn, impl="pallas", interpret=False)
    args = (SDS((t, h), jnp.bfloat16), SDS((t, k), jnp.int32), SDS((t, k), jnp.float32), experts)
    assert _lower_for_h100(fn, *args) == 2


# ---------------------------------------------------------------------------------------------
# Mosaic-GPU swap-AB variant: Mosaic GPU's CPU interpreter runs it with the decoded tiles staged in
# shared memory (it has no register-operand wgmma); the register form runs only on a Hopper GPU
# (benchmarks/bench_mosaic.py checks it against the reference there).
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mi,mj,k,n,block_n,block_k,split_k,block_m", [
    (1, 3, 256, 128, 64, 128, 1, None),
    (5, 9, 512, 128, 128, 64, 2, None),
    (0, 17, 256, 64, 64, 64, 1, None),
    (37, 20, 256, 64, 64, 64, 2, 16),     # tokens over 3 CTAs (block_m 16, padded to 48)
])
def test_mosaic_pair_kernel_matches_reference_in_interpreter(mi, mj, k, n, block_n, block_k, split_k, block_m):
    from kernels.mosaic_pair import mosaic_dual_decode_gemm
    rng = _rng(mi * 7 + k + n)
    words = _words(rng, (k, n))
    a_i = jnp.asarray(rng.standard_normal((mi, k)), jnp.bfloat16)
    a_j = jnp.asarray(rng.standard_normal((mj, k)), jnp.bfloat16)
    got = mosaic_dual_decode_gemm(a_i, a_j, words.T, block_n=block_n, block_k=block_k, split_k=split_k,
                                  block_m=block_m, interpret=True)
    ref = K.dual_decode_gemm_reference(a_i, a_j, words, out_dtype=jnp.float32)
    for g, r, name in zip(got, ref, "ij"):
        assert g.dtype == jnp.bfloat16 and g.shape == r.shape
        _check(g, r, f"mosaic O_{name}")


def test_mosaic_swar_decode_math_equals_codec_on_every_word_pair():
    from kernels.mosaic_pair import decode_pairs_swar
    words = jnp.arange(1 << 16, dtype=jnp.uint32).astype(jnp.uint16)
    partner = jnp.roll(words, 12345)   # every word in both halves, next to varied partners
    for lo, hi in ((words, partner), (partner, words)):
        lanes = lo.astype(jnp.uint32) | (hi.astype(jnp.uint32) << 16)
        for got, (want_lo, want_hi) in zip(decode_pairs_swar(lanes), zip(codec.decode_words(lo), codec.decode_words(hi))):
            assert bool(jnp.array_equal((got & 0xFFFF).astype(jnp.uint16), want_lo))
            assert bool(jnp.array_equal((got >> 16).astype(jnp.uint16), want_hi))


def test_pair_api_mosaic_impl():
    rng = _rng(11)
    words = _words(rng, (128, 256))                       # [N, K]: transposed words
    a_i = jnp.asarray(rng.standard_normal((3, 256)), jnp.bfloat16)
    a_j = jnp.asarray(rng.standard_normal((5, 256)), jnp.bfloat16)
    got = K.dual_decode_gemm(a_i, a_j, words, transpose_w=True, impl="mosaic", interpret=True)
    ref = K.dual_decode_gemm_reference(a_i, a_j, words, transpose_w=True, out_dtype=jnp.float32)
    for g, r, name in zip(got, ref, "ij"):
        _check(g, r, f"impl=mosaic O_{name}")
    with pytest.raises(ValueError, match="transposed words"):
        K.dual_decode_gemm(a_i, a_j, words.T, impl="mosaic", interpret=True)


def test_mosaic_config_fits_shared_memory_and_fills_the_gpu():
    from kernels.mosaic_pair import SMEM_BYTES, TWO_PER_SM_BYTES, mosaic_config
    for m in (1, 16, 64, 128, 256, 1000):
        for k, n in ((4096, 14336), (14336, 4096), (2048, 1408)):
            c = mosaic_config(m, k, n)
            bm = c["block_m"]
            assert bm <= 128 and bm >= min(m, 128) and bm % 8 == 0, (m, c)
            assert c["steps"] >= 2 and c["steps"] * 2 * c["block_k"] * (c["block_n"] + 2 * bm) <= SMEM_BYTES, (m, c)
            assert k % (c["block_k"] * c["split_k"]) == 0
    assert mosaic_config(1, 14336, 4096)["split_k"] == 2 and mosaic_config(1, 4096, 14336)["split_k"] == 1
    # more CTAs than SMs (Mixtral w1/w3: 224): shallow pipelines, two CTAs per SM
    for m in (1, 64, 128, 256):
        c = mosaic_config(m, 4096, 14336)
        assert c["steps"] == 2 and 2 * 2 * c["block_k"] * (64 + 2 * c["block_m"]) <= TWO_PER_SM_BYTES, (m, c)


def test_mosaic_pair_kernel_rejects_bad_shapes():
    from kernels.mosaic_pair import mosaic_dual_decode_gemm
    a = jnp.zeros((4, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of block_n"):
        mosaic_dual_decode_gemm(a, a, jnp.zeros((96, 256), jnp.uint16), interpret=True)
    with pytest.raises(ValueError, match="multiple of block_k"):
        mosaic_dual_decode_gemm(a[:, :200], a[:, :200], jnp.zeros((64, 200), jnp.uint16), interpret=True)
    with pytest.raises(ValueError, match="block_m=12 must be a multiple of 8"):
        mosaic_dual_decode_gemm(a, a, jnp.zeros((64, 256), jnp.uint16), block_m=12, interpret=True)
    with pytest.raises(ValueError, match="decode form"):
        mosaic_dual_decode_gemm(a, a, jnp.zeros((64, 256), jnp.uint16), decode="nope", interpret=True)


@pytest.mark.parametrize("sizes,num_dense,block_m", [
    ([3, 0, 5, 1, 0, 0], 0, 8),
    ([2, 7, 9, 17, 0, 8, 1], 1, 8),        # one dense slot first, sizes across block edges
    ([0, 0, 40, 3, 129, 130], 0, 16),
    ([0, 0, 0, 0], 0, 128),                # no rows at all: no live tile
])
def test_grouped_layout_covers_every_pair_row_once(sizes, num_dense, block_m):
    """Every row of every pair slot lies in exactly one live tile's block of its own side; blocks
    are aligned, owned by one slot, inside the padded rows; dead sides use the spare block."""
    from kernels.mosaic_pair import grouped_layout
    sizes = np.asarray(sizes, np.int32)
    rows = int(sizes.sum()) + 5            # a static bound above the real count
    pad_start, tiles, padded = grouped_layout(jnp.asarray(sizes), num_dense, block_m, rows)
    pad_start, tiles = np.asarray(pad_start), np.asarray(tiles)
    P = (len(sizes) - num_dense) // 2
    spare = padded // block_m - 1
    assert padded % block_m == 0 and tiles.shape == (-(-rows // block_m) + P, 4)
    covered = {}
    for p, b_i, b_j, live in tiles:
        if not live:
            continue
        for side, b in ((0, b_i), (1, b_j)):
            if b == spare:
                continue
            slot = num_dense + 2 * p + side
            r0 = b * block_m - pad_start[slot]
            assert pad_start[slot] % block_m == 0 and 0 <= r0 < sizes[slot], (p, side, b)
            assert (slot, r0) not in covered
            covered[(slot, r0)] = True
    want = {(num_dense + q, r0) for q in range(2 * P) for r0 in range(0, sizes[num_dense + q], block_m)}
    assert set(covered) == want
    ends = [pad_start[s] + -(-sizes[s] // block_m) * block_m for s in range(num_dense, len(sizes))]
    assert max(ends, default=0) <= spare * block_m       # the spare block is nobody's


def test_grouped_block_m_holds_three_times_the_mean_within_the_swiglu_epilogue():
    """The token block: 3x the mean rows per expert in multiples of 16 while that fits the SwiGLU
    epilogue, else 2x the mean (at least that epilogue's maximum), never above MAX_BLOCK_M nor above
    the token count (no expert gets more rows than there are tokens)."""
    from kernels.mosaic_pair import MAX_BLOCK_M, SWIGLU_MAX_BLOCK_M, grouped_block_m
    got = {t: grouped_block_m(2 * t, 8, t) for t in (1, 4, 8, 12, 16, 32, 48, 64, 96, 128, 160, 256, 4096)}
    assert got == {1: 8, 4: 8, 8: 8, 12: 16, 16: 16, 32: 32, 48: 48, 64: 48, 96: 64, 128: 64, 160: 80, 256: 128,
                   4096: 128}
    for rows in range(1, 2000, 7):
        for e in (8, 60, 64):
            bm = grouped_block_m(rows, e)
            assert bm % 16 == 0 and 16 <= bm <= MAX_BLOCK_M
            assert bm >= min(3 * rows / e, SWIGLU_MAX_BLOCK_M) or bm == MAX_BLOCK_M
            assert grouped_block_m(rows, e, tokens=rows) == min(bm, -(-rows // 8) * 8)


@pytest.mark.parametrize("t,ratio,drop,settings", [
    (1, 0.5, False, (None, None)),
    (9, 0.5, False, ({"steps": 3}, {"steps": 3, "block_k": 64})),   # overrides of mosaic_config
    (7, 0.25, True, (None, None)),
    (9, 0.5, False, ({"swiglu": False}, None)),   # SwiGLU in XLA between the launches (large token blocks)
    (9, 0.5, False, ({"block_m": 8}, None)),      # a token block other than grouped_block_m's
    (9, 0.5, False, ({"block_m": 64}, None)),     # SwiGLU epilogue, down reads h^T as it comes
    (9, 0.25, True, ({"block_m": 128}, None)),    # SwiGLU in XLA on the transposed result, h^T as it comes
    (9, 0.5, False, ({"block_m": 128, "out_dtype": jnp.bfloat16}, None)),   # gate+up written in bf16
])
def test_packed_moe_ffn_mosaic_matches_dense_reference(t, ratio, drop, settings):
    """impl="mosaic" (grouped Mosaic kernel in its interpreter, SwiGLU in the gate+up epilogue or in
    XLA) on random routing, with dense and dropped experts beside the pairs."""
    rng = _rng(31 + t)
    e, h, i, k = 8, 128, 192, 2
    experts = _layer(rng, e, h, i, ratio)
    if drop:   # keep 2 of the 4 dense experts, drop the others (routed to anyway)
        keep = np.asarray(experts.dense_ids)[:2]
        experts = dataclasses.replace(experts, dense_ids=jnp.asarray(keep),
                                      dense={n: v[:2] for n, v in experts.dense.items()},
                                      dropped_ids=jnp.asarray(np.asarray(experts.dense_ids)[2:]))
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    ids = jnp.asarray(np.argsort(-rng.standard_normal((t, e)), 1)[:, :k], jnp.int32)
    tw = jnp.asarray(rng.random((t, k)), jnp.float32)
    ref = dense_moe_ffn(x, ids, tw, experts.unpack(jnp.bfloat16))
    words = K.mosaic_layer_words(experts)
    got = jax.jit(functools.partial(K.packed_moe_ffn, impl="mosaic", interpret=True, mosaic_settings=settings))(
        x, ids, tw, experts, mosaic_words=words)
    _check(got, ref, "packed_moe_ffn(impl='mosaic')")


def test_mosaic_grouped_kernel_rejects_bad_shapes():
    from kernels.mosaic_pair import mosaic_grouped_dual_gemm
    tiles = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="block_m=12 must be a multiple of 8"):
        mosaic_grouped_dual_gemm(jnp.zeros((48, 256), jnp.bfloat16), tiles, jnp.zeros((1, 64, 256), jnp.uint16),
                                 block_m=12, interpret=True)
    with pytest.raises(ValueError, match="multiples of block_n"):
        mosaic_grouped_dual_gemm(jnp.zeros((16, 256), jnp.bfloat16), tiles, jnp.zeros((1, 96, 256), jnp.uint16),
                                 block_m=8, interpret=True)
    with pytest.raises(ValueError, match="xs_transposed=True takes block_m a multiple of 64"):
        mosaic_grouped_dual_gemm(jnp.zeros((256, 32), jnp.bfloat16), tiles, jnp.zeros((1, 64, 256), jnp.uint16),
                                 block_m=32, xs_transposed=True, interpret=True)
    with pytest.raises(ValueError, match="does not match the words' K = 256"):
        mosaic_grouped_dual_gemm(jnp.zeros((64, 128), jnp.bfloat16), tiles, jnp.zeros((1, 64, 256), jnp.uint16),
                                 block_m=64, interpret=True)


def test_model_use_mosaic_matches_reference_impl():
    """CausalLM.use_mosaic: the packed words re-laid out in place (same bytes), the forward pass
    through the grouped Mosaic kernel (interpreter) equals the reference path; the [K, N] words
    are still available to the other paths."""
    from puzzlemoe_jax.config import ModelConfig
    from puzzlemoe_jax.models import CausalLM, PackedExpertsModule, forward
    cfg = ModelConfig(model_type="mixtral", vocab_size=64, hidden_size=128, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=32, intermediate_size=192, moe_intermediate_size=192,
                      num_experts=8, top_k=2, moe_layers=(0,), norm_topk_prob=True)
    model = CausalLM(cfg, dtype=jnp.bfloat16, impl="reference")
    experts = _layer(_rng(41), 8, 128, 192, 0.25)          # 2 pairs + 4 dense experts
    model.set_experts(0, experts)
    ids = jnp.asarray(_rng(42).integers(0, 64, (2, 9)), jnp.int32)
    ref = forward(model, ids)
    module = model.moe_layers()[0].experts
    before = module.weights().nbytes()
    model.use_mosaic()
    assert isinstance(module, PackedExpertsModule) and module.layout == "mosaic"
    assert model.moe_layers()[0].impl == "mosaic"
    assert not hasattr(module, "packed_w_gate") and module.weights().nbytes() == before
    for n in ("w_gate", "w_up", "w_down"):
        assert bool(jnp.array_equal(module.weights().packed[n], experts.packed[n]))
    _check(forward(model, ids), ref, "use_mosaic forward")
    with pytest.raises(ValueError, match="one of"):
        model.set_impl("nope")
