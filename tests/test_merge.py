import dataclasses
import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from puzzlemoe_jax import codec, compress, merge, moe, pairing
from tests import reference


def correlated_experts(rng, e, k, n, spread=0.5, dtype=ml_dtypes.bfloat16):
    """Experts = shared base + per-expert deviation, like upcycled or co-trained experts."""
    base = rng.normal(0, 0.02, (k, n))
    return (base[None] + rng.normal(0, 0.02 * spread, (e, k, n))).astype(dtype)


def f32(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


@pytest.mark.parametrize("threshold", [0.0, 0.25, merge.DEFAULT_SIMILARITY, 1.0])
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32])
def test_merged_experts_equal_the_numpy_reference(threshold, dtype):
    rng = np.random.default_rng(1)
    w = correlated_experts(rng, 2, 48, 40, dtype=dtype)
    w[0, 0, :4] = [0, 1e-6, -3e-5, 0]          # underflow cases, exact zero
    cfg = merge.MergeConfig(similarity_threshold=threshold)
    words, stats = merge.merge_pairs(w[0], w[1], cfg)
    hat_i, hat_j = codec.decode(words)
    ref_i, ref_j, masks = reference.merge(w[0], w[1], threshold)
    np.testing.assert_array_equal(f32(hat_i), ref_i)
    np.testing.assert_array_equal(f32(hat_j), ref_j)
    assert stats["frac_similar"] == pytest.approx(masks["similar"].mean())
    assert stats["frac_salient_i"] == pytest.approx((~masks["similar"] & masks["i_wins"]).mean())
    assert stats["frac_kept_j"] == pytest.approx(masks["keep_j"].mean())
    w0 = np.asarray(w[0], np.float64)
    expected_err = np.linalg.norm(ref_i - w0) / np.linalg.norm(w0)
    assert stats["rel_err_i"] == pytest.approx(expected_err, rel=1e-4)


def test_activation_saliency_matches_reference_and_changes_winners():
    rng = np.random.default_rng(2)
    w = correlated_experts(rng, 2, 32, 24, spread=2.0, dtype=np.float32)
    imp_i, imp_j = rng.uniform(0.1, 10, 32).astype(np.float32), rng.uniform(0.1, 10, 32).astype(np.float32)
    cfg = merge.MergeConfig(saliency="activation")
    words, stats = merge.merge_pairs(w[0], w[1], cfg, imp_i, imp_j)
    ref_i, ref_j, masks = reference.merge(w[0], w[1], cfg.similarity_threshold, imp_i[:, None], imp_j[:, None])
    hat_i, hat_j = codec.decode(words)
    np.testing.assert_array_equal(f32(hat_i), ref_i)
    np.testing.assert_array_equal(f32(hat_j), ref_j)
    _, plain = merge.merge_pairs(w[0], w[1])
    assert stats["frac_salient_i"] != plain["frac_salient_i"]
    with pytest.raises(ValueError, match="second moments"):
        merge.merge_pairs(w[0], w[1], cfg)


def test_identical_experts_merge_losslessly_and_disjoint_support_keeps_both():
    rng = np.random.default_rng(3)
    w = correlated_experts(rng, 1, 16, 16)[0]
    words, stats = merge.merge_pairs(w, w)
    assert stats["frac_similar"] == 1.0 and stats["rel_err_i"] == 0.0 and stats["rel_err_j"] == 0.0
    a = np.where(np.arange(16)[:, None] % 2 == 0, w, 0).astype(ml_dtypes.bfloat16)
    b = np.where(np.arange(16)[:, None] % 2 == 1, w, 0).astype(ml_dtypes.bfloat16)
    _, stats = merge.merge_pairs(a, b)
    assert stats["rel_err_i"] == 0.0 and stats["rel_err_j"] == 0.0


