"""Hugging Face tensor names -> our parameter names, checked against the config before reading.

``hf_plan`` maps a Hugging Face checkpoint of one of ``config.ARCHS`` onto our parameter names
(the NNX state paths of ``models.CausalLM`` joined with "."); ``check_plan`` checks every name
and shape against the config before anything is converted; ``read_items``/``read_experts`` read
the planned tensors in our layout on the host; ``read_experts_raw`` + ``experts_to_flax`` do the
same for the experts with one plain read per tensor, each put on the device as soon as it is read,
and the stacking, transposes and dtype casts there (the converter's fast path).
"""
from __future__ import annotations

import dataclasses
import functools
from concurrent.futures import Executor
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from puzzlemoe_jax import fp8
from puzzlemoe_jax.config import ModelConfig
from puzzlemoe_jax.experts import MATRICES
from puzzlemoe_jax.safetensors_io import FLOAT_CODES, CheckpointError, SafetensorsDir, ThreadBuffers


@dataclasses.dataclass(frozen=True)
class Item:
    """One HF tensor -> one of our parameters (transposed for torch ``[out, in]`` kernels)."""
    src: str
    dst: str
    shape: tuple[int, ...]   # expected HF shape
    transpose: bool
    fp32: bool = False       # kept in float32 whatever the model dtype (fp32 routers, correction bias)


@dataclasses.dataclass(frozen=True)
class ExpertsItem:
    """One MoE layer's routed experts: per-expert Hub tensors or the fused v5 pair."""
    dst: str                                  # e.g. "layers.3.mlp.experts"
    per_expert: Mapping[str, tuple[str, ...]] | None   # our matrix name -> E HF names
    fused: tuple[str, str] | None             # (gate_up_proj [E,2I,H], down_proj [E,H,I])
    num_experts: int
    hidden: int
    inter: int

    def sources(self) -> dict[str, tuple[int, ...]]:
        e, h, i = self.num_experts, self.hidden, self.inter
        if self.fused:
            return {self.fused[0]: (e, 2 * i, h), self.fused[1]: (e, h, i)}
        shape = {"w_gate": (i, h), "w_up": (i, h), "w_down": (h, i)}
        return {n: shape[m] for m, names in self.per_expert.items() for n in names}


@dataclasses.dataclass
class Plan:
    head: list[Item]                      # embeddings, final norm, lm_head
    layers: list[tuple[list[Item], ExpertsItem | None]]
    ignored: list[str]                    # present but deliberately unused (tied lm_head, inv_freq, MTP layers)
    scales: dict[str, str] = dataclasses.field(default_factory=dict)   # FP8 weight -> its weight_scale_inv

    def sources(self) -> dict[str, tuple[int, ...]]:
        """Every planned HF tensor name -> its expected shape."""
        out = {it.src: it.shape for it in self.head}
        for items, experts in self.layers:
            out.update({it.src: it.shape for it in items})
            out.update(experts.sources() if experts else {})
        return out


def _linear(src, dst, dout, din, bias=False, fp32=False):
    items = [Item(src + ".weight", dst + ".kernel", (dout, din), True, fp32)]
    return items + ([Item(src + ".bias", dst + ".bias", (dout,), False)] if bias else [])


def _mlp(src, dst, h, i, names=("gate_proj", "up_proj", "down_proj")):
    g, u, d = names
    return (_linear(f"{src}.{g}", f"{dst}.gate", i, h) + _linear(f"{src}.{u}", f"{dst}.up", i, h)
            + _linear(f"{src}.{d}", f"{dst}.down", h, i))


