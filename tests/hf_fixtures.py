"""Tiny random transformers MoE models saved as sharded HF checkpoints, with their reference logits.

Shapes are deliberately non-square (H != I != 2I, vocab != H, E != top_k, kv_heads < heads,
Qwen3 head_dim != H / heads) and the expert sizes are not powers of two (88, 176: DeepSeek-MoE's
1408 / 2816 scaled down by 16), so transposition or split mistakes cannot cancel out.

DeepSeek-MoE 16B (``model_type: deepseek``) is remote code, absent from transformers.  Its
reference is a native transformers model computing the same function: ``DeepseekV2ForCausalLM``
(identical MoE block: softmax -> greedy top-k, no renormalisation, scaling 1.0, ungated shared
experts, ``first_k_dense_replace`` dense layers) with every layer's MLA attention replaced by
``LlamaAttention`` (MHA, no bias, rotate_half RoPE) and the rotary embedding by Llama's.  Its
``save_pretrained`` writes the DeepSeek-MoE Hub key layout; config.json is then replaced by a
hand-written Hub-style (v4 spelling, ``rope_theta``/``torch_dtype``) DeepSeek-MoE config.

OLMoE, GLM-4.5 and DeepSeek-V2/V3 are native transformers models (``FAMILIES``): GLM with attention
biases, per-head qk norm, partial rotary, 2 expert groups and a dense first layer; DeepSeek-V2 with
MLA without q LoRA, YaRN (mscale != mscale_all_dim) and group-limited greedy routing; DeepSeek-V3
with q LoRA, interleaved YaRN RoPE and noaux_tc routing.  Biases (attention, correction) that
transformers initialises to zero are randomised so that they matter.
"""
from __future__ import annotations

import atexit
import copy
import functools
import inspect
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                          Glm4MoeConfig, Glm4MoeForCausalLM, LlamaConfig, MixtralConfig, MixtralForCausalLM,
                          OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

EAGER = dict(attn_implementation="eager", experts_implementation="eager")
SHARD = "40KB"          # small enough for >= 3 shards for every fixture
VOCAB, H = 160, 64
COMMON = dict(hidden_size=H, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
              initializer_range=0.1, rms_norm_eps=1e-6)


def _mla_sizes(**kw):
    return dict(hidden_size=H, vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=4, intermediate_size=120,
                moe_intermediate_size=88, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=3,
                first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6, **kw, **EAGER)


