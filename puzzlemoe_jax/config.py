"""Hugging Face ``config.json`` -> ``ModelConfig``: the architectures we support and what differs.

``ModelConfig.from_hf`` reads v4 Hub and v5 ``save_pretrained`` spellings of Mixtral, Qwen2-MoE,
Qwen3-MoE and DeepSeek-MoE configs and refuses options the model cannot represent.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek")


class ConfigError(ValueError):
    """A config.json this library cannot represent (unknown model_type, unsupported option)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs; ``from_hf`` fills it from a config.json dict."""
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int          # dense MLP layers (Qwen mlp_only_layers, DeepSeek first layers)
    moe_intermediate_size: int      # one routed expert
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]     # indices of the MoE layers; the rest use the dense MLP
    norm_topk_prob: bool = False    # renormalise the top-k routing weights (Mixtral: always)
    shared_intermediate_size: int = 0   # 0: no shared expert
    shared_gate: bool = False       # Qwen2-MoE: shared expert output times sigmoid(x @ gate)
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False           # Qwen3-MoE: per-head RMSNorm on q and k before RoPE
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    routed_scaling_factor: float = 1.0

    @property
    def routing_fp32(self) -> bool:
        """Mixtral feeds fp32 routing weights to the experts; the others the activation dtype."""
        return self.model_type == "mixtral"

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Parse a Hugging Face config.json dict (v4 Hub or v5 ``save_pretrained`` spellings)."""
        mt = hf.get("model_type")
        if mt not in ARCHS:
            raise ConfigError(f"unknown model_type {mt!r} in config.json; supported: {', '.join(ARCHS)}")

        def need(*keys):
            for k in keys:
                if hf.get(k) is not None:
                    return hf[k]
            raise ConfigError(f"config.json ({mt}) lacks {' / '.join(keys)}")

        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling")
        rope_type = rope.get("rope_type", (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")))
        if rope_type != "default":
            raise ConfigError(f"rope scaling {rope_type!r} is not supported (only the default RoPE)")
        theta = float(rope.get("rope_theta", hf.get("rope_theta") or (1e6 if mt == "mixtral" else 1e4)))
        h, nh = int(need("hidden_size")), int(need("num_attention_heads"))
        nl = int(need("num_hidden_layers"))
        common = dict(model_type=mt, vocab_size=int(need("vocab_size")), hidden_size=h,
                      num_layers=nl, num_heads=nh,
                      num_kv_heads=int(hf.get("num_key_value_heads") or nh),
                      head_dim=int(hf.get("head_dim") or h // nh),
                      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
        if mt in ("qwen2_moe", "qwen3_moe") and hf.get("use_sliding_window"):
            raise ConfigError(f"{mt}: use_sliding_window=true is not supported")
        if mt == "mixtral":
            return cls(**common, intermediate_size=int(need("intermediate_size")),
                       moe_intermediate_size=int(need("intermediate_size")),
                       num_experts=int(need("num_local_experts", "num_experts")),
                       top_k=int(need("num_experts_per_tok")), moe_layers=tuple(range(nl)),
                       norm_topk_prob=True, sliding_window=hf.get("sliding_window") or None)
        if mt in ("qwen2_moe", "qwen3_moe"):
            e = int(need("num_experts", "num_local_experts"))
            step = int(hf.get("decoder_sparse_step", 1))
            dense = set(hf.get("mlp_only_layers") or [])
            moe = tuple(i for i in range(nl) if i not in dense and e > 0 and (i + 1) % step == 0)
            q2 = mt == "qwen2_moe"
            return cls(**common, intermediate_size=int(need("intermediate_size")),
                       moe_intermediate_size=int(need("moe_intermediate_size")), num_experts=e,
                       top_k=int(need("num_experts_per_tok")), moe_layers=moe,
                       norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                       shared_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0) if q2 else 0,
                       shared_gate=q2, qkv_bias=bool(hf.get("qkv_bias", True)) if q2 else bool(hf.get("attention_bias", False)),
                       o_bias=False if q2 else bool(hf.get("attention_bias", False)), qk_norm=not q2)
        # deepseek (DeepSeek-MoE 16B, remote-code layout)
        if hf.get("scoring_func", "softmax") != "softmax":
            raise ConfigError(f"deepseek: scoring_func {hf['scoring_func']!r} is not supported (softmax only)")
        if hf.get("topk_method", "greedy") != "greedy" or int(hf.get("n_group") or 1) != 1:
            raise ConfigError("deepseek: only greedy top-k routing is supported (DeepSeek-MoE), "
                              "not group-limited routing (DeepSeek-V2/V3)")
        if hf.get("attention_bias"):
            raise ConfigError("deepseek: attention_bias=true is not supported")
        e = int(need("n_routed_experts"))
        first, freq = int(hf.get("first_k_dense_replace", 0)), int(hf.get("moe_layer_freq", 1))
        mi = int(need("moe_intermediate_size"))
        return cls(**common, intermediate_size=int(need("intermediate_size")), moe_intermediate_size=mi,
                   num_experts=e, top_k=int(need("num_experts_per_tok")),
                   moe_layers=tuple(i for i in range(nl) if i >= first and i % freq == 0),
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                   shared_intermediate_size=mi * int(hf.get("n_shared_experts") or 0),
                   routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
