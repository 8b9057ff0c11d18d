"""Flax NNX causal LMs for the MoE families we compress: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-MoE,
OLMoE, GLM-4.5, DeepSeek-V2/V3.

One decoder serves them all (MLA attention in ``mla``, grouped/sigmoid routers in ``routing``,
shared blocks in ``layers``); ``config.ModelConfig`` (parsed from a Hugging Face ``config.json``)
holds the differences.  Kernels use the Flax ``x @ W`` layout (``[in, out]``).
The routed experts of each MoE layer are either dense (``DenseExperts``: ``[E, K, N]``) or merged
pairs (``PackedExpertsModule``, the ``experts.PackedExperts`` arrays), chosen per layer.

Numerics follow transformers' eager PyTorch forward: RMSNorm in fp32 cast back before the scale,
RoPE tables in fp32 cast to the activation dtype, attention softmax in fp32, router softmax in
fp32 (Mixtral, GLM-4.5 and DeepSeek-V2/V3 keep fp32 routing weights, the others cast them to the
activation dtype; GLM-4.5 and DeepSeek-V2/V3 also hold the router weight in fp32).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels import resolve_impl
from kernels.mosaic_ffn import from_mosaic_words, to_mosaic_words
from puzzlemoe_jax.config import ModelConfig
from puzzlemoe_jax.experts import MATRICES, PackedExperts
from puzzlemoe_jax.layers import MLP, Buffer, Linear, RMSNorm, _init, apply_rope, rope_tables  # noqa: F401
from puzzlemoe_jax.mla import MLAttention
from puzzlemoe_jax.routing import select_experts
from puzzlemoe_jax.moe import moe_ffn
from puzzlemoe_jax.sharding import sharded_moe_ffn


QKV_NAMES = ("q_proj", "k_proj", "v_proj")


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_heads: int) -> np.ndarray:
    """The q, k and v projection kernels ``[in, heads * D]`` (or biases ``[heads * D]``) as
    ``Attention.qkv_proj``'s one tensor: per kv head, its query heads, then its key and value head,
    so that a split of the columns by kv heads keeps each group whole (tensor parallelism)."""
    lead, d = q.shape[:-1], k.shape[-1] // kv_heads
    parts = [a.reshape(*lead, kv_heads, -1, d) for a in (q, k, v)]
    return np.concatenate(parts, axis=-2).reshape(*lead, -1)


def qkv_part_shapes(shape: tuple[int, ...], heads: int, kv_heads: int) -> list[tuple[int, ...]]:
    """The shapes of the q, k and v tensors behind a ``qkv_proj`` kernel or bias of ``shape``."""
    d = shape[-1] // (heads + 2 * kv_heads)
    return [(*shape[:-1], n * d) for n in (heads, kv_heads, kv_heads)]


def split_qkv(qkv: np.ndarray, heads: int, kv_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of ``fuse_qkv``: the q, k and v tensors of a ``qkv_proj`` kernel or bias."""
    rep, lead = heads // kv_heads, qkv.shape[:-1]
    g = qkv.reshape(*lead, kv_heads, rep + 2, -1)
    return tuple(np.ascontiguousarray(p).reshape(*lead, -1)
                 for p in (g[..., :rep, :], g[..., rep:rep + 1, :], g[..., rep + 1:, :]))