FAMILIES = {   # arch -> (transformers class, config)
    "olmoe": lambda tie: (OlmoeForCausalLM, OlmoeConfig(intermediate_size=88, num_hidden_layers=2, num_experts=8,
                                                        num_experts_per_tok=3, norm_topk_prob=False,
                                                        tie_word_embeddings=tie, **COMMON, **EAGER)),
    "glm4_moe": lambda tie: (Glm4MoeForCausalLM, Glm4MoeConfig(
        intermediate_size=120, moe_intermediate_size=88, num_hidden_layers=3, n_routed_experts=8,
        num_experts_per_tok=3, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
        norm_topk_prob=True, routed_scaling_factor=1.8, attention_bias=True, use_qk_norm=True, head_dim=24,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        tie_word_embeddings=tie, **COMMON, **EAGER)),
    "deepseek_v2": lambda tie: (DeepseekV2ForCausalLM, DeepseekV2Config(**_mla_sizes(
        q_lora_rank=None, n_group=4, topk_group=2, topk_method="group_limited_greedy", n_shared_experts=2,
        routed_scaling_factor=1.5, norm_topk_prob=False, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                         "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}))),
    "deepseek_v3": lambda tie: (DeepseekV3ForCausalLM, DeepseekV3Config(**_mla_sizes(
        q_lora_rank=24, n_group=2, topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_interleave=True, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
                         "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}))),
}


def build(arch: str, *, tie: bool = False):
    """A random eval-mode transformers model of ``arch`` (fp32) and, for deepseek, its Hub config."""
    torch.manual_seed({"mixtral": 0, "qwen2_moe": 1, "qwen3_moe": 2, "deepseek": 3, "olmoe": 4, "glm4_moe": 5,
                       "deepseek_v2": 6, "deepseek_v3": 7}[arch])
    if arch in FAMILIES:
        cls, cfg = FAMILIES[arch](tie)
        m = cls(cfg).eval()
        with torch.no_grad():
            for name, p in m.named_parameters(recurse=True):
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1)
            for name, b in m.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.normal_(0.0, 0.1)
        return m, None
    if arch == "mixtral":
        cfg = MixtralConfig(intermediate_size=88, num_hidden_layers=2, num_local_experts=6, num_experts_per_tok=2,
                            sliding_window=5, rope_theta=1e6, tie_word_embeddings=tie, **COMMON, **EAGER)
        return MixtralForCausalLM(cfg).eval(), None
    if arch == "qwen2_moe":
        cfg = Qwen2MoeConfig(intermediate_size=120, moe_intermediate_size=88, shared_expert_intermediate_size=176,
                             num_hidden_layers=3, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
                             mlp_only_layers=[1], decoder_sparse_step=1, tie_word_embeddings=tie, **COMMON, **EAGER)
        return Qwen2MoeForCausalLM(cfg).eval(), None
    if arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(intermediate_size=120, moe_intermediate_size=88, num_hidden_layers=2, num_experts=6,
                             num_experts_per_tok=2, head_dim=24, norm_topk_prob=True, tie_word_embeddings=tie,
                             **COMMON, **EAGER)
        return Qwen3MoeForCausalLM(cfg).eval(), None
    assert arch == "deepseek"
    nh, e, k, ns, mi, inter, layers, theta = 4, 8, 3, 2, 88, 120, 3, 10000.0
    rope = {"rope_theta": theta, "rope_type": "default"}
    ds = DeepseekV2Config(hidden_size=H, intermediate_size=inter, moe_intermediate_size=mi, num_hidden_layers=layers,
                          num_attention_heads=nh, num_key_value_heads=nh, vocab_size=VOCAB, n_routed_experts=e,
                          num_experts_per_tok=k, n_shared_experts=ns, first_k_dense_replace=1, norm_topk_prob=False,
                          routed_scaling_factor=1.0, topk_method="greedy", q_lora_rank=None, rope_parameters=rope,
                          rms_norm_eps=1e-6, initializer_range=0.1, tie_word_embeddings=tie, **EAGER)
    ll = LlamaConfig(hidden_size=H, num_attention_heads=nh, num_key_value_heads=nh, rope_parameters=rope,
                     attention_bias=False, max_position_embeddings=ds.max_position_embeddings,
                     attn_implementation="eager")
    m = DeepseekV2ForCausalLM(ds).eval()
    for i, layer in enumerate(m.model.layers):
        layer.self_attn = LlamaAttention(ll, layer_idx=i)
    m.model.rotary_emb = LlamaRotaryEmbedding(ll)
    with torch.no_grad():  # LlamaAttention's fresh Linear init is tiny next to initializer_range
        for layer in m.model.layers:
            for p in layer.self_attn.parameters():
                p.normal_(0.0, 0.1)
    hub = {"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
           "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
           "vocab_size": VOCAB, "hidden_size": H, "intermediate_size": inter, "moe_intermediate_size": mi,
           "num_hidden_layers": layers, "num_attention_heads": nh, "num_key_value_heads": nh,
           "n_shared_experts": ns, "n_routed_experts": e, "num_experts_per_tok": k, "moe_layer_freq": 1,
           "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001,
           "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.1,
           "rms_norm_eps": 1e-6, "use_cache": True, "pretraining_tp": 1, "tie_word_embeddings": tie,
           "rope_theta": theta, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
           "bos_token_id": 100000, "eos_token_id": 100001, "torch_dtype": "float32"}
    return m, hub


def save(model, hub_config, out: Path, *, dtype=torch.float32, fused: bool = False) -> Path:
    """``save_pretrained`` (sharded) in ``dtype``; Hub per-expert layout unless ``fused``."""
    m = copy.deepcopy(model).to(dtype)
    m.save_pretrained(out, max_shard_size=SHARD, save_original_format=not fused)
    shards = list(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (out / "model.safetensors.index.json").exists(), shards
    if hub_config is not None:
        cfg = dict(hub_config, torch_dtype=str(dtype).removeprefix("torch."))
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def reference(model, ids: np.ndarray, dtype=torch.float32):
    """(logits fp32 numpy, router logits per MoE layer [L][T, E] fp32) of the eager torch forward."""
    m = copy.deepcopy(model).to(dtype)
    routers, hooks = [], []
    for name, mod in m.named_modules():
        if name.endswith(".mlp.gate"):  # the routers (dense MLPs have gate_proj)
            hooks.append(mod.register_forward_hook(lambda mod, inp, out: routers.append(
                (inp[0].float().reshape(-1, inp[0].shape[-1]) @ mod.weight.float().T).numpy())))
    with torch.no_grad():
        logits = m(torch.as_tensor(ids)).logits.float().numpy()
    for h in hooks:
        h.remove()
    return logits, routers


# ---- process-wide cache, shared by test_models.py and test_convert.py --------------------------

_TMP = Path(tempfile.mkdtemp(prefix="puzzlemoe-hf-"))
atexit.register(shutil.rmtree, _TMP, True)
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 8))
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cache(f):
    """functools.cache keyed on the bound arguments (defaults applied), so f(a) and f(a, default) share."""
    cached, sig = functools.cache(f), inspect.signature(f)

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return cached(*bound.args)
    return wrapper


@_cache
def model(arch: str, tie: bool = False):
    return build(arch, tie=tie)


@_cache
def checkpoint(arch: str, dtype: str = "float32", fused: bool = False, tie: bool = False) -> Path:
    """Sharded HF checkpoint directory of the cached model."""
    m, hub = model(arch, tie)
    name = f"{arch}-{dtype}{'-fused' if fused else ''}{'-tied' if tie else ''}"
    return save(m, hub, _TMP / name, dtype=TORCH_DTYPES[dtype], fused=fused)


@_cache
def converted(arch: str, dtype: str = "float32", fused: bool = False, tie: bool = False, ratio: float = 0.0) -> Path:
    """``python -m convert`` output (run in-process) for ``checkpoint(...)``."""
    from convert import main  # noqa: PLC0415
    src = checkpoint(arch, dtype, fused, tie)
    out = src.with_name(src.name + f"-out{ratio}")
    assert main([arch, "--src", str(src), "--out", str(out), "--ratio", str(ratio), "--quiet"]) == 0
    return out


@_cache
def reference_logits(arch: str, dtype: str = "float32", tie: bool = False):
    return reference(model(arch, tie)[0], IDS, TORCH_DTYPES[dtype])
