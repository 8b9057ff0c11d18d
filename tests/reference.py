"""Plain numpy references for the codec and the merge, written from the documented formulas
(float arithmetic, not the bit tricks the library uses), for exact comparison in tests."""
import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16


def decode_word(w: np.ndarray):
    """uint16 words -> (w_i, w_j) float32, from the bit-layout table in puzzlemoe_jax.codec."""
    w = np.asarray(w, np.int64)
    exponent = ((w >> 7) & 0x1F) + 112
    magnitude = np.ldexp(1.0 + (w & 0x7F) / 128.0, exponent - 127)
    w_i = np.where((w >> 13) & 1, np.where((w >> 15) & 1, -magnitude, magnitude), 0.0)
    w_j = np.where((w >> 12) & 1, np.where((w >> 14) & 1, -magnitude, magnitude), 0.0)
    return w_i.astype(np.float32), w_j.astype(np.float32)


def representable(magnitude: np.ndarray) -> np.ndarray:
    """What the format stores for a kept magnitude: bf16, then nearest of {0, 2**-15} below
    2**-15, saturation at 130560 above."""
    m = np.asarray(magnitude, np.float32).astype(BF16).astype(np.float64)
    m = np.where(m < 2.0 ** -16, 0.0, np.where(m < 2.0 ** -15, 2.0 ** -15, m))
    return np.minimum(m, 130560.0).astype(np.float32)


def merge(w_i, w_j, threshold, imp_i=1.0, imp_j=1.0):
    """Merged experts (W_i_hat, W_j_hat) as float32, and the masks, straight from the rule."""
    a = np.abs(np.asarray(w_i, np.float32))
    b = np.abs(np.asarray(w_j, np.float32))
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    similar = (hi - lo) <= np.float32(threshold) * hi
    i_wins = (a * a * np.float32(imp_i)) >= (b * b * np.float32(imp_j))
    keep_i, keep_j = similar | i_wins, similar | ~i_wins
    mag = np.where(similar, (a + b) * np.float32(0.5), np.where(i_wins, a, b)).astype(np.float32)
    stored = representable(mag)
    keep_i, keep_j = keep_i & (stored > 0), keep_j & (stored > 0)
    hat_i = np.where(keep_i, np.where(np.asarray(w_i) < 0, -stored, stored), 0.0).astype(np.float32)
    hat_j = np.where(keep_j, np.where(np.asarray(w_j) < 0, -stored, stored), 0.0).astype(np.float32)
    return hat_i, hat_j, dict(similar=similar, i_wins=i_wins, keep_i=keep_i, keep_j=keep_j)
