"""Hugging Face ``config.json`` -> ``ModelConfig``: the architectures we support and what differs.

``ModelConfig.from_hf`` reads v4 Hub and v5 ``save_pretrained`` spellings of Mixtral, Qwen2-MoE,
Qwen3-MoE and DeepSeek-MoE configs and refuses options the model cannot represent.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek")


class ContextError(ValueError):
    """More positions than the model's ``max_position_embeddings``."""


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
    max_position_embeddings: int | None = None   # the context; None: unknown, unchecked

    def check_context(self, n: int, what: str, where="config.json") -> None:
        """Refuse ``n`` positions beyond the model's context (``max_position_embeddings``)."""
        if self.max_position_embeddings is not None and n > self.max_position_embeddings:
            raise ContextError(f"{what} is {n} positions, above the model's context of "
                               f"{self.max_position_embeddings} (max_position_embeddings in {where})")

    @property
    def routing_fp32(self) -> bool:
        """Mixtral feeds fp32 routing weights to the experts; the others the activation dtype."""
        return self.model_type == "mixtral"

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Parse a Hugging Face config.json dict (v4 Hub or v5 ``save_pretrained`` spellings) and
        check every value the model reads (types, sizes > 0, top-k, head divisibility, theta, eps,
        window); each mistake is a ``ConfigError`` naming the key."""
        if not isinstance(hf, Mapping):
            raise ConfigError(f"expected a JSON object, got {type(hf).__name__}")
        cfg = cls._parse(_Checked(hf))
        _validate(cfg)
        return cfg

    @classmethod
    def _parse(cls, hf: "_Checked") -> "ModelConfig":
        mt = hf.get("model_type")
        if mt not in ARCHS:
            raise ConfigError(f"unknown model_type {mt!r} in config.json; supported: {', '.join(ARCHS)}")

        def need(*keys):
            for k in keys:
                if hf.get(k) is not None:
                    return hf.int(k)
            raise ConfigError(f"config.json ({mt}) lacks {' / '.join(keys)}")

        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling")
        for key, v in (("rope_parameters", rope), ("rope_scaling", scaling)):
            if v is not None and not isinstance(v, Mapping):
                raise ConfigError(f"{key} must be an object or null, got {v!r}")
        rope_type = rope.get("rope_type", (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")))
        if rope_type != "default":
            raise ConfigError(f"rope scaling {rope_type!r} is not supported (only the default RoPE)")
        theta = (_Checked(rope, "rope_parameters.").float("rope_theta") if "rope_theta" in rope
                 else hf.float("rope_theta") if hf.get("rope_theta") is not None else (1e6 if mt == "mixtral" else 1e4))
        h, nh = (need("hidden_size")), (need("num_attention_heads"))
        nl = (need("num_hidden_layers"))
        common = dict(model_type=mt, vocab_size=(need("vocab_size")), hidden_size=h,
                      num_layers=nl, num_heads=nh,
                      num_kv_heads=hf.int("num_key_value_heads", nh),
                      head_dim=hf.int("head_dim", h // nh if nh > 0 else 0),
                      rms_norm_eps=hf.float("rms_norm_eps", 1e-6), rope_theta=theta,
                      max_position_embeddings=hf.int("max_position_embeddings", None),
                      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
        if mt in ("qwen2_moe", "qwen3_moe") and hf.get("use_sliding_window"):
            raise ConfigError(f"{mt}: use_sliding_window=true is not supported")
        if mt == "mixtral":
            return cls(**common, intermediate_size=(need("intermediate_size")),
                       moe_intermediate_size=(need("intermediate_size")),
                       num_experts=(need("num_local_experts", "num_experts")),
                       top_k=(need("num_experts_per_tok")), moe_layers=tuple(range(nl)),
                       norm_topk_prob=True, sliding_window=hf.int("sliding_window", None))
        if mt in ("qwen2_moe", "qwen3_moe"):
            e = (need("num_experts", "num_local_experts"))
            step = _positive("decoder_sparse_step", hf.int("decoder_sparse_step", 1))
            dense = set(hf.int_list("mlp_only_layers"))
            moe = tuple(i for i in range(nl) if i not in dense and e > 0 and (i + 1) % step == 0)
            q2 = mt == "qwen2_moe"
            return cls(**common, intermediate_size=(need("intermediate_size")),
                       moe_intermediate_size=(need("moe_intermediate_size")), num_experts=e,
                       top_k=(need("num_experts_per_tok")), moe_layers=moe,
                       norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                       shared_intermediate_size=hf.int("shared_expert_intermediate_size", 0) if q2 else 0,
                       shared_gate=q2, qkv_bias=bool(hf.get("qkv_bias", True)) if q2 else bool(hf.get("attention_bias", False)),
                       o_bias=False if q2 else bool(hf.get("attention_bias", False)), qk_norm=not q2)
        # deepseek (DeepSeek-MoE 16B, remote-code layout)
        if hf.get("scoring_func", "softmax") != "softmax":
            raise ConfigError(f"deepseek: scoring_func {hf['scoring_func']!r} is not supported (softmax only)")
        if hf.get("topk_method", "greedy") != "greedy" or hf.int("n_group", 1) != 1:
            raise ConfigError("deepseek: only greedy top-k routing is supported (DeepSeek-MoE), "
                              "not group-limited routing (DeepSeek-V2/V3)")
        if hf.get("attention_bias"):
            raise ConfigError("deepseek: attention_bias=true is not supported")
        e = (need("n_routed_experts"))
        first, freq = hf.int("first_k_dense_replace", 0), _positive("moe_layer_freq", hf.int("moe_layer_freq", 1))
        mi = (need("moe_intermediate_size"))
        return cls(**common, intermediate_size=(need("intermediate_size")), moe_intermediate_size=mi,
                   num_experts=e, top_k=(need("num_experts_per_tok")),
                   moe_layers=tuple(i for i in range(nl) if i >= first and i % freq == 0),
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                   shared_intermediate_size=mi * hf.int("n_shared_experts", 0),
                   routed_scaling_factor=hf.float("routed_scaling_factor", 1.0))


class _Checked:
    """A config dict whose typed getters raise ``ConfigError`` naming the key (null -> default)."""

    def __init__(self, d: Mapping[str, Any], prefix: str = ""):
        self.d, self.prefix = d, prefix

    def get(self, key, default=None):
        return self.d.get(key, default)

    def __getitem__(self, key):
        return self.d[key]

    def int(self, key, default=None):
        v = self.d.get(key)
        if v is None:
            return default
        whole = isinstance(v, int) or (isinstance(v, float) and math.isfinite(v) and v == int(v))
        if isinstance(v, bool) or not whole:
            raise ConfigError(f"{self.prefix}{key} must be an integer, got {v!r}")
        return int(v)

    def float(self, key, default=None):
        v = self.d.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{self.prefix}{key} must be a number, got {v!r}")
        return float(v)

    def int_list(self, key):
        v = self.d.get(key) or []
        if not isinstance(v, list):
            raise ConfigError(f"{self.prefix}{key} must be a list of integers, got {v!r}")
        return [_Checked({key: x}, self.prefix).int(key) for x in v]


def _positive(key, v):
    if v < 1:
        raise ConfigError(f"{key} must be >= 1, got {v}")
    return v


def _validate(c: ModelConfig) -> None:
    """Value checks of a parsed config, each naming the config.json key at fault."""
    for key, v in (("vocab_size", c.vocab_size), ("hidden_size", c.hidden_size),
                   ("num_hidden_layers", c.num_layers), ("num_attention_heads", c.num_heads),
                   ("num_key_value_heads", c.num_kv_heads), ("head_dim", c.head_dim),
                   ("intermediate_size", c.intermediate_size), ("moe_intermediate_size", c.moe_intermediate_size)):
        if v <= 0:
            raise ConfigError(f"{key} must be > 0, got {v}")
    if c.moe_layers and c.num_experts <= 0:
        raise ConfigError(f"the number of experts must be > 0, got {c.num_experts}")
    if c.moe_layers and not 1 <= c.top_k <= c.num_experts:
        raise ConfigError(f"num_experts_per_tok must be in [1, {c.num_experts}] (the number of experts), got {c.top_k}")
    if c.num_heads % c.num_kv_heads:
        raise ConfigError(f"num_attention_heads ({c.num_heads}) must be a multiple of "
                          f"num_key_value_heads ({c.num_kv_heads})")
    if c.shared_intermediate_size < 0:
        raise ConfigError(f"shared expert size must be >= 0, got {c.shared_intermediate_size}")
    for key, v in (("rope_theta", c.rope_theta), ("rms_norm_eps", c.rms_norm_eps),
                   ("routed_scaling_factor", c.routed_scaling_factor)):
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{key} must be a finite number > 0, got {v}")
    if c.max_position_embeddings is not None and c.max_position_embeddings < 1:
        raise ConfigError(f"max_position_embeddings must be null or >= 1, got {c.max_position_embeddings}")
    if c.sliding_window is not None and c.sliding_window < 1:
        raise ConfigError(f"sliding_window must be null or >= 1, got {c.sliding_window}")
