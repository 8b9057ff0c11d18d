"""Building blocks shared by the attention variants and the decoder (``models``, ``mla``):
linear, RMSNorm, SwiGLU MLP and RoPE (rotate_half / interleaved pairs, partial, YaRN frequencies).

Numerics follow transformers' eager PyTorch forward: RMSNorm in fp32 cast back before the scale,
RoPE tables in fp32 cast to the activation dtype.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Buffer(nnx.Variable):
    """Non-trainable arrays: packed uint16 words, pair and expert indices."""


def _init(rngs, shape, dtype, std=0.02):
    rngs = rngs or nnx.Rngs(0)
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with kernel ``[in, out]``."""

    def __init__(self, din, dout, *, bias=False, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = _init(rngs, (din, dout), dtype)
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None

    def __call__(self, x):
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]


class RMSNorm(nnx.Module):
    """transformers' RMSNorm: normalise in fp32, cast to the input dtype, then scale."""

    def __init__(self, dim, eps, *, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * xf.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU MLP ``down(silu(gate(x)) * up(x))`` (dense layers and shared experts)."""

    def __init__(self, hidden, inter, *, dtype, rngs):
        self.gate = Linear(hidden, inter, dtype=dtype, rngs=rngs)
        self.up = Linear(hidden, inter, dtype=dtype, rngs=rngs)
        self.down = Linear(inter, hidden, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def rope_tables(positions, head_dim, theta, dtype, yarn: tuple = (), halves=True):
    """(cos, sin) for RoPE over ``head_dim`` dims, computed in fp32: ``[..., S, head_dim]``
    (frequencies repeated for rotate_half) or, with ``halves=False``, ``[..., S, head_dim // 2]``
    (one per interleaved pair).  ``yarn``: ``ModelConfig.rope_yarn`` (scaled frequencies, tables
    times its attention factor)."""
    inv_freq, factor = rope_frequencies(head_dim, theta, dict(yarn))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1) if halves else freqs
    return (jnp.cos(emb) * factor).astype(dtype), (jnp.sin(emb) * factor).astype(dtype)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, yarn: dict) -> tuple[np.ndarray, float]:
    """(inv_freq fp32 ``[dim // 2]``, attention factor) as transformers' default / YaRN init computes them."""
    pos = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    if not yarn:
        return (1.0 / pos).astype(np.float32), 1.0
    f, orig = yarn["factor"], yarn["original_max_position_embeddings"]
    attn = yarn["attention_factor"] or (yarn_mscale(f, yarn["mscale"]) / yarn_mscale(f, yarn["mscale_all_dim"])
                                        if yarn["mscale"] and yarn["mscale_all_dim"] else yarn_mscale(f))

    def corr(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))
    low, high = corr(yarn["beta_fast"]), corr(yarn["beta_slow"])
    if yarn["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extra = (1 - ramp).astype(np.float32)
    inv = (1.0 / (np.float32(f) * pos)) * (1 - extra) + (1.0 / pos) * extra
    return inv.astype(np.float32), float(attn)


def apply_rope(x, cos, sin):
    """x ``[B, S, heads, D]``; rotate_half (NeoX) convention used by HF checkpoints.  Tables
    narrower than D rotate the leading dims only (partial rotary); the rest pass through."""
    d, rd = x.shape[-1], cos.shape[-1]
    if rd < d:
        return jnp.concatenate([apply_rope(x[..., :rd], cos, sin), x[..., rd:]], axis=-1)
    half = d // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None] + rot * sin[:, :, None]


def apply_rope_interleaved(x, cos, sin):
    """x ``[B, S, heads, D]`` rotated as pairs ``(x0, x1), (x2, x3) ...`` (DeepSeek's layout) with
    ``[B, S, D // 2]`` tables; the result holds the rotated evens then odds (transformers'
    DeepSeek-V3 layout; DeepSeek-V2 keeps them interleaved -- the same dot products)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, :, None], sin[:, :, None]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


