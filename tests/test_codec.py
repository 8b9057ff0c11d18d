import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from puzzlemoe_jax import codec
from tests import reference

ALL_WORDS = np.arange(1 << 16, dtype=np.uint16)


def f32(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


def test_every_word_decodes_like_the_numpy_reference():
    hat_i, hat_j = codec.decode(jnp.asarray(ALL_WORDS))
    assert hat_i.dtype == jnp.bfloat16 and hat_j.dtype == jnp.bfloat16
    ref_i, ref_j = reference.decode_word(ALL_WORDS)
    np.testing.assert_array_equal(f32(hat_i), ref_i)
    np.testing.assert_array_equal(f32(hat_j), ref_j)


def test_decode_matches_the_documented_integer_formula():
    w = ALL_WORDS.astype(np.uint32)
    bits_i = np.where(w & 0x2000, (w & 0x8FFF) + 0x3800, 0)
    bits_j = np.where(w & 0x1000, (((w << 1) & 0x8000) | (w & 0x0FFF)) + 0x3800, 0)
    got_i, got_j = codec.decode_words(jnp.asarray(ALL_WORDS))
    np.testing.assert_array_equal(np.asarray(got_i), bits_i)
    np.testing.assert_array_equal(np.asarray(got_j), bits_j)


def canonical(w: np.ndarray) -> np.ndarray:
    """The documented canonical form: sign bits only under set masks; field 0 if no mask."""
    w = w.astype(np.uint32)
    mi, mj = (w >> 13) & 1, (w >> 12) & 1
    field = np.where(mi | mj, w & 0x0FFF, 0)
    return (field | (mi << 13) | (mj << 12) | ((w >> 15) & mi) << 15 | ((w >> 14) & mj) << 14).astype(np.uint16)


def test_encode_of_every_decoded_word_gives_the_canonical_word():
    ref_i, ref_j = reference.decode_word(ALL_WORDS)
    magnitude = np.maximum(np.abs(ref_i), np.abs(ref_j))
    words, stats = codec.encode(magnitude, ref_i != 0, ref_j != 0, ref_i < 0, ref_j < 0,
                                return_stats=True)
    assert words.dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(words), canonical(ALL_WORDS))
    assert stats == codec.CodecStats(0, 0, 0, 0, 0)


representable_bits = st.integers(codec.MIN_BITS, codec.MAX_BITS)


@settings(max_examples=200, deadline=None)
@given(bits=hnp.arrays(np.uint16, hnp.array_shapes(max_dims=3, max_side=6), elements=representable_bits),
       data=st.data())
def test_decode_after_encode_is_identity_on_representable_inputs(bits, data):
    shape = bits.shape
    flags = [data.draw(hnp.arrays(np.bool_, shape)) for _ in range(4)]
    mask_i, mask_j, sign_i, sign_j = flags
    magnitude = bits.view(ml_dtypes.bfloat16)
    hat_i, hat_j = codec.decode(codec.encode(magnitude, mask_i, mask_j, sign_i, sign_j))
    m = magnitude.astype(np.float32)
    np.testing.assert_array_equal(f32(hat_i), np.where(mask_i, np.where(sign_i, -m, m), 0))
    np.testing.assert_array_equal(f32(hat_j), np.where(mask_j, np.where(sign_j, -m, m), 0))


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 64),
                  elements=st.floats(0, 2e5, width=32, allow_nan=False, allow_infinity=False)))
def test_float32_magnitudes_round_like_the_reference(mag):
    ones = np.ones(mag.shape, bool)
    words, stats = codec.encode(mag, ones, ones, ~ones, ones, return_stats=True)
    hat_i, hat_j = codec.decode(words)
    expected = reference.representable(mag)
    np.testing.assert_array_equal(f32(hat_i), expected)
    np.testing.assert_array_equal(f32(hat_j), -expected)
    m = mag.astype(ml_dtypes.bfloat16).astype(np.float64)
    assert stats.rounded_to_zero == int(np.sum(m < 2.0 ** -16))
    assert stats.rounded_to_min == int(np.sum((m >= 2.0 ** -16) & (m < 2.0 ** -15)))
    assert stats.saturated == int(np.sum(m >= 2.0 ** 17))


def test_out_of_range_magnitudes_behave_as_documented():
    mag = np.array([0.0, 2.0 ** -17, 2.0 ** -16, 1.5 * 2.0 ** -16, 2.0 ** -15, 2.0 ** 17, 1e30], np.float32)
    keep = np.ones(mag.shape, bool)
    words, stats = codec.encode(mag, keep, keep, keep, ~keep, return_stats=True)
    hat_i, hat_j = codec.decode(words)
    expected = [0, 0, 2.0 ** -15, 2.0 ** -15, 2.0 ** -15, 130560.0, 130560.0]
    np.testing.assert_array_equal(f32(hat_j), expected)
    np.testing.assert_array_equal(f32(hat_i), -np.asarray(expected, np.float32))
    assert np.asarray(words)[0] == 0 and np.asarray(words)[1] == 0  # pruned: masks cleared
    assert stats == codec.CodecStats(rounded_to_zero=2, rounded_to_min=2, saturated=2,
                                     nonfinite=0, negative=0)
    with pytest.raises(ValueError, match="strict"):
        codec.encode(mag, keep, keep, keep, keep, strict=True)
    # an element no expert keeps is not counted
    _, stats = codec.encode(mag, ~keep, ~keep, keep, keep, return_stats=True)
    assert stats == codec.CodecStats(0, 0, 0, 0, 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_magnitudes_are_rejected(bad):
    mag = np.array([0.5, bad, 1.0], np.float32)
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        codec.encode(mag, True, True, False, False)


def test_negative_magnitudes_are_rejected():
    with pytest.raises(ValueError, match="negative"):
        codec.encode(np.array([0.5, -0.25], np.float32), True, False, False, False)


def test_encode_broadcasts_and_keeps_any_shape():
    mag = np.full((2, 3, 4), 0.75, np.float32)
    words = codec.encode(mag, np.array([True, False, True, True]), True, False, True)
    assert words.shape == (2, 3, 4)
    hat_i, hat_j = codec.decode(words)
    np.testing.assert_array_equal(f32(hat_i)[0, 0], [0.75, 0, 0.75, 0.75])
    np.testing.assert_array_equal(f32(hat_j), np.full((2, 3, 4), -0.75, np.float32))
    assert codec.decode(codec.encode(np.float32(2.0), True, True, True, False))[0].shape == ()
