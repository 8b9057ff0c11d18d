"""Bit-packing codec: one merged magnitude plus two experts' masks and signs in one 16-bit word.

Bit layout, version 1 (``LAYOUT_VERSION``)::

    bit  15      14      13      12      11 ... 7           6 ... 0
         sign_i  sign_j  mask_i  mask_j  exponent - 112     mantissa (bf16's 7 bits)

A bf16 magnitude has sign 0, an 8-bit exponent and a 7-bit mantissa.  Storing the exponent
minus 112 in 5 bits keeps exponents 112..143, i.e. magnitudes from 2**-15 to just under 2**17,
and frees three exponent bits; with the sign bit that makes the four flag bits above.

Decoding a word ``w`` (uint16) into expert i's bf16 bits is three integer ops::

    w_i = (w & 0x2000) ? (w & 0x8FFF) + 0x3800 : 0              # 0x3800 == 112 << 7
    w_j = (w & 0x1000) ? (((w << 1) & 0x8000) | (w & 0x0FFF)) + 0x3800 : 0

(the add never carries into bit 15, because field + 0x3800 <= 0x47FF).

Out-of-range magnitudes (counted by ``encode(..., return_stats=True)``):
  * below 2**-15 (exponent < 112): rounded to the nearer of 0 and 2**-15.  Magnitudes
    >= 2**-16 become 2**-15 (exponent 112, mantissa 0); smaller ones become 0, which the format
    expresses by clearing both masks (the element is pruned).  The paper rounds every small
    exponent up to 112; rounding to nearest keeps the error below 2**-16 instead of 2**-15.
  * at or above 2**17 (exponent > 143): saturate to the largest word value 0x47FF
    (= 130560.0); ``strict=True`` raises instead.
  * NaN, Inf or negative magnitudes: ``ValueError``.

Words are canonical: a sign bit whose mask bit is clear is stored as 0, and a word with both
masks clear stores field 0, so ``encode`` of a decoded word gives the word back.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

LAYOUT_VERSION = 1
SIGN_I_BIT, SIGN_J_BIT, MASK_I_BIT, MASK_J_BIT = 15, 14, 13, 12
FIELD_MASK = 0x0FFF          # exponent-112 (bits 7..11) and mantissa (bits 0..6)
EXP_MIN, EXP_MAX = 112, 143  # bf16 exponents that the 5-bit field holds
OFFSET = EXP_MIN << 7        # 0x3800: added to the field gives the bf16 bits of the magnitude
MIN_BITS = OFFSET            # 2**-15, smallest non-zero magnitude
MAX_BITS = (EXP_MAX << 7) | 0x7F  # 0x47FF == 130560.0, largest magnitude
HALF_MIN_BITS = (EXP_MIN - 1) << 7  # 2**-16: below it a magnitude rounds to zero

LAYOUT = {
    "version": LAYOUT_VERSION,
    "sign_i_bit": SIGN_I_BIT, "sign_j_bit": SIGN_J_BIT,
    "mask_i_bit": MASK_I_BIT, "mask_j_bit": MASK_J_BIT,
    "exponent_bits": [7, 11], "mantissa_bits": [0, 6], "exponent_offset": EXP_MIN,
}


@dataclasses.dataclass(frozen=True)
class CodecStats:
    """How many kept elements fell outside the representable magnitude range."""
    rounded_to_zero: int   # kept magnitude < 2**-16: both masks cleared
    rounded_to_min: int    # kept magnitude in [2**-16, 2**-15): stored as 2**-15
    saturated: int         # kept magnitude >= 2**17 (after bf16 rounding): stored as 130560
    nonfinite: int         # NaN or Inf magnitudes (encode raises if > 0)
    negative: int          # magnitudes below zero (encode raises if > 0)


def decode_words(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint16 words -> (expert i bf16 bits, expert j bf16 bits) as uint16; usable inside kernels."""
    w = w.astype(jnp.uint16)
    zero = jnp.uint16(0)
    bits_i = jnp.where((w & (1 << MASK_I_BIT)) != 0, (w & (0x8000 | FIELD_MASK)) + OFFSET, zero)
    sign_j_moved = (w << 1) & 0x8000
    bits_j = jnp.where((w & (1 << MASK_J_BIT)) != 0, (sign_j_moved | (w & FIELD_MASK)) + OFFSET, zero)
    return bits_i.astype(jnp.uint16), bits_j.astype(jnp.uint16)


