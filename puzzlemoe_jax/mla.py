"""Multi-head Latent Attention (DeepSeek-V2/V3), with the compressed-latent KV cache.

Keys and values come from a per-token latent ``c = norm(x @ W_kv_a)`` ``[kv_lora_rank]`` and one
decoupled RoPE key ``k_pe`` ``[qk_rope_head_dim]`` shared by all heads; ``kv_b_proj`` expands
``c`` to per-head ``k_nope``/``v``.  The cache stores only ``(c, k_pe)`` per token.  Two equal
ways to attend over it: "plain" expands the cached latents with ``kv_b_proj`` (transformers'
way); "absorbed" folds ``kv_b_proj`` into the query and the output instead
(``q_nope @ W_k^T`` scores against ``c`` directly; ``(probs @ c) @ W_v``), so decode steps never
expand the cache.  Cached calls use the absorbed path unless ``absorb`` is False.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from puzzlemoe_jax.config import ModelConfig
from puzzlemoe_jax.layers import Linear, RMSNorm, apply_rope, apply_rope_interleaved, rope_tables, yarn_mscale

LORA_NORM_EPS = 1e-6   # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps


class MLAttention(nnx.Module):
    """``__call__(x, positions, mask[, cache])`` as ``models.Attention``; ``cache=(c, k_pe, index)``
    holds ``[B, S_max, kv_lora_rank]`` latents and ``[B, S_max, qk_rope_head_dim]`` RoPE keys."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs):
        h, nh, r = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank
        self.num_heads, self.rank = nh, r
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk = self.nope + self.rope_dim
        self.theta, self.yarn, self.interleave = cfg.rope_theta, cfg.rope_yarn, cfg.rope_interleave
        yarn = dict(cfg.rope_yarn)
        m = yarn_mscale(yarn["factor"], yarn["mscale_all_dim"]) if yarn.get("mscale_all_dim") else 1.0
        self.scale = qk ** -0.5 * m * m
        self.absorb = True
        if cfg.q_lora_rank:
            self.q_proj = None
            self.q_a_proj = Linear(h, cfg.q_lora_rank, dtype=dtype, rngs=rngs)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LORA_NORM_EPS, dtype=dtype)
            self.q_b_proj = Linear(cfg.q_lora_rank, nh * qk, dtype=dtype, rngs=rngs)
        else:
            self.q_proj = Linear(h, nh * qk, dtype=dtype, rngs=rngs)
            self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        self.kv_a_proj = Linear(h, r + self.rope_dim, dtype=dtype, rngs=rngs)
        self.kv_a_norm = RMSNorm(r, LORA_NORM_EPS, dtype=dtype)
        self.kv_b_proj = Linear(r, nh * (self.nope + self.v_dim), dtype=dtype, rngs=rngs)
        self.o_proj = Linear(nh * self.v_dim, h, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, mask, cache=None):
        b, s, _ = x.shape
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.reshape(b, s, self.num_heads, self.nope + self.rope_dim)
        q_nope, q_pe = q[..., :self.nope], q[..., self.nope:]
        ckv = self.kv_a_proj(x)
        c, k_pe = self.kv_a_norm(ckv[..., :self.rank]), ckv[..., self.rank:]
        cos, sin = rope_tables(positions, self.rope_dim, self.theta, jnp.float32, self.yarn, halves=not self.interleave)
        rope = apply_rope_interleaved if self.interleave else apply_rope
        q_pe = rope(q_pe.astype(jnp.float32), cos, sin).astype(x.dtype)
        k_pe = rope(k_pe[:, :, None].astype(jnp.float32), cos, sin)[:, :, 0].astype(x.dtype)
        if cache is None:
            return self._plain(q_nope, q_pe, c, k_pe, mask)
        cc, cp, index = cache
        zero = jnp.zeros((), jnp.int32)
        at = (zero, jnp.asarray(index, jnp.int32), zero)
        cc = jax.lax.dynamic_update_slice(cc, c.astype(cc.dtype), at)
        cp = jax.lax.dynamic_update_slice(cp, k_pe.astype(cp.dtype), at)
        attend = self._absorbed if self.absorb else self._plain
        return attend(q_nope, q_pe, cc.astype(x.dtype), cp.astype(x.dtype), mask), (cc, cp)

    def _softmax(self, scores, mask, dtype):
        scores = jnp.where(mask[:, None], scores * jnp.asarray(self.scale, scores.dtype), jnp.finfo(scores.dtype).min)
        return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)

    def _plain(self, q_nope, q_pe, c, k_pe, mask):
        """Expand the latents ``c [B, T, r]`` to per-head keys/values, then attend."""
        b, s, nh = q_nope.shape[:3]
        kv = self.kv_b_proj(c).reshape(b, c.shape[1], nh, self.nope + self.v_dim)
        k_nope, v = kv[..., :self.nope], kv[..., self.nope:]
        scores = jnp.einsum("bshd,bthd->bhst", q_nope, k_nope) + jnp.einsum("bshd,btd->bhst", q_pe, k_pe)
        probs = self._softmax(scores, mask, q_nope.dtype)
        return self.o_proj(jnp.einsum("bhst,bthd->bshd", probs, v).reshape(b, s, nh * self.v_dim))

    def _absorbed(self, q_nope, q_pe, c, k_pe, mask):
        """Attend over the latents themselves: ``kv_b_proj`` folded into the query and the output."""
        b, s, nh = q_nope.shape[:3]
        w = self.kv_b_proj.kernel[...].reshape(self.rank, nh, self.nope + self.v_dim)
        q_lat = jnp.einsum("bshd,rhd->bshr", q_nope, w[..., :self.nope])
        scores = jnp.einsum("bshr,btr->bhst", q_lat, c) + jnp.einsum("bshd,btd->bhst", q_pe, k_pe)
        probs = self._softmax(scores, mask, q_nope.dtype)
        out = jnp.einsum("bshr,rhd->bshd", jnp.einsum("bhst,btr->bshr", probs, c), w[..., self.nope:])
        return self.o_proj(out.reshape(b, s, nh * self.v_dim))