class Attention(nnx.Module):
    """GQA self-attention with RoPE, optional qkv/o bias and per-head q/k RMSNorm.

    The q, k and v projections are one weight, ``qkv_proj``, in ``fuse_qkv``'s layout (one GEMM
    per step that reads the weight as stored; checkpoints keep the three tensors).
    ``__call__(x, positions, mask[, cache])`` takes explicit positions and a boolean mask
    ``[B, S, S_kv]``; with a KV cache the keys/values are the cache's ``S_max`` slots.
    """

    def __init__(self, cfg: ModelConfig, *, dtype, rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim, self.theta = cfg.num_heads, cfg.num_kv_heads, d, cfg.rope_theta
        self.rotary_dim, self.norm_full = cfg.rotary_dim or d, cfg.qk_norm_full
        self.qkv_proj = Linear(h, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * d, h, bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        qd, kd = (cfg.num_heads * d, cfg.num_kv_heads * d) if cfg.qk_norm_full else (d, d)   # OLMoE: whole projection
        self.q_norm = RMSNorm(qd, cfg.rms_norm_eps, dtype=dtype) if cfg.qk_norm or cfg.qk_norm_full else None
        self.k_norm = RMSNorm(kd, cfg.rms_norm_eps, dtype=dtype) if cfg.qk_norm or cfg.qk_norm_full else None

    def __call__(self, x, positions, mask, cache=None):
        """``cache=None``: attention over ``x`` itself, returns ``out``.  ``cache=(k, v, index)``
        (``[B, S_max, kv_heads, D]`` after RoPE, and the slot where ``x``'s keys go): writes the new
        keys/values there, attends over all ``S_max`` slots with ``mask [B, S, S_max]`` and returns
        ``(out, (k, v))``."""
        b, s, _ = x.shape
        g, rep, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).reshape(b, s, g, rep + 2, d)
        q, k, v = qkv[:, :, :, :rep].reshape(b, s, -1), qkv[:, :, :, rep].reshape(b, s, -1), qkv[:, :, :, rep + 1]
        if self.norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, s, self.num_heads, d)
        k = k.reshape(b, s, g, d)
        if self.q_norm is not None and not self.norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_tables(positions, self.rotary_dim, self.theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            return self._attend(q, k, v, mask)
        ck, cv, index = cache
        zero = jnp.zeros((), jnp.int32)
        at = (zero, jnp.asarray(index, jnp.int32), zero, zero)
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), at)
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), at)
        return self._attend(q, ck.astype(q.dtype), cv.astype(q.dtype), mask), (ck, cv)

    def _attend(self, q, k, v, mask):
        """Softmax attention of q ``[B, S, heads, D]`` over k/v ``[B, S_kv, kv_heads, D]`` where
        ``mask [B, S, S_kv]``; query heads are grouped onto their kv head (no repeat of k/v)."""
        b, s = q.shape[:2]
        g, rep = self.num_kv_heads, self.num_heads // self.num_kv_heads
        qg = q.reshape(b, s, g, rep, self.head_dim)
        scores = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k) * jnp.asarray(self.head_dim ** -0.5, q.dtype)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out)


class DenseExperts(nnx.Module):
    """Original routed experts: ``w_gate``/``w_up`` ``[E, H, I]``, ``w_down`` ``[E, I, H]``."""

    def __init__(self, e, hidden, inter, *, dtype, rngs=None, weights: Mapping[str, jax.Array] | None = None):
        shapes = {"w_gate": (e, hidden, inter), "w_up": (e, hidden, inter), "w_down": (e, inter, hidden)}
        for n, shape in shapes.items():
            setattr(self, n, _init(rngs, shape, dtype) if weights is None
                    else nnx.Param(jnp.asarray(weights[n], dtype)))

    def weights(self):
        return {n: getattr(self, n)[...] for n in MATRICES}


class PackedExpertsModule(nnx.Module):
    """Compressed experts of one layer: the arrays of an ``experts.PackedExperts``, held as variables.

    ``packed_*`` are uint16 ``[P, K, N]`` words for the pairs ``pairs`` ``[P, 2]``; ``dense_*``
    hold the ``E - 2P - D`` unmerged experts ``dense_ids`` in the model dtype; ``dropped_ids``
    (``D``, the dropping baseline) are experts the router never selects.  With ``mosaic=True`` the
    words are held as the grouped Mosaic kernel reads them instead (``mosaic_gate_up`` [P, 2I, H],
    ``mosaic_down`` [P, H, I]: the same bytes, transposed; ``kernels.mosaic_ffn.to_mosaic_words``).
    """

    def __init__(self, e, hidden, inter, num_pairs, num_dropped=0, *, dtype, packed: PackedExperts | None = None,
                 mosaic: bool = False):
        shapes = {"w_gate": (hidden, inter), "w_up": (hidden, inter), "w_down": (inter, hidden)}
        self.num_experts = e
        if packed is None:   # placeholder arrays of the right shapes, filled by load_pretrained
            pairs = jnp.stack([jnp.arange(num_pairs), jnp.arange(num_pairs) + num_pairs], 1)
            n_dense = e - 2 * num_pairs - num_dropped
            packed = PackedExperts(pairs, {n: jnp.zeros((num_pairs, *kn), jnp.uint16) for n, kn in shapes.items()},
                                   jnp.arange(2 * num_pairs, 2 * num_pairs + n_dense),
                                   {n: jnp.zeros((n_dense, *kn), dtype) for n, kn in shapes.items()}, e,
                                   jnp.arange(e - num_dropped, e))
        self.pairs = Buffer(jnp.asarray(packed.pairs, jnp.int32))
        self.dense_ids = Buffer(jnp.asarray(packed.dense_ids, jnp.int32))
        self.dropped_ids = Buffer(jnp.asarray(packed.dropped_ids, jnp.int32))
        self.mosaic = mosaic
        if mosaic:
            words = to_mosaic_words({n: jnp.asarray(w, jnp.uint16) for n, w in packed.packed.items()})
            self.mosaic_gate_up, self.mosaic_down = Buffer(words["gate_up"]), Buffer(words["down"])
        for n in MATRICES:
            if not mosaic:
                setattr(self, "packed_" + n, Buffer(jnp.asarray(packed.packed[n], jnp.uint16)))
            setattr(self, "dense_" + n, nnx.Param(jnp.asarray(packed.dense[n], dtype)))

    def mosaic_words(self) -> dict[str, jax.Array] | None:
        """The words in the Mosaic layout, or None when held as ``[P, K, N]``."""
        return {"gate_up": self.mosaic_gate_up[...], "down": self.mosaic_down[...]} if self.mosaic else None

    def weights(self, with_words: bool = True) -> PackedExperts:
        """The layer as a ``PackedExperts`` with ``[P, K, N]`` words (transposed back if needed).
        ``with_words=False`` on the Mosaic layout: ``packed`` left empty, for callers that pass
        ``mosaic_words()`` to the kernels (no transposed copy of the words in their program)."""
        words = self.mosaic_words()
        if words and not with_words:
            packed = {}
        else:
            packed = from_mosaic_words(words) if words else {n: getattr(self, "packed_" + n)[...] for n in MATRICES}
        return PackedExperts(self.pairs[...], packed,
                             self.dense_ids[...], {n: getattr(self, "dense_" + n)[...] for n in MATRICES},
                             self.num_experts, self.dropped_ids[...])