def test_default_threshold_is_where_sharing_stops_beating_one_winner():
    a = np.float32(1.0)
    for b in (0.4, 0.42, 0.43, 0.6):   # boundary at b = 1 / (1 + sqrt 2) = 0.4142
        share_err = 2 * ((a - b) / 2) ** 2
        winner_err = min(a, b) ** 2
        _, stats = merge.merge_pairs(np.full((1, 1), a), np.full((1, 1), b, np.float32))
        assert bool(stats["frac_similar"][()] == 1.0) == (share_err <= winner_err)


def test_leading_axes_merge_like_one_call_per_matrix():
    rng = np.random.default_rng(4)
    w_i = correlated_experts(rng, 6, 24, 20).reshape(2, 3, 24, 20)   # [layers, pairs, K, N]
    w_j = correlated_experts(rng, 6, 24, 20).reshape(2, 3, 24, 20)
    words, stats = merge.merge_pairs(w_i, w_j)
    assert words.shape == (2, 3, 24, 20) and stats["rel_err_i"].shape == (2, 3)
    for l, p in itertools.product(range(2), range(3)):
        one, one_stats = merge.merge_pairs(w_i[l, p], w_j[l, p])
        np.testing.assert_array_equal(np.asarray(words[l, p]), np.asarray(one))
        assert one_stats["rel_err_j"] == pytest.approx(stats["rel_err_j"][l, p])


def test_nan_weights_are_rejected_with_the_matrix_name():
    w = np.ones((2, 4, 4), np.float32)
    w[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="w_up: 1 NaN/Inf"):
        merge.merge_pairs(w[0], w[1], name="w_up")
    with pytest.raises(ValueError, match="w_gate: 1 NaN/Inf"):
        compress.compress_layer({"w_gate": w, "w_up": np.ones_like(w)}, 0.5)


def test_saturation_is_reported_and_rejected_in_strict_mode():
    w = np.full((2, 2, 2), 3e5, np.float32)
    _, stats = merge.merge_pairs(w[0], w[1])
    assert stats["saturated"] == 4
    with pytest.raises(ValueError, match="strict"):
        merge.merge_pairs(w[0], w[1], merge.MergeConfig(strict=True))


