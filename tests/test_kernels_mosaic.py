"""Mosaic-GPU kernels (kernels/mosaic_*.py) in Mosaic GPU's CPU interpreter, which has no
register-operand wgmma: there the decoded tiles are staged in shared memory; the register (SWAR)
forms run only on a Hopper GPU (benchmarks/check_mosaic_layer.py checks them against an f32
reference there); here they are built by lowering the kernels for CUDA.  Configs, the SWAR
arithmetic and the grouped layout are checked exactly."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import stream_k
from kernels.gpu import num_sms, smem_budget, smem_two_per_sm
from kernels.mosaic_ffn import (FEW_EXPERTS_MIN_BLOCK_M, absorb_spills, absorbs_spills, from_mosaic_words,
                                grouped_block_m, grouped_layout, layer_configs, live_tiles, mosaic_moe_ffn,
                                to_mosaic_words)
from kernels.mosaic_gemm import (MAX_BLOCK_M, MosaicConfig, mosaic_config,
                                 mosaic_grouped_pair_gemm, mosaic_pair_gemm)
from kernels.mosaic_swar import decode_pairs_prmt, decode_pairs_swar
from kernels.reference import pair_gemm_reference
from kernels.swiglu_transpose import swiglu_transposed
from puzzlemoe_jax import codec
from tests.kernel_cases import check, layer_case, lower_for_h100, random_layer, random_words, rng_for


@pytest.mark.parametrize("mi,mj,k,n,block_n,block_k,split_k,block_m", [
    (1, 3, 256, 128, 64, 128, 1, 8),
    (5, 9, 512, 128, 128, 64, 2, 16),
    (0, 17, 256, 64, 64, 64, 1, 24),
    (37, 20, 256, 64, 64, 64, 2, 16),     # tokens over 3 CTAs (block_m 16, padded to 48)
])
def test_mosaic_pair_kernel_matches_reference(mi, mj, k, n, block_n, block_k, split_k, block_m):
    rng = rng_for(mi * 7 + k + n)
    words = random_words(rng, (k, n))
    a_i = jnp.asarray(rng.standard_normal((mi, k)), jnp.bfloat16)
    a_j = jnp.asarray(rng.standard_normal((mj, k)), jnp.bfloat16)
    cfg = MosaicConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k)
    got = mosaic_pair_gemm(a_i, a_j, words.T, config=cfg, interpret=True)
    ref = pair_gemm_reference(a_i, a_j, words, out_dtype=jnp.float32)
    for g, r, name in zip(got, ref, "ij"):
        assert g.dtype == jnp.bfloat16 and g.shape == r.shape
        check(g, r, f"mosaic O_{name}")
    default = mosaic_pair_gemm(a_i, a_j, words.T, interpret=True)   # mosaic_config's settings
    for g, r, name in zip(default, ref, "ij"):
        check(g, r, f"mosaic (default config) O_{name}")


@pytest.mark.parametrize("decode_pairs", [decode_pairs_swar, decode_pairs_prmt], ids=["swar", "prmt"])
def test_swar_decode_math_equals_codec_on_every_word_pair(decode_pairs):
    words = jnp.arange(1 << 16, dtype=jnp.uint32).astype(jnp.uint16)
    partner = jnp.roll(words, 12345)   # every word in both halves, next to varied partners
    for lo, hi in ((words, partner), (partner, words)):
        lanes = lo.astype(jnp.uint32) | (hi.astype(jnp.uint32) << 16)
        for got, (want_lo, want_hi) in zip(decode_pairs(lanes), zip(codec.decode_words(lo), codec.decode_words(hi))):
            assert bool(jnp.array_equal((got & 0xFFFF).astype(jnp.uint16), want_lo))
            assert bool(jnp.array_equal((got >> 16).astype(jnp.uint16), want_hi))


@pytest.mark.parametrize("form", ["swar", "prmt"])
def test_register_decode_forms_build_their_kernels_for_hopper(form):
    """The GPU-only decode forms (registers, ``inline_mgpu``) never run in the interpreter; lowering the
    kernels for CUDA on this CPU machine builds them: the pair kernel, the grouped SwiGLU launch and a
    grouped launch reading its activations transposed (64- and 16-column token blocks), launches writing
    their results token-major (SwiGLU and plain), and one whose tiles may carry an extra token block."""
    cfg = lambda bm: MosaicConfig(block_m=bm, decode=form, a_in_smem=False)  # noqa: E731
    sds = jax.ShapeDtypeStruct
    lower = lambda f, *args: jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()  # noqa: E731
    texts = [
        lower(lambda ai, aj, w: mosaic_pair_gemm(ai, aj, w, config=cfg(16)),
              sds((16, 256), jnp.bfloat16), sds((16, 256), jnp.bfloat16), sds((128, 256), jnp.uint16)),
        lower(lambda x, t, w: mosaic_grouped_pair_gemm(x, t, w, block_m=16, swiglu=True, config=cfg(16)),
              sds((48, 256), jnp.bfloat16), sds((2, 4), jnp.int32), sds((2, 256, 256), jnp.uint16)),
        lower(lambda x, t, w: mosaic_grouped_pair_gemm(x, t, w, block_m=64, xs_transposed=True, config=cfg(64)),
              sds((128, 192), jnp.bfloat16), sds((2, 4), jnp.int32), sds((2, 128, 128), jnp.uint16)),
        lower(lambda x, t, w: mosaic_grouped_pair_gemm(x, t, w, block_m=16, xs_transposed=True, config=cfg(16)),
              sds((128, 48), jnp.bfloat16), sds((2, 4), jnp.int32), sds((2, 128, 128), jnp.uint16)),
        lower(lambda x, t, w: mosaic_grouped_pair_gemm(
            x, t, w, block_m=8, swiglu=True, config=dataclasses.replace(cfg(8), token_major_out=True)),
              sds((32, 256), jnp.bfloat16), sds((2, 4), jnp.int32), sds((2, 256, 256), jnp.uint16)),
        lower(lambda x, t, w: mosaic_grouped_pair_gemm(
            x, t, w, block_m=24, out_dtype=jnp.bfloat16, config=dataclasses.replace(cfg(24), token_major_out=True)),
              sds((96, 256), jnp.bfloat16), sds((2, 4), jnp.int32), sds((2, 128, 256), jnp.uint16)),
        lower(lambda x, t, w: mosaic_grouped_pair_gemm(     # tiles that carry an extra token block
            x, t, w, block_m=80, out_dtype=jnp.bfloat16, config=dataclasses.replace(cfg(80), token_major_out=True)),
              sds((400, 256), jnp.bfloat16), sds((3, 6), jnp.int32), sds((2, 128, 256), jnp.uint16)),
        lower(lambda x, t, w: mosaic_grouped_pair_gemm(     # warp-specialized, SwiGLU
            x, t, w, block_m=32, swiglu=True, config=dataclasses.replace(cfg(32), token_major_out=True, consumer_wgs=2)),
              sds((96, 256), jnp.bfloat16), sds((2, 4), jnp.int32), sds((2, 512, 256), jnp.uint16)),
        lower(lambda x, t, w: mosaic_grouped_pair_gemm(     # warp-specialized, extra token blocks
            x, t, w, block_m=80, out_dtype=jnp.bfloat16, config=dataclasses.replace(cfg(80), consumer_wgs=2)),
              sds((400, 256), jnp.bfloat16), sds((3, 6), jnp.int32), sds((2, 128, 256), jnp.uint16)),
    ]
    for text in texts:
        assert ("prmt.b32" in text) == (form == "prmt")


def test_mosaic_config_fits_shared_memory_and_fills_the_gpu():
    for m in (1, 16, 64, 128, 256, 1000):
        for k, n in ((4096, 14336), (14336, 4096), (2048, 1408)):
            c = mosaic_config(m, k, n)
            assert c.block_m <= 128 and c.block_m >= min(m, 128) and c.block_m % 8 == 0, (m, c)
            stage = 2 * c.block_k * (c.block_n + 2 * c.block_m)
            assert c.num_stages >= 2 and c.num_stages * stage <= smem_budget(), (m, c)
            assert k % (c.block_k * c.split_k) == 0
    assert mosaic_config(1, 14336, 4096).split_k == 2 and mosaic_config(1, 4096, 14336).split_k == 1
    assert mosaic_config(1, 14336, 4096, min_ctas=264).split_k == 8   # 64 CTA columns: 512 CTAs
    # more CTAs than SMs (Mixtral w1/w3: 224): two CTAs per SM with 2 stages, or, K split, as many as fit
    for m, k, n, min_ctas in ((1, 4096, 14336, 128), (64, 4096, 14336, 128), (256, 4096, 14336, 128),
                              (1, 14336, 4096, 264), (8, 2048, 1408, 264)):
        c = mosaic_config(m, k, n, m_blocks=4, min_ctas=min_ctas)
        stage = 2 * c.block_k * (64 + 2 * c.block_m)
        assert (n // 64) * 4 * c.split_k > num_sms(), (m, c)
        assert 2 <= c.num_stages <= 4 and c.num_stages * stage <= smem_two_per_sm(), (m, c)
        if c.split_k == 1:
            assert c.num_stages == 2, (m, c)
        else:
            assert c.num_stages == 4 or (c.num_stages + 1) * stage > smem_two_per_sm(), (m, c)
    assert mosaic_config(1, 14336, 4096, m_blocks=4, min_ctas=264).split_k > 1


def test_layer_configs_size_launches_for_the_live_tiles():
    """``live_tiles`` bounds the live tiles ``grouped_layout`` makes on any routing, and the layer's
    launches are sized for them: at one token (Mixtral: 2 of 4 pairs live) the down launch splits
    K until its CTAs fill two per SM, which it did not when sized for every pair."""
    rng = rng_for(16)
    for e, k, t in ((8, 2, 1), (8, 2, 3), (8, 2, 40), (64, 6, 1), (64, 6, 5), (128, 8, 2), (128, 8, 33)):
        for _ in range(5):
            ids = np.argsort(-rng.standard_normal((t, e)), 1)[:, :k]
            sizes = np.bincount(ids.ravel(), minlength=e).astype(np.int32)
            bm = grouped_block_m(t * k, e, t)
            _, tiles, _ = grouped_layout(jnp.asarray(sizes), 0, bm, t * k)
            assert int(np.asarray(tiles)[:, 3].sum()) <= live_tiles(t * k, e // 2, bm), (e, k, t, sizes)
    assert live_tiles(2, 4, 8) == 2 and live_tiles(512, 4, 128) == 8
    gate_up, down = layer_configs(8, 2, 4, 4096, 14336)
    assert down.split_k * 2 * (4096 // down.block_n) >= 2 * num_sms() and down.num_stages >= 2
    assert mosaic_config(8, 14336, 4096, m_blocks=4).split_k == 1        # sized for all 4 pairs
    assert gate_up.split_k == 1 and gate_up.block_m == down.block_m == 8
    # token-major results where there is no K split; the K-split down launch writes f32 O^T partials
    assert gate_up.token_major_out and not down.token_major_out
    # many rows: every pair live, the settings of a launch sized for all of them
    want = dataclasses.replace(mosaic_config(128, 14336, 4096, m_blocks=8, min_ctas=264), token_major_out=True)
    assert layer_configs(128, 512, 4, 4096, 14336)[1] == want
    # a down launch split in two decodes with "swar", others with the backend's default
    for rows in (1, 2, 4, 8):
        gu, dn = layer_configs(8, rows, 4, 4096, 14336)
        assert dn.decode == ("swar" if dn.split_k == 2 else None) and gu.decode is None, (rows, dn)
    assert any(layer_configs(8, r, 4, 4096, 14336)[1].split_k == 2 for r in (1, 2, 4, 8))


def test_mosaic_kernels_reject_bad_shapes_and_settings():
    a = jnp.zeros((4, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of block_n"):
        mosaic_pair_gemm(a, a, jnp.zeros((96, 256), jnp.uint16), interpret=True)
    with pytest.raises(ValueError, match="multiple of block_k"):
        mosaic_pair_gemm(a[:, :200], a[:, :200], jnp.zeros((64, 200), jnp.uint16), interpret=True)
    with pytest.raises(ValueError, match="block_m=12 must be a multiple of 8"):
        MosaicConfig(block_m=12)
    with pytest.raises(ValueError, match="decode="):
        MosaicConfig(block_m=8, decode="nope")
    with pytest.raises(ValueError, match="consumer_wgs=3 must be 1 or 2"):
        MosaicConfig(block_m=8, consumer_wgs=3)
    with pytest.raises(ValueError, match="one warpgroup per CTA"):
        mosaic_pair_gemm(a, a, jnp.zeros((64, 256), jnp.uint16), config=MosaicConfig(block_m=8, consumer_wgs=2),
                         interpret=True)
    for cols, swiglu in ((5, False), (6, True)):   # the table's width; an extra block with the SwiGLU form
        with pytest.raises(ValueError, match="must have 4 columns, or 6 without swiglu"):
            mosaic_grouped_pair_gemm(jnp.zeros((16, 256), jnp.bfloat16), jnp.zeros((2, cols), jnp.int32),
                                     jnp.zeros((1, 128, 256), jnp.uint16), block_m=8, swiglu=swiglu, interpret=True)
    tiles = jnp.zeros((2, 4), jnp.int32)
    grouped = functools.partial(mosaic_grouped_pair_gemm, tiles=tiles, interpret=True)
    with pytest.raises(ValueError, match="multiples of block_n"):
        grouped(jnp.zeros((16, 256), jnp.bfloat16), words=jnp.zeros((1, 96, 256), jnp.uint16), block_m=8)
    with pytest.raises(ValueError, match="block_n\\*consumer_wgs=128"):   # 64 columns: half a two-consumer CTA
        grouped(jnp.zeros((16, 256), jnp.bfloat16), words=jnp.zeros((1, 64, 256), jnp.uint16), block_m=8,
                config=MosaicConfig(block_m=8, consumer_wgs=2))
    with pytest.raises(ValueError, match="xs_transposed=True takes block_m 16, 32 or a multiple of 64"):
        grouped(jnp.zeros((256, 96), jnp.bfloat16), words=jnp.zeros((1, 64, 256), jnp.uint16), block_m=48,
                xs_transposed=True)
    with pytest.raises(ValueError, match="token_major_out=True takes a bf16 result without K split"):
        grouped(jnp.zeros((16, 256), jnp.bfloat16), words=jnp.zeros((1, 64, 256), jnp.uint16), block_m=8,
                config=MosaicConfig(block_m=8, token_major_out=True))
    with pytest.raises(ValueError, match="pair kernel writes O"):
        mosaic_pair_gemm(a, a, jnp.zeros((64, 256), jnp.uint16), config=MosaicConfig(block_m=8, token_major_out=True),
                         interpret=True)
    with pytest.raises(ValueError, match="does not match the words' K = 256"):
        grouped(jnp.zeros((64, 128), jnp.bfloat16), words=jnp.zeros((1, 64, 256), jnp.uint16), block_m=64)
    with pytest.raises(ValueError, match="equal the config's block_m"):
        grouped(jnp.zeros((64, 256), jnp.bfloat16), words=jnp.zeros((1, 64, 256), jnp.uint16), block_m=64,
                config=MosaicConfig(block_m=32))


@pytest.mark.parametrize("swiglu", [True, False])
def test_token_major_out_is_the_transposed_result(swiglu):
    """``token_major_out`` writes exactly the usual ``O^T`` result transposed (interpreter, bf16)."""
    rng = rng_for(21)
    words = jnp.asarray(rng.integers(0, 2 ** 16, (2, 256, 128)), jnp.uint16)
    xs = jnp.asarray(rng.standard_normal((32, 128)), jnp.bfloat16)
    tiles = jnp.asarray([[0, 0, 1, 1], [1, 2, 3, 1]], jnp.int32)
    run = lambda **kw: mosaic_grouped_pair_gemm(xs, tiles, words, block_m=8, swiglu=swiglu,  # noqa: E731
                                                out_dtype=jnp.bfloat16, interpret=True, **kw)
    usual, token_major = run(), run(config=MosaicConfig(block_m=8, token_major_out=True))
    assert token_major.shape == usual.T.shape and bool(jnp.all(jnp.isfinite(usual.astype(jnp.float32))))
    assert bool(jnp.array_equal(token_major, usual.T))


@pytest.mark.parametrize("swiglu,token_major_out,split_k,absorb", [
    (True, True, 1, False), (True, False, 1, False), (False, True, 1, True), (False, False, 2, True)])
def test_warp_specialized_launch_writes_what_one_warpgroup_writes(swiglu, token_major_out, split_k, absorb):
    """``consumer_wgs=2`` (a memory warpgroup and two consumers sharing the token blocks, 128 columns a
    CTA) writes exactly the rows the one-warpgroup launch writes (interpreter): SwiGLU, token-major,
    K-split partials and tiles with an extra token block."""
    rng = rng_for(24)
    block_m, K = 16, 256
    sizes = jnp.asarray([20, 7, 3, 12, 0, 17], jnp.int32)
    _, tiles, padded = grouped_layout(sizes, 0, block_m, int(sizes.sum()))
    if absorb:
        tiles = absorb_spills(tiles, padded // block_m - 1)
        assert int((tiles[:, 5] > 0).sum()) >= 1
    words = jnp.asarray(rng.integers(0, 2 ** 16, (3, 512 if swiglu else 256, K)), jnp.uint16)
    xs = jnp.asarray(rng.standard_normal((padded, K)), jnp.bfloat16)
    cfg = MosaicConfig(block_m=block_m, token_major_out=token_major_out, split_k=split_k,
                       block_k=128 // split_k, num_stages=2)
    run = lambda c: mosaic_grouped_pair_gemm(xs, tiles, words, block_m=block_m, swiglu=swiglu, out_dtype=jnp.bfloat16,  # noqa: E731
                                             config=c, interpret=True, sum_splits=False)
    one, two = run(cfg), run(dataclasses.replace(cfg, consumer_wgs=2))
    spare = padded // block_m - 1
    covered = np.zeros(padded, bool)
    for p, b_i, b_j, live, *extra in np.asarray(tiles):
        for b in (b_i, b_j, *extra[:1]):
            covered[b * block_m:(b + 1) * block_m] |= bool(live) and b != spare
    axis = 1 if token_major_out else 2
    want, got = (np.take(np.asarray(o, np.float32), np.flatnonzero(covered), axis=axis) for o in (one, two))
    assert want.size and np.isfinite(want).all() and np.array_equal(got, want)


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("sizes,num_dense,block_m", [
    ([3, 0, 5, 1, 0, 0], 0, 8),
    ([2, 7, 9, 17, 0, 8, 1], 1, 8),        # one dense slot first, sizes across block edges
    ([0, 0, 40, 3, 129, 130], 0, 16),
    ([0, 0, 0, 0], 0, 128),                # no rows at all: no live tile
    ([4, 100, 30, 10, 150, 0, 90, 90, 90], 1, 72),   # sides of 2 / 1, 1 / 3, 0 / 2 and 2 / 2 blocks
])
def test_grouped_layout_covers_every_pair_row_once(sizes, num_dense, block_m, absorb):
    """Every row of every pair slot lies in exactly one live tile's block of its own side; blocks
    are aligned, owned by one slot, inside the padded rows; dead sides use the spare block.  With
    ``absorb_spills`` the same holds counting each tile's extra block, exactly the pairs of one side
    with two blocks and the other with at most one have one live tile, and no other pair changes."""
    sizes = np.asarray(sizes, np.int32)
    rows = int(sizes.sum()) + 5            # a static bound above the real count
    pad_start, tiles, padded = grouped_layout(jnp.asarray(sizes), num_dense, block_m, rows)
    P = (len(sizes) - num_dense) // 2
    spare = padded // block_m - 1
    plain = np.asarray(tiles)
    if absorb:
        tiles = absorb_spills(tiles, spare)
    pad_start, tiles = np.asarray(pad_start), np.asarray(tiles)
    assert padded % block_m == 0 and tiles.shape == (-(-rows // block_m) + min(P, rows), 6 if absorb else 4)
    if absorb:
        assert np.array_equal(tiles[:, :3], plain[:, :3])
        blocks = -(-sizes[num_dense:] // block_m)
        merged = {p for p in range(P) if max(blocks[2 * p:2 * p + 2]) == 2 and min(blocks[2 * p:2 * p + 2]) <= 1}
        assert {p for p, *_, side in tiles if side} == merged
        assert [int(tiles[:, 3][tiles[:, 0] == p].sum()) for p in range(P)] == [
            (1 if p in merged else int(max(blocks[2 * p:2 * p + 2]))) for p in range(P)]
    covered = {}
    for p, b_i, b_j, live, *extra in tiles:
        if not live:
            continue
        b_x, side_x = extra or (spare, 0)
        for side, b in ((0, b_i), (1, b_j), *([(side_x - 1, b_x)] if side_x else [])):
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


def test_grouped_block_m_holds_the_mean_plus_deviations_of_a_uniform_router():
    """The token block: the mean rows per expert plus 3 (up to 16 experts) or 2 standard deviations
    of a uniform router's count, in multiples of 8 (up to 16 experts: at least 4x the mean, up to
    32), 80 above that when the mean plus two deviations fits, else MAX_BLOCK_M; never above the
    token count rounded up to 8."""
    got = {t: grouped_block_m(2 * t, 8, t) for t in (1, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 256, 512, 4096)}
    assert got == {1: 8, 4: 8, 8: 8, 12: 16, 16: 16, 24: 24, 32: 32, 48: 32, 64: 32, 96: 40, 128: 48, 160: 64,
                   256: 80, 512: 128, 4096: 128}
    assert {t: grouped_block_m(8 * t, 128, t) for t in (16, 64, 256)} == {16: 8, 64: 8, 256: 24}   # Qwen3-30B-A3B
    for rows in range(1, 2000, 7):
        for e in (8, 60, 64):
            bm = grouped_block_m(rows, e)
            mean = rows / e
            sd = (mean * (1 - 1 / e)) ** 0.5
            assert bm % 8 == 0 and 8 <= bm <= MAX_BLOCK_M
            assert bm >= mean + 2 * sd or bm == MAX_BLOCK_M
            floor = min(4 * mean, FEW_EXPERTS_MIN_BLOCK_M) if e <= 16 else 0
            assert bm < max(mean + (3 if e <= 16 else 2) * sd, floor) + 8 or bm in (8, MAX_BLOCK_M)
            assert bm >= floor
            assert grouped_block_m(rows, e, tokens=rows) <= max(8, -(-rows // 8) * 8)


@pytest.mark.parametrize("dtype,inter,rows", [(jnp.bfloat16, 128, 80), (jnp.float32, 192, 24), (jnp.bfloat16, 64, 8)])
def test_swiglu_transposed_matches_jnp(dtype, inter, rows):
    """The Pallas-Triton SwiGLU + transpose (interpreter) against the jnp formula, bit for bit."""
    gu_t = (jax.random.normal(jax.random.key(rows), (2 * inter, rows), jnp.float32) * 3).astype(dtype)
    got = swiglu_transposed(gu_t, interpret=True)
    want = (jax.nn.silu(gu_t[:inter].astype(jnp.float32)) * gu_t[inter:].astype(jnp.float32)).astype(jnp.bfloat16).T
    assert got.shape == (rows, inter) and got.dtype == jnp.bfloat16
    assert bool(jnp.isfinite(got.astype(jnp.float32)).all())
    assert bool(jnp.array_equal(got, want))
    with pytest.raises(ValueError, match="multiple"):
        swiglu_transposed(gu_t[:, :rows - 3], interpret=True)


def test_word_layout_round_trips():
    experts = random_layer(rng_for(3), 8, 64, 96, 0.5)
    back = from_mosaic_words(to_mosaic_words(experts.packed))
    for n, w in experts.packed.items():
        assert bool(jnp.array_equal(back[n], w)), n


@pytest.mark.parametrize("t,ratio,drop,configs", [
    (1, 0.5, False, (None, None)),
    (9, 0.5, False, (MosaicConfig(block_m=24, num_stages=3), MosaicConfig(block_m=24, num_stages=3, block_k=64))),
    (7, 0.25, True, (None, None)),
    (9, 0.5, False, (MosaicConfig(block_m=8), None)),      # a token block other than grouped_block_m's
    (9, 0.5, False, (MosaicConfig(block_m=64), None)),     # SwiGLU epilogue, down reads h^T as it comes
    (9, 0.5, False, (MosaicConfig(block_m=16), None)),     # the same in 16-column tiles
    (9, 0.5, False, (MosaicConfig(block_m=32), None)),     # ... and 32
    (9, 0.25, True, (MosaicConfig(block_m=128), None)),    # SwiGLU in XLA on the transposed result
    (9, 0.5, False, (MosaicConfig(block_m=80), None)),     # SwiGLU and transpose in swiglu_transposed
    (9, 0.5, False, (MosaicConfig(block_m=8, token_major_out=True), None)),    # SwiGLU epilogue writes h [rows, I]
    (9, 0.25, True, (MosaicConfig(block_m=80, token_major_out=True), None)),   # gate and up [rows, 2I], SwiGLU in XLA
    (9, 0.5, False, (MosaicConfig(block_m=24, token_major_out=True),                  # down writes bf16 rows too
                     MosaicConfig(block_m=24, block_k=64, token_major_out=True))),
    (9, 0.5, False, (MosaicConfig(block_m=8, block_k=64, split_k=2), None)),   # gate+up split-K, swiglu_transposed on its f32 sum
    (5, 0.25, True, (None, MosaicConfig(block_m=8, block_k=64, split_k=3))),   # down split-K partials summed
])
def test_mosaic_layer_matches_dense_reference(t, ratio, drop, configs):
    """The grouped Mosaic layer (interpreter) on random routing, with dense and dropped experts."""
    experts, x, ids, tw, ref = layer_case(31 + t, t, ratio, drop)
    words = to_mosaic_words(experts.packed)
    fn = functools.partial(mosaic_moe_ffn, out_dtype=jnp.bfloat16, configs=configs, interpret=True)
    check(jax.jit(fn)(x, ids, tw, experts, words), ref, f"mosaic layer {configs}")


def test_mosaic_config_is_frozen():
    c = MosaicConfig(block_m=16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.block_m = 32


def test_mosaic_layer_default_split_k_down_matches_dense_reference():
    """At one token the default down launch splits K (``layer_configs``); interpreter vs reference."""
    e, h, i, k = 8, 128, 1024, 2
    experts, x, ids, tw, ref = layer_case(116, 1, 0.5, e=e, h=h, i=i, k=k)
    _, down = layer_configs(grouped_block_m(k, e, 1), k, e // 2, h, i)
    assert down.split_k > 1, down
    fn = functools.partial(mosaic_moe_ffn, out_dtype=jnp.bfloat16, interpret=True)
    check(jax.jit(fn)(x, ids, tw, experts, to_mosaic_words(experts.packed)), ref, "mosaic layer, split-K down")


@pytest.mark.parametrize("token_major_out", [False, True])
def test_tiles_with_an_extra_block_write_what_the_plain_tiles_write(token_major_out):
    """A grouped launch over ``absorb_spills``' tiles (one decode, a third accumulator for a side's second
    block) writes the same rows as over the plain tiles (a second tile per such pair), interpreter."""
    rng = rng_for(23)
    block_m, K, N = 16, 256, 128
    sizes = jnp.asarray([20, 7, 3, 40, 0, 17], jnp.int32)   # pairs of 2 / 1, 1 / 3 and 0 / 2 blocks
    _, tiles, padded = grouped_layout(sizes, 0, block_m, int(sizes.sum()))
    words = jnp.asarray(rng.integers(0, 2 ** 16, (3, N, K)), jnp.uint16)
    xs = jnp.asarray(rng.standard_normal((padded, K)), jnp.bfloat16)
    cfg = MosaicConfig(block_m=block_m, token_major_out=token_major_out)
    run = lambda t: mosaic_grouped_pair_gemm(xs, t, words, block_m=block_m, out_dtype=jnp.bfloat16,  # noqa: E731
                                             config=cfg, interpret=True)
    ext = absorb_spills(tiles, padded // block_m - 1)
    assert int((ext[:, 5] > 0).sum()) == 2 and int(ext[:, 3].sum()) == int(tiles[:, 3].sum()) - 2
    plain, absorbed = run(tiles), run(ext)
    if not token_major_out:
        plain, absorbed = plain.T, absorbed.T
    covered = np.zeros(padded, bool)
    for p, b_i, b_j, live in np.asarray(tiles):
        for b in (b_i, b_j):
            covered[b * block_m:(b + 1) * block_m] |= bool(live) and b != padded // block_m - 1
    got, want = np.asarray(absorbed, np.float32)[covered], np.asarray(plain, np.float32)[covered]
    assert np.isfinite(want).all() and np.array_equal(got, want)


def test_layer_with_tiles_that_absorb_spills_matches_dense_reference():
    """A layer whose token block (8 rows for 8 rows per expert on average) makes sides of two blocks:
    ``absorbs_spills`` holds for its launches, and the layer matches the reference (interpreter)."""
    e, h, i, k, t = 8, 256, 256, 2, 32
    experts, x, ids, tw, ref = layer_case(117, t, 0.5, e=e, h=h, i=i, k=k)
    gate_up = MosaicConfig(block_m=8, block_k=128, split_k=2)   # split K: SwiGLU between the launches
    _, down = layer_configs(8, t * k, e // 2, h, i)
    assert absorbs_spills(8, gate_up, down)
    blocks = -(-np.bincount(np.asarray(ids).ravel(), minlength=e) // 8)
    assert any(sorted(blocks[list(p)]) in ([0, 2], [1, 2]) for p in np.asarray(experts.pairs)), blocks   # a tile absorbs
    fn = functools.partial(mosaic_moe_ffn, out_dtype=jnp.bfloat16, configs=(gate_up, None), interpret=True)
    check(jax.jit(fn)(x, ids, tw, experts, to_mosaic_words(experts.packed)), ref, "mosaic layer, absorbed spills")


def test_absorbs_spills_only_where_shared_memory_allows():
    """Mixtral's 80-row block (128-deep plain stages) absorbs; 128-row blocks (64-deep plain stages: an
    extended stage would be larger) and the SwiGLU form do not; the config can turn it off."""
    for bm, want in ((80, True), (72, True), (128, False), (32, False)):
        gu, dn = layer_configs(bm, 512, 4, 4096, 14336)
        assert absorbs_spills(bm, gu, dn) == want, bm
    gu, dn = layer_configs(80, 512, 4, 4096, 14336)
    assert not absorbs_spills(80, dataclasses.replace(gu, absorb_spills=False), dn)


@pytest.mark.parametrize("swiglu", [True, False])
def test_stream_k_launch_writes_what_the_tile_launch_writes(swiglu):
    """``stream_k`` G CTAs sharing the live tiles' K steps, with the cut tiles finished by
    ``stream_k.finish_split_tiles``, write exactly the rows of the one-CTA-per-tile launch (interpreter):
    shares longer than a tile, shorter than one (a tile in three or more pieces), and a share per step."""
    rng = rng_for(25)
    block_m, K = 8, 256
    sizes = jnp.asarray([5, 7, 3, 12, 0, 0, 9, 1], jnp.int32)
    _, tiles, padded = grouped_layout(sizes, 0, block_m, int(sizes.sum()) + 4)
    n_live = jnp.sum(tiles[:, 3] > 0, dtype=jnp.int32).reshape(1)
    words = jnp.asarray(rng.integers(0, 2 ** 16, (4, 256 if swiglu else 128, K)), jnp.uint16)
    xs = jnp.asarray(rng.standard_normal((padded, K)), jnp.bfloat16)
    cfg = MosaicConfig(block_m=block_m, block_k=64, token_major_out=True)
    run = lambda c: np.asarray(mosaic_grouped_pair_gemm(  # noqa: E731
        xs, tiles, words, block_m=block_m, swiglu=swiglu, out_dtype=jnp.bfloat16, config=c, interpret=True,
        n_live=n_live), np.float32)
    spare = padded // block_m - 1
    covered = np.zeros(padded, bool)
    for p, b_i, b_j, live in np.asarray(tiles):
        for b in (b_i, b_j):
            covered[b * block_m:(b + 1) * block_m] |= bool(live) and b != spare
    want = run(cfg)[covered]
    assert want.size and np.isfinite(want).all()
    total = int(n_live[0]) * 2 * (K // 64)   # 2 column blocks of 64, 4 K steps each
    for ctas in (3, 13, total):
        starts = [int(stream_k.share_start(g, total, ctas)) for g in range(ctas)]
        assert any(s % 4 for s in starts), ctas   # some tile is cut
        got = run(dataclasses.replace(cfg, stream_k=ctas))[covered]
        assert np.array_equal(got, want), ctas


def test_stream_k_shares_cover_the_steps_once_and_evenly():
    for total, ctas in ((40, 3), (7, 13), (264 * 16 + 5, 264), (0, 4)):
        starts = [int(stream_k.share_start(g, total, ctas)) for g in range(ctas + 1)]
        lengths = np.diff(starts)
        assert starts[0] == 0 and starts[-1] == total and (lengths >= 0).all() and np.ptp(lengths) <= 1


def test_stream_k_layer_matches_dense_reference():
    """A layer with both launches stream-K (interpreter) matches the reference."""
    experts, x, ids, tw, ref = layer_case(118, 9, 0.5, False)
    configs = (MosaicConfig(block_m=8, token_major_out=True, stream_k=5),
               MosaicConfig(block_m=8, block_k=64, token_major_out=True, stream_k=7))
    fn = functools.partial(mosaic_moe_ffn, out_dtype=jnp.bfloat16, configs=configs, interpret=True)
    check(jax.jit(fn)(x, ids, tw, experts, to_mosaic_words(experts.packed)), ref, "mosaic layer, stream-K")


def test_stream_k_launches_build_for_hopper():
    """The stream-K launch (Mosaic) and its finishing pass (Pallas-Triton) lower for an abstract H100."""
    sds = jax.ShapeDtypeStruct
    for swiglu, bm, n in ((True, 8, 256), (False, 24, 128)):
        cfg = MosaicConfig(block_m=bm, decode="prmt", a_in_smem=False, token_major_out=True, stream_k=264)
        text = lower_for_h100(
            lambda x, t, w, live: mosaic_grouped_pair_gemm(x, t, w, block_m=bm, swiglu=swiglu, out_dtype=jnp.bfloat16,
                                                           config=cfg, n_live=live),
            sds((bm * 12, 256), jnp.bfloat16), sds((5, 4), jnp.int32), sds((2, n, 256), jnp.uint16),
            sds((1,), jnp.int32))
        assert "prmt.b32" in text and "stream_k_fixup" in text


def test_stream_k_settings_are_checked():
    with pytest.raises(ValueError, match="stream_k=4 must be >= 0, and > 0 only with split_k=1"):
        MosaicConfig(block_m=8, stream_k=4, split_k=2)
    with pytest.raises(ValueError, match="stream_k=-1"):
        MosaicConfig(block_m=8, stream_k=-1)
    grouped = functools.partial(mosaic_grouped_pair_gemm, jnp.zeros((16, 256), jnp.bfloat16),
                                jnp.zeros((2, 4), jnp.int32), jnp.zeros((1, 128, 256), jnp.uint16), block_m=8,
                                out_dtype=jnp.bfloat16, interpret=True)
    with pytest.raises(ValueError, match="stream_k takes token_major_out=True, a 4-column tile table and n_live"):
        grouped(config=MosaicConfig(block_m=8, stream_k=4))
    with pytest.raises(ValueError, match="stream_k takes token_major_out=True, a 4-column tile table and n_live"):
        grouped(config=MosaicConfig(block_m=8, stream_k=4, token_major_out=True))
    with pytest.raises(ValueError, match="pair kernel writes O"):
        mosaic_pair_gemm(jnp.zeros((4, 256), jnp.bfloat16), jnp.zeros((4, 256), jnp.bfloat16),
                         jnp.zeros((64, 256), jnp.uint16), config=MosaicConfig(block_m=8, stream_k=4), interpret=True)