def hf_plan(cfg: ModelConfig, names: Iterable[str], layout: str = "auto") -> Plan:
    """Which HF tensor feeds which parameter.

    ``layout`` "hub" (per-expert tensors), "fused" (v5 ``experts.gate_up_proj``/``down_proj``) or
    "auto": chosen per layer from the names present.
    """
    names = set(names)
    h, nh, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    head = [Item("model.embed_tokens.weight", "embed", (cfg.vocab_size, h), False),
            Item("model.norm.weight", "final_norm.scale", (h,), False)]
    ignored = sorted(n for n in names if n.endswith("rotary_emb.inv_freq"))
    if cfg.tie_word_embeddings:
        ignored += ["lm_head.weight"] if "lm_head.weight" in names else []
    else:
        head += _linear("lm_head", "lm_head", cfg.vocab_size, h)
    layers = []
    for L in range(cfg.num_layers):
        p, q = f"model.layers.{L}.", f"layers.{L}."
        items = [Item(p + "input_layernorm.weight", q + "input_norm.scale", (h,), False),
                 Item(p + "post_attention_layernorm.weight", q + "post_norm.scale", (h,), False)]
        a, qa = p + "self_attn.", q + "attn."
        items += _mla(cfg, a, qa) if cfg.mla else (
            _linear(a + "q_proj", qa + "q_proj", nh * d, h, cfg.qkv_bias)
            + _linear(a + "k_proj", qa + "k_proj", kv * d, h, cfg.qkv_bias)
            + _linear(a + "v_proj", qa + "v_proj", kv * d, h, cfg.qkv_bias)
            + _linear(a + "o_proj", qa + "o_proj", h, nh * d, cfg.o_bias))
        if cfg.qk_norm or cfg.qk_norm_full:
            qd, kd = (nh * d, kv * d) if cfg.qk_norm_full else (d, d)
            items += [Item(a + "q_norm.weight", qa + "q_norm.scale", (qd,), False),
                      Item(a + "k_norm.weight", qa + "k_norm.scale", (kd,), False)]
        if L not in cfg.moe_layers:
            layers.append((items + _mlp(p + "mlp", q + "mlp", h, cfg.intermediate_size), None))
            continue
        m = p + "mlp."
        if cfg.model_type == "mixtral" and (layout == "hub" or layout == "auto" and any(
                n.startswith(p + "block_sparse_moe.") for n in names)):
            m = p + "block_sparse_moe."
        e, i = cfg.num_experts, cfg.moe_intermediate_size
        items += _linear(m + "gate", q + "mlp.router", e, h, fp32=cfg.router_fp32)
        if cfg.topk_method == "noaux_tc":
            items.append(Item(m + "gate.e_score_correction_bias", q + "mlp.router_bias", (e,), False, True))
        if cfg.shared_intermediate_size:
            src = m + ("shared_expert" if cfg.shared_gate else "shared_experts")
            items += _mlp(src, q + "mlp.shared", h, cfg.shared_intermediate_size)
            if cfg.shared_gate:
                items += _linear(m + "shared_expert_gate", q + "mlp.shared_gate", 1, h)
        if layout == "fused" or layout == "auto" and m + "experts.gate_up_proj" in names:
            experts = ExpertsItem(q + "mlp.experts", None, (m + "experts.gate_up_proj", m + "experts.down_proj"), e, h, i)
        else:
            hub = ("w1", "w3", "w2") if cfg.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            experts = ExpertsItem(q + "mlp.experts", {mat: tuple(f"{m}experts.{x}.{src}.weight" for x in range(e))
                                                      for mat, src in zip(MATRICES, hub)}, None, e, h, i)
        layers.append((items, experts))
    # GLM-4.5 / DeepSeek-V3 checkpoints carry multi-token-prediction layers past num_hidden_layers
    ignored += sorted(n for n in names if n.startswith("model.layers.")
                      and n.split(".")[2].isdigit() and int(n.split(".")[2]) >= cfg.num_layers)
    plan = Plan(head, layers, ignored)
    plan.scales = fp8.scale_names(plan.sources(), names)
    return plan


