"""Hugging Face ``config.json`` -> ``ModelConfig``: the architectures we support and what differs.

``ModelConfig.from_hf`` reads v4 Hub and v5 ``save_pretrained`` spellings of Mixtral, Qwen2-MoE,
Qwen3-MoE, DeepSeek-MoE, OLMoE, GLM-4.5 (``glm4_moe``) and DeepSeek-V2/V3 configs and refuses
options the model cannot represent (a ``ConfigError`` naming the key).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek", "olmoe", "glm4_moe", "deepseek_v2", "deepseek_v3")
MLA_ARCHS = ("deepseek_v2", "deepseek_v3")
# model_types that reuse an architecture above under another name (Kimi-K2: DeepSeek-V3's, with
# 384 experts, one group and one dense first layer, all expressed by its config's keys)
ALIASES = {"kimi_k2": "deepseek_v3"}
CLI_ARCHS = ARCHS + tuple(ALIASES)   # what ``python -m convert`` accepts


def canonical_arch(model_type):
    """The architecture a config's ``model_type`` names (an alias's target, else itself)."""
    return ALIASES.get(model_type, model_type)


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
    qk_norm: bool = False           # Qwen3-MoE, GLM-4.5: per-head RMSNorm on q and k before RoPE
    qk_norm_full: bool = False      # OLMoE: RMSNorm over the whole q / k projection instead
    rotary_dim: int = 0             # leading head dims that RoPE rotates (GLM partial rotary); 0: all
    # routing (``routing.select_experts``): scores "softmax" or "sigmoid"; top-k "greedy",
    # "group_limited_greedy" (DeepSeek-V2) or "noaux_tc" (sigmoid + e_score_correction_bias, groups)
    scoring: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    router_fp32: bool = False       # router weight (and correction bias) held and applied in fp32
    # Multi-head Latent Attention (DeepSeek-V2/V3): kv_lora_rank > 0 turns it on
    q_lora_rank: int = 0            # 0: plain q_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False   # RoPE on (even, odd) pairs instead of rotate_half halves
    rope_yarn: tuple = ()           # YaRN parameters as sorted (key, value) pairs; () : plain RoPE
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
        """Mixtral, GLM-4.5 and DeepSeek-V2/V3 feed fp32 routing weights to the experts; the others
        the activation dtype."""
        return self.model_type in ("mixtral", "glm4_moe", "deepseek_v2", "deepseek_v3")

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

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
        mt = canonical_arch(hf.get("model_type"))
        if mt not in ARCHS:
            raise ConfigError(f"unknown model_type {hf.get('model_type')!r} in config.json; supported: "
                              f"{', '.join(CLI_ARCHS)}")

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
        if rope_type not in ("default", "yarn") or rope_type == "yarn" and mt not in MLA_ARCHS:
            raise ConfigError(f"rope scaling {rope_type!r} is not supported for {mt} (rope_scaling / rope_parameters; "
                              f"only the default RoPE{', and yarn' if mt in MLA_ARCHS else ''})")
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
        if mt in ("olmoe", "glm4_moe", *MLA_ARCHS):
            return _parse_new(cls, hf, mt, need, common, rope, scaling, rope_type)
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


def _parse_new(cls, hf, mt, need, common, rope, scaling, rope_type) -> "ModelConfig":
    """OLMoE, GLM-4.5 and DeepSeek-V2/V3 (transformers' ``olmoe``/``glm4_moe``/``deepseek_v2``/``deepseek_v3``)."""
    nl = common["num_layers"]
    if mt == "olmoe":
        if hf.get("clip_qkv") is not None:
            raise ConfigError("olmoe: clip_qkv is not supported (must be null)")
        return cls(**common, intermediate_size=need("intermediate_size"), moe_intermediate_size=need("intermediate_size"),
                   num_experts=need("num_experts", "num_local_experts"), top_k=need("num_experts_per_tok"),
                   moe_layers=tuple(range(nl)), norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                   qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
                   qk_norm_full=True)
    for key in ("moe_layer_freq",):
        if hf.int(key, 1) != 1:
            raise ConfigError(f"{mt}: {key} != 1 is not supported (every layer from first_k_dense_replace is MoE)")
    e, mi = need("n_routed_experts", "num_local_experts", "num_experts"), need("moe_intermediate_size")
    v3 = mt == "deepseek_v3"   # transformers' defaults where a key is absent
    first = hf.int("first_k_dense_replace", {"glm4_moe": 1, "deepseek_v2": 0, "deepseek_v3": 3}[mt])
    ng = hf.int("n_group", 1) or 1
    tg = hf.int("topk_group", 1) or 1
    if mt == "deepseek_v2":
        method, scoring = hf.get("topk_method", "greedy"), hf.get("scoring_func", "softmax")
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"deepseek_v2: topk_method {method!r} is not supported (greedy, group_limited_greedy)")
        if hf.get("norm_topk_prob"):
            raise ConfigError("deepseek_v2: norm_topk_prob=true is not supported (transformers' DeepSeek-V2 "
                              "never renormalises; the V2 checkpoints set false)")
    else:
        method, scoring = "noaux_tc", hf.get("scoring_func", "sigmoid")
        if mt == "deepseek_v3" and hf.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ConfigError(f"deepseek_v3: topk_method {hf['topk_method']!r} is not supported (noaux_tc)")
    if scoring != ("softmax" if mt == "deepseek_v2" else "sigmoid"):
        raise ConfigError(f"{mt}: scoring_func {scoring!r} is not supported")
    if method != "greedy" and (e % ng or not 1 <= tg <= ng):
        raise ConfigError(f"{mt}: n_group ({ng}) must divide n_routed_experts ({e}) and topk_group ({tg}) "
                          f"must be in [1, n_group]")
    if method == "noaux_tc" and e // ng < 2:
        raise ConfigError(f"{mt}: noaux_tc routing needs >= 2 experts per group (n_routed_experts / n_group)")
    bias = bool(hf.get("attention_bias", False))
    out = dict(common, intermediate_size=need("intermediate_size"), moe_intermediate_size=mi, num_experts=e,
               top_k=need("num_experts_per_tok"), moe_layers=tuple(range(first, nl)),
               norm_topk_prob=bool(hf.get("norm_topk_prob", mt != "deepseek_v2")),
               shared_intermediate_size=mi * hf.int("n_shared_experts", 2 if mt == "deepseek_v2" else 1),
               routed_scaling_factor=hf.float("routed_scaling_factor", 2.5 if v3 else 1.0),
               scoring=scoring, topk_method=method, n_group=ng, topk_group=tg, router_fp32=True)
    if mt == "glm4_moe":
        prf = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))   # transformers' default: 0.5
        prf = _Checked({"partial_rotary_factor": prf}).float("partial_rotary_factor", 0.5)
        d = common["head_dim"]
        rot = int(d * prf)
        if not (0 < prf <= 1) or rot % 2 or rot == 0:
            raise ConfigError(f"partial_rotary_factor must be in (0, 1] with an even rotary dim, got {prf} "
                              f"(head_dim {d})")
        return cls(**out, qkv_bias=bias, qk_norm=bool(hf.get("use_qk_norm", False)), rotary_dim=rot)
    # DeepSeek-V2/V3: Multi-head Latent Attention
    if bias:
        raise ConfigError(f"{mt}: attention_bias=true is not supported")
    nh = common["num_heads"]
    if hf.int("num_key_value_heads", nh) != nh:
        raise ConfigError(f"{mt}: num_key_value_heads must equal num_attention_heads for MLA, "
                          f"got {hf.get('num_key_value_heads')}")
    mla = dict(q_lora_rank=hf.int("q_lora_rank", 0) or 0, kv_lora_rank=need("kv_lora_rank"),
               qk_nope_head_dim=need("qk_nope_head_dim"), qk_rope_head_dim=need("qk_rope_head_dim"),
               v_head_dim=need("v_head_dim"))
    for k, v in mla.items():
        if v < (0 if k == "q_lora_rank" else 1) or k == "qk_rope_head_dim" and v % 2:
            raise ConfigError(f"{k} must be {'>= 0' if k == 'q_lora_rank' else '> 0'}"
                              f"{' and even' if k == 'qk_rope_head_dim' else ''}, got {v}")
    yarn = ()
    if rope_type == "yarn":
        p = _Checked(rope if rope.get("rope_type") == "yarn" else scaling, "rope_scaling.")
        vals = {"factor": p.float("factor"), "beta_fast": p.float("beta_fast", 32.0) or 32.0,
                "beta_slow": p.float("beta_slow", 1.0) or 1.0, "mscale": p.float("mscale", 0.0) or 0.0,
                "mscale_all_dim": p.float("mscale_all_dim", 0.0) or 0.0,
                "attention_factor": p.float("attention_factor", 0.0) or 0.0,
                "original_max_position_embeddings": p.int("original_max_position_embeddings",
                                                          common["max_position_embeddings"]),
                "truncate": bool(p.get("truncate", True))}
        if vals["factor"] is None or not vals["original_max_position_embeddings"]:
            raise ConfigError("yarn rope scaling needs factor and original_max_position_embeddings")
        for k in ("factor", "beta_fast", "beta_slow", "original_max_position_embeddings"):
            if not (math.isfinite(vals[k]) and vals[k] > 0):
                raise ConfigError(f"rope_scaling.{k} must be a finite number > 0, got {vals[k]}")
        for k in ("mscale", "mscale_all_dim", "attention_factor"):
            if not (math.isfinite(vals[k]) and vals[k] >= 0):
                raise ConfigError(f"rope_scaling.{k} must be a finite number >= 0, got {vals[k]}")
        if common["rope_theta"] <= 1:
            raise ConfigError(f"rope_theta must be > 1 with yarn scaling, got {common['rope_theta']}")
        yarn = tuple(sorted(vals.items()))
    return cls(**{**out, "head_dim": mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"]}, **mla,
               rope_interleave=bool(hf.get("rope_interleave", True)), rope_yarn=yarn)


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
        if abs(v) >= 2 ** 31:   # sizes and counts are int32 everywhere downstream
            raise ConfigError(f"{self.prefix}{key} must be below 2**31, got {v!r}")
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