def brute_force_best(cost):
    e = cost.shape[0]

    def matchings(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for k, other in enumerate(rest):
            for m in matchings(rest[:k] + rest[k + 1:]):
                yield [(first, other)] + m
    return min(sum(cost[p] for p in m) for m in matchings(list(range(e))))


def test_matching_is_perfect_and_near_optimal_on_random_costs():
    rng = np.random.default_rng(5)
    gaps = []
    for _ in range(20):
        c = rng.random((8, 8))
        c = c + c.T
        np.fill_diagonal(c, np.inf)
        pairs = pairing.min_cost_matching(c)
        assert sorted(x for p in pairs for x in p) == list(range(8))
        gaps.append(sum(c[p] for p in pairs) / brute_force_best(c))
    assert min(gaps) >= 1.0 - 1e-12
    assert np.mean(gaps) < 1.05


def test_pairing_finds_planted_twins():
    rng = np.random.default_rng(6)
    e, k, n = 8, 32, 32
    partner = rng.permutation(e)
    bases = rng.normal(0, 0.02, (e // 2, k, n))
    w = np.empty((e, k, n), np.float32)
    for t in range(e // 2):
        for x in partner[2 * t: 2 * t + 2]:
            w[x] = bases[t] + rng.normal(0, 0.002, (k, n))
    pairs = pairing.choose_pairs({"w_gate": w}, 4)
    expected = sorted(tuple(sorted(partner[2 * t: 2 * t + 2])) for t in range(4))
    assert [tuple(p) for p in pairs] == expected


@pytest.mark.parametrize("ratio, n_pairs", [(0.0, 0), (0.25, 2), (0.5, 4), (0.2, 2), (0.1, 1)])
def test_compress_layer_ratio_bytes_and_unpack(ratio, n_pairs):
    rng = np.random.default_rng(7)
    e, h, i = 8, 24, 40
    weights = {"w_gate": correlated_experts(rng, e, h, i), "w_up": correlated_experts(rng, e, h, i),
               "w_down": correlated_experts(rng, e, i, h)}
    packed, stats = compress.compress_layer(weights, ratio)
    assert packed.pairs.shape == (n_pairs, 2) and stats["pairs"].shape == (n_pairs, 2)
    used = np.concatenate([np.asarray(packed.pairs).ravel(), np.asarray(packed.dense_ids)])
    assert sorted(used.tolist()) == list(range(e))
    original_bytes = sum(w.nbytes for w in weights.values())
    assert packed.nbytes() == original_bytes * (e - n_pairs) // e
    full = packed.unpack()
    for name, w in weights.items():
        assert full[name].shape == w.shape
        for d in np.asarray(packed.dense_ids):
            np.testing.assert_array_equal(f32(full[name][d]), w[d].astype(np.float32))
        for p, (a, b) in enumerate(np.asarray(packed.pairs)):
            ref_i, ref_j, _ = reference.merge(w[a], w[b], merge.DEFAULT_SIMILARITY)
            np.testing.assert_array_equal(f32(full[name][a]), ref_i)
            np.testing.assert_array_equal(f32(full[name][b]), ref_j)
            assert packed.packed[name].dtype == jnp.uint16
    if n_pairs:
        assert 0 < stats["w_down"]["rel_err_i"].max() < 0.5


@pytest.mark.parametrize("ratio", [-0.1, 0.51, 1.0])
def test_bad_ratio_is_rejected(ratio):
    with pytest.raises(ValueError, match="ratio"):
        pairing.pairs_for_ratio(8, ratio)


def test_bad_config_and_shapes_are_rejected():
    with pytest.raises(ValueError, match="similarity_threshold"):
        merge.MergeConfig(similarity_threshold=1.5)
    with pytest.raises(ValueError, match="saliency"):
        merge.MergeConfig(saliency="random")
    with pytest.raises(ValueError, match="one shape"):
        merge.merge_pairs(np.ones((4, 4)), np.ones((4, 5)))
    with pytest.raises(ValueError, match="one expert count"):
        compress.compress_layer({"w_gate": np.ones((8, 4, 4)), "w_up": np.ones((6, 4, 4))})


def layer(rng, e=8, h=24, i=40, spread=0.5):
    return {"w_gate": correlated_experts(rng, e, h, i, spread), "w_up": correlated_experts(rng, e, h, i, spread),
            "w_down": correlated_experts(rng, e, i, h, spread)}


@pytest.mark.parametrize("method", ["average", "frequency"])
def test_averaging_baselines_store_the_weighted_mean_for_both_experts(method):
    rng = np.random.default_rng(8)
    weights = layer(rng)
    freq = rng.integers(1, 100, 8)
    cfg = merge.MergeConfig(method=method, pairing="sequential")
    packed, _ = compress.compress_layer(weights, 0.5, cfg, frequencies=freq)
    full = packed.unpack()
    for a, b in np.asarray(packed.pairs):
        alpha = np.float32(0.5 if method == "average" else freq[a] / (freq[a] + freq[b]))
        for name, w in weights.items():
            mixed = alpha * w[a].astype(np.float32) + (np.float32(1) - alpha) * w[b].astype(np.float32)
            expected = np.sign(mixed) * reference.representable(np.abs(mixed))
            # XLA may fuse the weighted sum into an FMA: then a rare bf16 tie rounds one ulp off
            for got in (f32(full[name][a]), f32(full[name][b])):
                np.testing.assert_allclose(got, expected, rtol=2.0 ** -7, atol=0)  # one bf16 ulp
                assert np.mean(got != expected) < 0.01


def test_dropping_baseline_removes_the_least_routed_experts():
    rng = np.random.default_rng(9)
    weights = layer(rng)
    freq = np.array([50, 3, 40, 7, 90, 1, 60, 5])
    packed, stats = compress.compress_layer(weights, 0.5, merge.MergeConfig(method="drop"), frequencies=freq)
    np.testing.assert_array_equal(np.asarray(packed.dropped_ids), [1, 3, 5, 7])
    np.testing.assert_array_equal(np.asarray(packed.dense_ids), [0, 2, 4, 6])
    assert packed.nbytes() == sum(w.nbytes for w in weights.values()) // 2
    full = packed.unpack()
    assert not np.any(f32(full["w_up"][np.array([1, 3, 5, 7])]))
    np.testing.assert_array_equal(f32(full["w_up"][4]), weights["w_up"][4].astype(np.float32))
    with pytest.raises(ValueError, match="routing frequencies"):
        compress.compress_layer(weights, 0.5, merge.MergeConfig(method="drop"))


@pytest.mark.parametrize("method", ["puzzle", "average"])
def test_neuron_alignment_recovers_a_hidden_permutation_and_keeps_the_function(method):
    rng = np.random.default_rng(10)
    h, i = 16, 48
    base = {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in
            (("w_gate", (h, i)), ("w_up", (h, i)), ("w_down", (i, h)))}
    perm = rng.permutation(i)
    weights = {n: np.stack([w, (w[:, perm] if n != "w_down" else w[perm]) + rng.normal(0, 1e-4, w.shape)])
               for n, w in base.items()}
    cfg = merge.MergeConfig(method=method)
    plain, plain_stats = compress.compress_layer(weights, 0.5, cfg)
    aligned, stats = compress.compress_layer(weights, 0.5, dataclasses.replace(cfg, align_neurons=True))
    assert stats["w_gate"]["rel_err_j"][0] < 0.02 < plain_stats["w_gate"]["rel_err_j"][0]
    # expert j computes the same function: its output on random tokens matches the original
    x = jnp.asarray(rng.normal(0, 1, (5, h)), jnp.float32)
    ids, wts = jnp.ones((5, 1), jnp.int32), jnp.ones((5, 1), jnp.float32)
    y_orig = moe.dense_moe_ffn(x, ids, wts, {n: jnp.asarray(w) for n, w in weights.items()})
    y_aligned = moe.dense_moe_ffn(x, ids, wts, aligned.unpack(jnp.float32))
    assert float(jnp.linalg.norm(y_aligned - y_orig) / jnp.linalg.norm(y_orig)) < 0.02


@pytest.mark.parametrize("saliency", ["magnitude", "activation"])
def test_row_chunked_merge_gives_the_same_words_and_stats(saliency):
    rng = np.random.default_rng(11)
    weights = layer(rng, e=6, h=20, i=36)
    imp = {n: rng.uniform(0.5, 2, (6, w.shape[1])).astype(np.float32) for n, w in weights.items()}
    cfg = merge.MergeConfig(saliency=saliency)
    whole, whole_stats = compress.compress_layer({n: jnp.asarray(w) for n, w in weights.items()}, 0.5, cfg, imp)
    host, host_stats = compress.compress_layer(weights, 0.5, cfg, imp, chunk_elems=3 * 36 * 7)  # 7-row chunks
    # the device program's chunk loop: w_gate/w_up 20 rows = 2 chunks of 7 + 6, w_down 36 = 3 of 12
    looped, looped_stats = compress.compress_layer({n: jnp.asarray(w) for n, w in weights.items()}, 0.5, cfg, imp,
                                                   chunk_elems=3 * 36 * 7)
    assert isinstance(host.packed["w_up"], np.ndarray) and isinstance(whole.packed["w_up"], jax.Array)
    for n in weights:
        np.testing.assert_array_equal(host.packed[n], np.asarray(whole.packed[n]))
        np.testing.assert_array_equal(host.packed[n], np.asarray(looped.packed[n]))
        np.testing.assert_array_equal(np.asarray(host.dense[n]), np.asarray(looped.dense[n]))
        for key, value in whole_stats[n].items():
            np.testing.assert_allclose(host_stats[n][key], value, rtol=1e-5)
            np.testing.assert_allclose(host_stats[n][key], looped_stats[n][key], rtol=1e-5)
            assert np.isfinite(np.asarray(value, np.float64)).all()