def _mla(cfg: ModelConfig, a: str, qa: str) -> list[Item]:
    """Multi-head Latent Attention (DeepSeek-V2/V3) tensors."""
    h, nh, r = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank:
        items = (_linear(a + "q_a_proj", qa + "q_a_proj", cfg.q_lora_rank, h)
                 + [Item(a + "q_a_layernorm.weight", qa + "q_a_norm.scale", (cfg.q_lora_rank,), False)]
                 + _linear(a + "q_b_proj", qa + "q_b_proj", nh * qk, cfg.q_lora_rank))
    else:
        items = _linear(a + "q_proj", qa + "q_proj", nh * qk, h)
    return items + (_linear(a + "kv_a_proj_with_mqa", qa + "kv_a_proj", r + cfg.qk_rope_head_dim, h)
                    + [Item(a + "kv_a_layernorm.weight", qa + "kv_a_norm.scale", (r,), False)]
                    + _linear(a + "kv_b_proj", qa + "kv_b_proj", nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), r)
                    + _linear(a + "o_proj", qa + "o_proj", h, nh * cfg.v_head_dim))


def check_plan(plan: Plan, ckpt: SafetensorsDir, arch: str) -> None:
    """Every expected tensor present with its shape and a float dtype (FP8 with its block scales);
    nothing unexpected."""
    expected = plan.sources()
    fp8.check_scales(plan.scales, ckpt, expected)
    for name, shape in expected.items():
        info = ckpt.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{ckpt.dir}: missing tensor {name!r} (expected shape {list(shape)} "
                                  f"for this {arch} config)")
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected "
                                  f"{list(shape)} from config.json")
        if info.dtype not in FLOAT_CODES and name not in plan.scales:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected one of "
                                  f"{', '.join(FLOAT_CODES)}")
    extra = sorted(set(ckpt.tensors) - set(expected) - set(plan.ignored) - set(plan.scales.values()))
    if extra:
        raise CheckpointError(f"{ckpt.tensors[extra[0]].file}: unexpected tensor {extra[0]!r} "
                              f"({len(extra)} unexpected in all) for a {arch} model with this config.json")


TRANSPOSE_TILE = 128   # square tiles that stay in cache while transposed