def decode(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Packed uint16 words (any shape) -> (W_i, W_j) in bf16; plain jnp, so kernels decode with it too."""
    bits_i, bits_j = decode_words(packed)
    to_bf16 = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.bfloat16)
    return to_bf16(bits_i), to_bf16(bits_j)


def encode_words(magnitude, mask_i, mask_j, sign_i, sign_j):
    """Traceable encoder core: uint16 words and the per-element out-of-range flags.

    Returns ``(words, flags)`` where flags maps each ``CodecStats`` field to a boolean array
    (only elements kept by some expert count).  Callers reduce the flags over the axes they want.
    """
    magnitude = jnp.asarray(magnitude)
    shape = jnp.broadcast_shapes(magnitude.shape, jnp.shape(mask_i), jnp.shape(mask_j),
                                 jnp.shape(sign_i), jnp.shape(sign_j))
    mag = jnp.broadcast_to(magnitude, shape)
    mask_i, mask_j, sign_i, sign_j = (jnp.broadcast_to(jnp.asarray(x).astype(bool), shape)
                                      for x in (mask_i, mask_j, sign_i, sign_j))
    kept = mask_i | mask_j
    nonfinite = ~jnp.isfinite(mag)
    negative = mag < 0
    bits = jax.lax.bitcast_convert_type(mag.astype(jnp.bfloat16), jnp.uint16) & 0x7FFF
    to_zero = bits < HALF_MIN_BITS
    to_min = ~to_zero & (bits < MIN_BITS)
    saturate = bits > MAX_BITS
    bits = jnp.clip(bits, MIN_BITS, MAX_BITS)
    mask_i = mask_i & ~to_zero
    mask_j = mask_j & ~to_zero
    field = jnp.where(mask_i | mask_j, bits - OFFSET, 0).astype(jnp.uint16)
    flag = lambda b, bit: b.astype(jnp.uint16) << bit
    words = (field | flag(mask_i, MASK_I_BIT) | flag(mask_j, MASK_J_BIT)
             | flag(sign_i & mask_i, SIGN_I_BIT) | flag(sign_j & mask_j, SIGN_J_BIT))
    flags = dict(rounded_to_zero=to_zero & ~negative & kept, rounded_to_min=to_min & kept,
                 saturated=saturate & ~nonfinite & kept, nonfinite=nonfinite, negative=negative)
    return words, flags


@jax.jit
def _encode_with_counts(magnitude, mask_i, mask_j, sign_i, sign_j):
    words, flags = encode_words(magnitude, mask_i, mask_j, sign_i, sign_j)
    return words, {k: jnp.sum(v, dtype=jnp.int32) for k, v in flags.items()}


def check_stats(stats: CodecStats, *, strict: bool = False, what: str = "magnitude") -> None:
    """Raise ValueError for NaN/Inf/negative magnitudes (always) or saturation (strict)."""
    if stats.nonfinite:
        raise ValueError(f"{what}: {stats.nonfinite} NaN/Inf values; weights must be finite")
    if stats.negative:
        raise ValueError(f"{what}: {stats.negative} negative values; magnitudes must be >= 0")
    if strict and stats.saturated:
        raise ValueError(f"{what}: {stats.saturated} magnitudes >= 2**17 do not fit the 5-bit "
                         "exponent (strict mode)")


def encode(magnitude, mask_i, mask_j, sign_i, sign_j, *, strict: bool = False,
           return_stats: bool = False):
    """Pack a merged magnitude (any float dtype, rounded to bf16) with two masks and two signs.

    ``sign_*`` are booleans, True meaning negative.  Returns uint16 words of the broadcast shape
    (and a ``CodecStats`` if ``return_stats``).  Raises ValueError on NaN/Inf/negative input, and
    on magnitudes >= 2**17 when ``strict``.
    """
    word, counts = _encode_with_counts(magnitude, mask_i, mask_j, sign_i, sign_j)
    stats = CodecStats(**{k: int(v) for k, v in counts.items()})
    check_stats(stats, strict=strict)
    return (word, stats) if return_stats else word