def route(logits, top_k, norm_topk_prob):
    """softmax (fp32) -> top-k -> optional renormalisation: (ids [T,k] int32, weights fp32)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), weights


class MoE(nnx.Module):
    """Router + routed experts (dense or packed, via ``moe.moe_ffn``) + optional shared expert.

    ``impl`` and ``interpret`` are passed to ``moe_ffn`` for packed experts (``kernels.IMPLS``);
    ``mesh`` (set by ``sharding.shard_model``) makes the routed experts run expert parallel.
    With ``capture`` set, each call sows its input and routing (``nnx.Intermediate`` "routed"),
    which ``puzzlemoe_jax.calibrate`` collects.
    """

    def __init__(self, cfg: ModelConfig, *, num_pairs=0, num_dropped=0, dtype, rngs, impl="auto", interpret=False):
        h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        self.top_k, self.norm_topk_prob, self.routing_fp32 = cfg.top_k, cfg.norm_topk_prob, cfg.routing_fp32
        self.scale = cfg.routed_scaling_factor
        self.impl, self.interpret, self.capture, self.mesh = impl, interpret, False, None
        self.router = Linear(h, e, dtype=jnp.float32 if cfg.router_fp32 else dtype, rngs=rngs)
        # DeepSeek-V2/V3, GLM-4.5: fp32 router, grouped / sigmoid routing (routing.select_experts)
        self.variant = (tuple(dict(scoring=cfg.scoring, topk_method=cfg.topk_method, n_group=cfg.n_group,
                                   topk_group=cfg.topk_group).items()) if cfg.router_fp32 else None)   # hashable
        self.router_bias = nnx.Param(jnp.zeros((e,), jnp.float32)) if cfg.topk_method == "noaux_tc" else None
        self.experts = (PackedExpertsModule(e, h, i, num_pairs, num_dropped, dtype=dtype) if num_pairs or num_dropped
                        else DenseExperts(e, h, i, dtype=dtype, rngs=rngs))
        self.shared = MLP(h, cfg.shared_intermediate_size, dtype=dtype, rngs=rngs) if cfg.shared_intermediate_size else None
        self.shared_gate = Linear(h, 1, dtype=dtype, rngs=rngs) if (cfg.shared_gate and self.shared) else None

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        words = self.experts.mosaic_words() if isinstance(self.experts, PackedExpertsModule) else None
        if words is not None and self.mesh is None:   # the kernels get the words in their own layout
            experts = self.experts.weights(with_words=False)
        else:
            experts, words = self.experts.weights(), None
        dropped = experts.dropped_ids if isinstance(experts, PackedExperts) else None
        if self.variant is not None:
            logits = x.astype(jnp.float32) @ self.router.kernel[...].astype(jnp.float32)
            bias = None if self.router_bias is None else self.router_bias[...]
            ids, w = select_experts(logits, top_k=self.top_k, norm_topk_prob=self.norm_topk_prob, bias=bias,
                                    blocked=dropped, **dict(self.variant))
        else:
            logits = self.router(x)
            if dropped is not None and dropped.shape[0]:
                logits = logits.at[:, dropped].set(-jnp.inf)   # dropped experts are never routed to
            ids, w = route(logits, self.top_k, self.norm_topk_prob)
        if self.capture:
            self.sow(nnx.Intermediate, "routed", (x, ids))
        if self.scale != 1.0:
            w = w * self.scale
        if not self.routing_fp32:
            w = w.astype(x.dtype)
        if self.mesh is not None:
            y = sharded_moe_ffn(x, ids, w, experts, self.mesh, impl=self.impl, interpret=self.interpret)
        else:
            y = moe_ffn(x, ids, w, experts, impl=self.impl, interpret=self.interpret, mosaic_words=words)
        if self.shared is not None:
            s = self.shared(x)
            y = y + (jax.nn.sigmoid(self.shared_gate(x)) * s if self.shared_gate is not None else s)
        return y.reshape(shape)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, idx: int, *, num_pairs=0, num_dropped=0, dtype, rngs, impl="auto",
                 interpret=False):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.attn = (MLAttention if cfg.mla else Attention)(cfg, dtype=dtype, rngs=rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if idx in cfg.moe_layers:
            self.mlp = MoE(cfg, num_pairs=num_pairs, num_dropped=num_dropped, dtype=dtype, rngs=rngs, impl=impl,
                           interpret=interpret)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, mask, cache=None):
        """Without ``cache``: ``x -> x``; with ``cache=(k, v, index)``: ``-> (x, (k, v))``."""
        if cache is None:
            x = x + self.attn(self.input_norm(x), positions, mask)
            return x + self.mlp(self.post_norm(x))
        a, kv = self.attn(self.input_norm(x), positions, mask, cache)
        x = x + a
        return x + self.mlp(self.post_norm(x)), kv


class CausalLM(nnx.Module):
    """Decoder-only MoE LM: ``__call__(input_ids [B, S]) -> logits [B, S, V]``; ``forward_cached``
    runs prefill/decode steps against a KV cache (``init_cache``).

    ``packed_pairs[i]`` > 0 (or ``dropped_experts[i]`` > 0) makes layer i's routed experts a
    ``PackedExpertsModule`` with that many merged pairs (dropped experts), to be filled by
    ``load_pretrained`` or ``set_experts``.  ``impl``/``interpret``: how packed layers run
    (``set_impl``; a name that cannot run here is refused at once).
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, packed_pairs: Mapping[int, int] | None = None,
                 dropped_experts: Mapping[int, int] | None = None, impl="auto", interpret: bool = False,
                 rngs: nnx.Rngs | None = None):
        resolve_impl(impl, interpret=interpret)
        rngs = rngs or nnx.Rngs(0)
        packed_pairs, dropped_experts = packed_pairs or {}, dropped_experts or {}
        self.config = cfg
        self.embed = _init(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, num_pairs=packed_pairs.get(i, 0),
                                             num_dropped=dropped_experts.get(i, 0), dtype=dtype, rngs=rngs,
                                             impl=impl, interpret=interpret) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, rngs=rngs)

    def attention_mask(self, positions):
        """Causal (and sliding-window) mask ``[B, S, S]`` from query/key positions."""
        q, k = positions[:, :, None], positions[:, None, :]
        mask = k <= q
        if self.config.sliding_window:
            mask &= (q - k) < self.config.sliding_window
        return mask

    def __call__(self, input_ids):
        b, s = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        mask = self.attention_mask(positions)
        x = self.embed[...][input_ids]
        for layer in self.layers:
            x = layer(x, positions, mask)
        return self.head(x)

    def head(self, x):
        """Final norm and output projection: hidden states -> logits."""
        x = self.final_norm(x)
        return x @ (self.embed[...].T if self.lm_head is None else self.lm_head.kernel[...])

    # ---- KV cache (used by puzzlemoe_jax.generate) ----------------------------------------

    def init_cache(self, batch: int, max_len: int, dtype=None) -> list[tuple[jax.Array, jax.Array]]:
        """Zeroed per-layer ``(k, v)`` caches ``[batch, max_len, kv_heads, head_dim]``; for MLA
        ``(latent, k_pe)`` ``[batch, max_len, kv_lora_rank]`` and ``[batch, max_len, qk_rope_head_dim]``."""
        cfg = self.config
        dtype = dtype or self.embed[...].dtype
        if cfg.mla:
            shapes = (batch, max_len, cfg.kv_lora_rank), (batch, max_len, cfg.qk_rope_head_dim)
        else:
            shapes = ((batch, max_len, cfg.num_kv_heads, cfg.head_dim),) * 2
        return [tuple(jnp.zeros(s, dtype) for s in shapes) for _ in range(cfg.num_layers)]

    def cache_mask(self, valid, index, s: int):
        """``[B, S, S_max]``: the query in slot ``index + q`` sees key slots ``<= index + q`` that
        hold real tokens (``valid [B, S_max]``, False for left padding) and lie within the sliding
        window (measured in slots, as transformers does: equal to positions past the padding)."""
        qs = jnp.asarray(index, jnp.int32) + jnp.arange(s, dtype=jnp.int32)
        ks = jnp.arange(valid.shape[1], dtype=jnp.int32)
        m = ks[None, :] <= qs[:, None]
        if self.config.sliding_window:
            m &= (qs[:, None] - ks[None, :]) < self.config.sliding_window
        return m[None] & valid[:, None, :]

    def forward_cached(self, input_ids, positions, valid, cache, index, *, last_index=None):
        """One prefill or decode step: ``input_ids``/``positions`` ``[B, S]`` go into cache slots
        ``index .. index+S-1``; returns ``(logits [B, S, V], new cache)``, or only position
        ``last_index``'s logits ``[B, 1, V]`` (an int or a traced index, or one per row ``[B]``:
        right-padded prompts)."""
        s = input_ids.shape[1]
        mask = self.cache_mask(valid, index, s)
        x = self.embed[...][input_ids]
        new = []
        for layer, (ck, cv) in zip(self.layers, cache):
            x, kv = layer(x, positions, mask, (ck, cv, index))
            new.append(kv)
        if last_index is not None and jnp.ndim(last_index) == 1:
            x = jnp.take_along_axis(x, jnp.asarray(last_index)[:, None, None], axis=1)
        elif last_index is not None:
            x = jax.lax.dynamic_slice_in_dim(x, last_index, 1, axis=1)
        return self.head(x), new

    def moe_layers(self) -> dict[int, MoE]:
        return {i: layer.mlp for i, layer in enumerate(self.layers) if isinstance(layer.mlp, MoE)}

    def set_impl(self, impl: str, *, interpret: bool = False) -> None:
        """Serve every packed layer with ``impl`` (``kernels.IMPLS``; refused where it cannot run,
        ``kernels.resolve_impl``); "mosaic" also re-lays the words out (``use_mosaic``)."""
        on_mesh = any(moe.mesh is not None for moe in self.moe_layers().values())
        if resolve_impl(impl, interpret=interpret) == "mosaic" and not on_mesh:   # (on a mesh: Triton)
            self.use_mosaic()
        for moe in self.moe_layers().values():
            moe.impl, moe.interpret = impl, interpret

    def use_mosaic(self, on: bool = True) -> None:
        """Hold every packed layer's words in the Mosaic kernel's layout (a new experts module per
        layer, the ``[K, N]`` words freed as each is replaced; ``on=False``: back to ``[K, N]``).
        Call before building a ``Generator`` (it splits the model's state once)."""
        for moe in self.moe_layers().values():
            if isinstance(moe.experts, PackedExpertsModule) and moe.experts.mosaic != on:
                w = moe.experts.weights()
                dtype = w.dense["w_gate"].dtype
                moe.experts = PackedExpertsModule(w.num_experts, 0, 0, int(w.pairs.shape[0]),
                                                  int(w.dropped_ids.shape[0]), dtype=dtype, packed=w, mosaic=on)
                del w
                # wait for this layer's copy before the next: with asynchronous dispatch every layer's
                # new words would otherwise be allocated before any old ones are freed (twice the memory)
                jax.block_until_ready(nnx.state(moe.experts))

    def set_experts(self, layer: int, experts: PackedExperts | Mapping[str, jax.Array]) -> None:
        """Replace layer ``layer``'s routed experts with dense ``{name: [E,K,N]}`` or packed ones."""
        moe = self.moe_layers()[layer]
        dtype = self.embed[...].dtype
        e, h, i = self.config.num_experts, self.config.hidden_size, self.config.moe_intermediate_size
        if isinstance(experts, PackedExperts):
            moe.experts = PackedExpertsModule(e, h, i, int(experts.pairs.shape[0]), int(experts.dropped_ids.shape[0]),
                                              dtype=dtype, packed=experts)
        else:
            moe.experts = DenseExperts(e, h, i, dtype=dtype, weights=experts)


@nnx.jit
def forward(model: CausalLM, input_ids):
    """Jitted ``model(input_ids)``."""
    return model(input_ids)
