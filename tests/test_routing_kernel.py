"""The one-launch routing layout (kernels/routing_kernel.py, Pallas-Triton interpreter on the CPU)
against the XLA layout it replaces (``mosaic_ffn.xla_pair_layout``, exact), its size gate, its
lowering for the GPU, and the Mosaic layer on it against the dense reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import routing, routing_kernel
from kernels.mosaic_ffn import grouped_block_m, mosaic_moe_ffn, to_mosaic_words, xla_pair_layout
from tests.kernel_cases import SDS, check, layer_case, lower_for_h100, rng_for


def _routing(rng, t, e, k, hot):
    """[t, k] distinct ids per token; ``hot`` > 0 sends the first tokens to the first ``k + hot``
    experts only (uneven sizes, many experts with no rows)."""
    ids = np.argsort(-rng.standard_normal((t, e)), 1)[:, :k]
    if hot:
        n = max(1, t // 2)
        ids[:n] = np.argsort(-rng.standard_normal((n, k + hot)), 1)[:, :k]
    return ids


@pytest.mark.parametrize("e,k,t,unheld,hot,block_m,chunk", [
    (8, 2, 1, 0, 0, None, None),           # one token (Mixtral decode)
    (8, 2, 16, 0, 1, None, None),          # uneven, some experts without rows
    (8, 2, 9, 2, 0, 8, None),              # ids no pair holds (dropped / another device's)
    (8, 2, 9, 2, 0, 8, 4),                 # several chunks, the last one partly past the rows
    (16, 4, 7, 4, 2, 16, 8),
    (64, 6, 5, 0, 0, None, None),          # fine-grained: most pairs without rows
    (128, 8, 3, 10, 3, None, None),
    (24, 3, 37, 6, 0, 64, 32),             # pairs not a power of two, large token block
    (128, 8, 64, 0, 4, None, None),        # Qwen3 T = 64: two launches
    (64, 6, 256, 4, 2, None, None),        # DeepSeek-V2-Lite T = 256
    (256, 8, 512, 6, 3, None, None),       # DeepSeek-V3 shape at the size bound (MAX_ROWS rows)
])
def test_pair_layout_equals_the_xla_layout(e, k, t, unheld, hot, block_m, chunk):
    bm = block_m or grouped_block_m(t * k, e, t)
    layout = jax.jit(functools.partial(routing_kernel.pair_layout, block_m=bm, chunk=chunk, interpret=True))
    for seed in range(3):   # one compile, three routings
        rng = rng_for(100 * e + 10 * t + seed)
        pairs = rng.permutation(e)[:e - unheld].reshape(-1, 2)
        ids = jnp.asarray(_routing(rng, t, e, k, hot), jnp.int32)
        got = layout(ids, jnp.asarray(pairs, jnp.int32))
        g = routing.group_packed(ids, jnp.asarray(pairs, jnp.int32), jnp.zeros((0,), jnp.int32))
        want = xla_pair_layout(g, bm)
        for name, a, b in zip(("tiles", "src", "row"), got, want):
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape and a.dtype == b.dtype == np.int32, (name, a.shape, b.shape)
            assert np.array_equal(a, b), (name, seed, np.argwhere(a != b)[:5])
        held = np.isin(np.asarray(ids).ravel(), pairs)
        row = np.asarray(got[2])
        assert ((row >= 0) == held).all() and np.unique(row[held]).size == held.sum()


@pytest.mark.parametrize("e,k,t,h,dtype", [
    (8, 2, 1, 1100, jnp.bfloat16),          # one launch, rows in three slices, the last one short
    (8, 2, 13, 200, jnp.float32),           # a row narrower than the copy piece; f32 rows
    (64, 6, 40, 1536, jnp.bfloat16),        # two launches (count, place), three slices
    (64, 6, 5, 512, jnp.bfloat16),          # one launch over 31 pairs, few of them with rows
    (8, 2, 128, 256, jnp.bfloat16),         # 48-row blocks: the tails zeroed, several chunks per pair
])
def test_pair_layout_and_rows_gathers_each_routed_token_row(e, k, t, h, dtype):
    """``pair_layout_and_rows``: the same layout as ``pair_layout``, every padded row that holds a token
    holds that token's row, in bf16, and every other row of a block a live tile reads, and the spare
    block, is zero from ``ZERO_TAILS_FROM``-row blocks (the interpreter fills what nothing writes with
    NaN)."""
    rng = rng_for(900 + t)
    bm = grouped_block_m(t * k, e, t)
    pairs = jnp.asarray(rng.permutation(e)[:e - 2].reshape(-1, 2), jnp.int32)
    ids = jnp.asarray(_routing(rng, t, e, k, 1), jnp.int32)
    x = jnp.asarray(rng.standard_normal((t, h)), dtype)
    layout_and_rows = functools.partial(routing_kernel.pair_layout_and_rows, block_m=bm, interpret=True)
    *layout, xs = jax.jit(layout_and_rows)(ids, pairs, x)
    for a, b in zip(layout, routing_kernel.pair_layout(ids, pairs, block_m=bm, interpret=True)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    src = np.asarray(layout[1])
    assert xs.dtype == jnp.bfloat16 and xs.shape == (src.shape[0], h) and (src >= 0).any()
    held = src >= 0
    got = np.asarray(xs, np.float32)
    assert np.array_equal(got[held], np.asarray(x.astype(jnp.bfloat16), np.float32)[src[held]])
    read = np.zeros(src.shape[0], bool)
    for _, b_i, b_j, live in np.asarray(layout[0]):
        for b in (b_i, b_j):
            read[b * bm:(b + 1) * bm] |= bool(live)
    read[-bm:] = True   # the spare block (the side of a tile with no block of its own)
    assert (read & ~held).sum() >= bm
    zeroed = bm >= routing_kernel.ZERO_TAILS_FROM
    padding = got[read & ~held]
    assert (padding == 0).all() if zeroed else np.isnan(padding).all(), bm   # NaN: not written


def test_fits_gates_on_size_and_dense_experts():
    """The layer takes the launches at every size up to ``MAX_ROWS`` routed rows (every
    fine-grained shape to T = 256, DeepSeek-V3 to T = 512); kept-dense experts: the XLA layout."""
    fits = routing_kernel.fits
    assert fits(2, 4, 0, 8) and fits(512, 4, 0, 128)                 # Mixtral T = 1, 256
    assert fits(8, 64, 0, 8) and fits(2048, 64, 0, 48)               # Qwen3 T = 1, 256
    assert fits(384, 32, 0, 32) and fits(1536, 32, 0, 64)            # DeepSeek-V2-Lite T = 64, 256
    assert fits(8, 128, 0, 8) and fits(routing_kernel.MAX_ROWS, 128, 0, 64)   # DeepSeek-V3 T = 1, 512
    assert not fits(2, 4, 1, 8)                                      # kept-dense experts: the XLA layout
    assert not fits(2, 0, 0, 8) and not fits(routing_kernel.MAX_ROWS + 1, 1, 0, 128)
    with pytest.raises(ValueError, match="pair_layout takes"):
        routing_kernel.pair_layout(jnp.zeros((routing_kernel.MAX_ROWS // 8 + 1, 8), jnp.int32),
                                   jnp.zeros((4, 2), jnp.int32), block_m=8)
    with pytest.raises(ValueError, match="power of two"):
        routing_kernel.pair_layout(jnp.zeros((4, 8), jnp.int32), jnp.zeros((4, 2), jnp.int32), block_m=8, chunk=24)


def test_layout_sizes_shrink_with_the_rows():
    """Tables sized by the slots that can have rows: a one-token step of 64 pairs (8 rows) gets 9
    tiles and 10 blocks of padded rows, not 65 and 130; large steps keep the 2P bound."""
    assert routing_kernel.layout_sizes(8, 64, 8) == (1 + 8, (1 + 8 + 1) * 8)
    assert routing_kernel.layout_sizes(2048, 64, 48) == (43 + 64, (43 + 128 + 1) * 48)


def test_default_chunk_is_one_launch_for_small_steps():
    """One chunk (one launch) while the rows fit ``CHUNK``, else chunks of ``CHUNK`` rows."""
    chunk = routing_kernel.default_chunk
    assert chunk(8) == 8 and chunk(32) == 32 and chunk(33) == chunk(2048) == routing_kernel.CHUNK == 32


@pytest.mark.parametrize("t,k,p,block_m", [(1, 2, 4, 8), (64, 8, 64, 16), (256, 8, 64, 48), (512, 8, 128, 48),
                                           (2, 8, 1, 8)])
def test_pair_layout_lowers_for_the_gpu(t, k, p, block_m):
    """Model-sized layouts lower to Triton IR (the interpreter accepts far more than the GPU): one
    launch for one chunk, two above."""
    text = lower_for_h100(functools.partial(routing_kernel.pair_layout, block_m=block_m),
                          SDS((t, k), jnp.int32), SDS((p, 2), jnp.int32))
    one = t * k <= routing_kernel.default_chunk(t * k)
    assert text.count("__gpu$xla.gpu.triton") == (1 if one else 2)
    text = lower_for_h100(functools.partial(routing_kernel.pair_layout_and_rows, block_m=block_m),   # and the rows
                          SDS((t, k), jnp.int32), SDS((p, 2), jnp.int32), SDS((t, 4096), jnp.bfloat16))
    assert text.count("__gpu$xla.gpu.triton") == (1 if one else 2)


@pytest.mark.parametrize("t,ratio,drop,e,k,launches", [
    (1, 0.5, False, 8, 2, 1),
    (6, 0.5, False, 8, 2, 1),
    (13, 0.5, False, 8, 2, 1),
    (40, 0.5, False, 32, 4, 2),      # fine-grained, 160 rows: the count and place launches
    (6, 0.25, True, 8, 2, 0),        # kept-dense experts: the XLA layout
])
def test_mosaic_layer_on_the_routing_kernel_matches_dense_reference(t, ratio, drop, e, k, launches):
    experts, x, ids, tw, ref = layer_case(700 + t, t, ratio, drop, e=e, k=k)
    fn = functools.partial(mosaic_moe_ffn, out_dtype=jnp.bfloat16, interpret=True)
    args = (x, ids, tw, experts, to_mosaic_words(experts.packed))
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    assert sum(jaxpr.count(f"name={n}") for n in ("routing_layout", "routing_count", "routing_place")) == launches
    got = jax.jit(fn)(*args)
    check(got, ref, f"mosaic layer, {launches} routing launches")
    with pytest.raises(AssertionError, match="non-finite"):   # the check fails on NaN
        check(got.at[0, 0].set(jnp.nan), ref, "nan")