def transpose_into(out: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``out[...] = a.T`` for 2-D ``a``, tile by tile: a whole-matrix strided copy misses the cache
    on every element once the matrix is large."""
    n, m = a.shape
    for i in range(0, n, TRANSPOSE_TILE):
        for j in range(0, m, TRANSPOSE_TILE):
            out[j:j + TRANSPOSE_TILE, i:i + TRANSPOSE_TILE] = a[i:i + TRANSPOSE_TILE, j:j + TRANSPOSE_TILE].T
    return out


def read_items(ckpt: SafetensorsDir, items: Iterable[Item], dtype) -> dict[str, np.ndarray]:
    out = {}
    for it in items:
        a = ckpt.read(it.src)
        if it.transpose:
            a = transpose_into(np.empty(a.shape[::-1], a.dtype), a) if a.ndim == 2 else np.ascontiguousarray(a.T)
        out[it.dst] = a.astype(np.float32 if it.fp32 else dtype, copy=False)
    return out


def read_experts(ckpt: SafetensorsDir, ex: ExpertsItem, dtype) -> dict[str, np.ndarray]:
    """Routed experts as ``{w_gate, w_up: [E,H,I], w_down: [E,I,H]}``, filled expert by expert."""
    e, h, i = ex.num_experts, ex.hidden, ex.inter
    out = {"w_gate": np.empty((e, h, i), dtype), "w_up": np.empty((e, h, i), dtype),
           "w_down": np.empty((e, i, h), dtype)}
    if ex.fused:
        gate_up = ckpt.read(ex.fused[0])
        for x in range(e):
            transpose_into(out["w_gate"][x], gate_up[x, :i])
            transpose_into(out["w_up"][x], gate_up[x, i:])
        del gate_up
        w_down = ckpt.read(ex.fused[1])
        for x in range(e):
            transpose_into(out["w_down"][x], w_down[x])
        del w_down
    else:
        for mat, names in ex.per_expert.items():
            for x, name in enumerate(names):
                transpose_into(out[mat][x], ckpt.read(name))
    return out


READ_MODES = ("map", "reuse", "fresh")


def device_reader(ckpt: SafetensorsDir, mode: str) -> Callable[[str], jax.Array]:
    """A function that reads one tensor of ``ckpt`` onto the device, waited for there, with no
    finite check; safe to call from several threads.  ``mode`` (``READ_MODES``): "map" copies it
    from the mapped file (``SafetensorsDir.mapped``), "reuse" reads it into the calling thread's one
    reused buffer (``ThreadBuffers``), "fresh" into a new buffer.  Where host memory is reused
    (map, reuse) the CPU backend copies it with ``jnp.array``: its ``device_put`` may alias a numpy
    buffer.  ``mode`` is checked by the caller (``convert_checkpoint``)."""
    put = jnp.array if mode != "fresh" and jax.default_backend() == "cpu" else jax.device_put
    buffers = ThreadBuffers() if mode == "reuse" else None

    def read(name: str) -> jax.Array:
        if mode == "map":
            a = put(ckpt.mapped(name))
        else:
            out = buffers.get(ckpt.tensors[name].nbytes) if buffers is not None else None
            a = put(ckpt.read(name, check_finite=False, out=out))
        jax.block_until_ready(a)   # the host memory is free once this returns
        if mode == "map":
            ckpt.unmap(name)
        return a
    return read


def read_experts_raw(ckpt: SafetensorsDir, ex: ExpertsItem, read: Callable[[str], jax.Array],
                     pool: Executor | None = None):
    """Routed experts as stored (torch orientation and dtype), each tensor on the device as soon as
    it is read by ``read`` (``device_reader``): hub ``{w_gate, w_up: E x [I,H], w_down: E x [H,I]}``
    (lists of per-expert arrays), fused ``{gate_up: [E,2I,H], w_down: [E,H,I]}``; ``experts_to_flax``
    counts their NaN/Inf.  ``pool`` runs the reads concurrently; host memory holds only the tensors
    in flight (one per thread).  None when one matrix's experts are stored in different dtypes
    (then ``read_experts`` is the way)."""
    if not ex.fused and any(len({ckpt.tensors[n].dtype for n in names}) != 1 for names in ex.per_expert.values()):
        return None
    if ex.fused:
        return {"gate_up": read(ex.fused[0]), "w_down": read(ex.fused[1])}
    names = [(m, n) for m, ns in ex.per_expert.items() for n in ns]
    arrays = list(pool.map(read, [n for _, n in names]) if pool else map(read, [n for _, n in names]))
    return {m: [a for (mm, _), a in zip(names, arrays) if mm == m] for m in ex.per_expert}


@functools.partial(jax.jit, static_argnames="dtype")
def experts_to_flax(raw: Mapping[str, jax.Array], dtype):
    """``read_experts_raw``'s arrays (stacked here where they are per-expert lists) in our layout and
    ``dtype`` (what ``read_experts`` gives), computed where jax runs, and the NaN/Inf count of each
    stored matrix."""
    raw = {k: jnp.stack(v) if isinstance(v, (list, tuple)) else v for k, v in raw.items()}
    bad = {k: jnp.sum(~jnp.isfinite(v), dtype=jnp.int32) for k, v in raw.items()}
    t = lambda a: jnp.swapaxes(a, 1, 2).astype(dtype)
    if "gate_up" in raw:
        i = raw["gate_up"].shape[1] // 2
        return {"w_gate": t(raw["gate_up"][:, :i]), "w_up": t(raw["gate_up"][:, i:]), "w_down": t(raw["w_down"])}, bad
    return {m: t(raw[m]) for m in MATRICES}, bad


def raise_nonfinite(ckpt: SafetensorsDir, ex: ExpertsItem) -> None:
    """Raise the host reader's error for the first expert tensor holding NaN/Inf."""
    for name in ex.sources():
        ckpt.read(name)
