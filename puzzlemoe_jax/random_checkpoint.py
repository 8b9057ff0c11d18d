"""Small random Hugging Face-layout MoE checkpoints, written with numpy only (no torch).

``write_tiny_checkpoint`` produces what ``save_pretrained`` would: a Hub-style (v4 spelling)
config.json and safetensors shards with ``model.safetensors.index.json``.  The experts of one
layer share a random base matrix plus a per-expert deviation, like fine-tuned-from-one-FFN
experts, so that pairwise merging has something to share.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from puzzlemoe_jax.writer import DTYPE_NAMES
from puzzlemoe_jax.config import ARCHS, ModelConfig
from puzzlemoe_jax.hf_layout import hf_plan
from puzzlemoe_jax.safetensors_io import INDEX, SINGLE


def tiny_config(arch: str, *, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=None,
                num_experts=8, top_k=2, moe_intermediate_size=88, intermediate_size=None, vocab_size=256,
                dtype="bfloat16", tie_word_embeddings=False) -> dict:
    """A Hub-style config.json dict for ``arch`` with the given sizes."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; supported: {', '.join(ARCHS)}")
    cfg = {"model_type": arch, "vocab_size": vocab_size, "hidden_size": hidden_size,
           "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
           "num_key_value_heads": num_kv_heads, "num_experts_per_tok": top_k, "hidden_act": "silu",
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_scaling": None,
           "tie_word_embeddings": tie_word_embeddings, "torch_dtype": dtype}
    inter = intermediate_size or 2 * moe_intermediate_size
    if arch == "mixtral":
        cfg.update(architectures=["MixtralForCausalLM"], intermediate_size=moe_intermediate_size,
                   num_local_experts=num_experts, rope_theta=1e6, sliding_window=None, rms_norm_eps=1e-5)
    elif arch == "qwen2_moe":
        cfg.update(architectures=["Qwen2MoeForCausalLM"], intermediate_size=inter,
                   moe_intermediate_size=moe_intermediate_size, shared_expert_intermediate_size=inter,
                   num_experts=num_experts, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                   rope_theta=1e6, use_sliding_window=False, sliding_window=4096)
    elif arch == "qwen3_moe":
        cfg.update(architectures=["Qwen3MoeForCausalLM"], intermediate_size=inter,
                   moe_intermediate_size=moe_intermediate_size, num_experts=num_experts, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1e6, attention_bias=False,
                   head_dim=head_dim or 2 * (hidden_size // num_heads), use_sliding_window=False,
                   sliding_window=None)
    elif arch == "olmoe":
        cfg.update(architectures=["OlmoeForCausalLM"], intermediate_size=moe_intermediate_size, num_experts=num_experts,
                   norm_topk_prob=False, rope_theta=10000.0, attention_bias=False, clip_qkv=None)
    elif arch == "glm4_moe":
        cfg.update(architectures=["Glm4MoeForCausalLM"], intermediate_size=inter,
                   moe_intermediate_size=moe_intermediate_size, n_routed_experts=num_experts, n_shared_experts=1,
                   n_group=2, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                   rope_theta=10000.0, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
                   head_dim=head_dim or hidden_size // num_heads, num_nextn_predict_layers=0)
    elif arch in ("deepseek_v2", "deepseek_v3"):
        v3 = arch == "deepseek_v3"
        cfg.update(architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"], intermediate_size=inter,
                   moe_intermediate_size=moe_intermediate_size, n_routed_experts=num_experts, n_shared_experts=1,
                   first_k_dense_replace=1, moe_layer_freq=1, n_group=2, topk_group=1,
                   topk_method="noaux_tc" if v3 else "group_limited_greedy", scoring_func="sigmoid" if v3 else "softmax",
                   norm_topk_prob=v3, routed_scaling_factor=2.5 if v3 else 1.0, num_key_value_heads=num_heads,
                   q_lora_rank=hidden_size // 2 if v3 else None, kv_lora_rank=hidden_size // 4,
                   qk_nope_head_dim=hidden_size // num_heads, qk_rope_head_dim=hidden_size // (2 * num_heads),
                   v_head_dim=hidden_size // num_heads, attention_bias=False, rope_theta=10000.0,
                   rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                 "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    else:
        cfg.update(architectures=["DeepseekForCausalLM"], intermediate_size=inter,
                   moe_intermediate_size=moe_intermediate_size, n_routed_experts=num_experts, n_shared_experts=2,
                   first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False, scoring_func="softmax",
                   rope_theta=10000.0, attention_bias=False, num_key_value_heads=num_heads,
                   auto_map={"AutoConfig": "configuration_deepseek.DeepseekConfig",
                             "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"})
    return cfg


def write_tiny_checkpoint(out_dir, arch: str, *, layout: str = "hub", max_shard_bytes: int = 200_000,
                          seed: int = 0, std: float = 0.05, expert_spread: float = 0.5, **sizes) -> Path:
    """Write a random ``arch`` checkpoint in HF layout to ``out_dir``; returns the directory.

    ``sizes`` go to ``tiny_config`` (``num_layers``, ``hidden_size``, ``dtype`` ...).  ``layout``
    "hub" writes per-expert tensors (the ``save_pretrained`` default), "fused" the v5 3-D
    ``gate_up_proj``/``down_proj``.  Shards hold about ``max_shard_bytes`` each; tensors are
    generated and written one shard at a time, so memory stays near one shard.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = tiny_config(arch, **sizes)
    dtype = DTYPE_NAMES[hf["torch_dtype"]]
    cfg = ModelConfig.from_hf(hf)
    plan = hf_plan(cfg, (), layout=layout)
    rng = np.random.default_rng(seed)
    shards, current, size = [], {}, 0

    def add(name, a):
        nonlocal size
        current[name] = np.ascontiguousarray(a.astype(dtype))
        size += current[name].nbytes
        if size >= max_shard_bytes:
            flush()

    def flush():
        nonlocal current, size
        if current:
            path = out / f"shard-{len(shards)}.tmp"
            save_file(current, path, metadata={"format": "pt"})
            shards.append((path, list(current)))
            current, size = {}, 0

    def random(shape, name):
        if name.endswith(("norm.weight", "layernorm.weight")):
            return 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
        return std * rng.standard_normal(shape, np.float32)

    for it in plan.head[:1]:
        add(it.src, random(it.shape, it.src))
    for items, experts in plan.layers:
        for it in items:
            add(it.src, random(it.shape, it.src))
        if experts is None:
            continue
        e, h, i = experts.num_experts, experts.hidden, experts.inter
        # torch [out, in] orientation, per expert: gate/up [I, H], down [H, I]
        base = {m: std * rng.standard_normal(s, np.float32) for m, s in
                (("w_gate", (i, h)), ("w_up", (i, h)), ("w_down", (h, i)))}
        def expert(m):
            return base[m] + expert_spread * std * rng.standard_normal(base[m].shape, np.float32)
        if experts.fused:
            gate_up = np.stack([np.concatenate([expert("w_gate"), expert("w_up")]) for _ in range(e)])
            add(experts.fused[0], gate_up)
            del gate_up
            add(experts.fused[1], np.stack([expert("w_down") for _ in range(e)]))
        else:
            for x in range(e):
                for m, names in experts.per_expert.items():
                    add(names[x], expert(m))
    for it in plan.head[1:]:
        add(it.src, random(it.shape, it.src))
    flush()
    for p in list(out.glob("model*.safetensors")) + [out / INDEX]:
        p.unlink(missing_ok=True)
    if len(shards) == 1:
        os.replace(shards[0][0], out / SINGLE)
    else:
        weight_map = {}
        for k, (path, names) in enumerate(shards):
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            os.replace(path, out / name)
            weight_map.update({n: name for n in names})
        total = sum((out / f).stat().st_size for f in set(weight_map.values()))
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return out

