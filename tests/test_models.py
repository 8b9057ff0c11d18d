"""Flax models against transformers' eager PyTorch forward, config parsing, packed vs dense experts.

Fixtures (tests/hf_fixtures.py) build tiny random transformers models, save them sharded
(>= 3 shards), convert them with ``python -m convert`` (in-process) and load them with
``load_pretrained``.  DeepSeek-MoE's reference is DeepseekV2 + LlamaAttention (see hf_fixtures).
"""
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from tests import hf_fixtures as F
from puzzlemoe_jax import load_pretrained
from puzzlemoe_jax import config, models
from puzzlemoe_jax.config import ConfigError, ModelConfig
from puzzlemoe_jax.models import forward

ARCHS = config.ARCHS
TOP_K = {"mixtral": 2, "qwen2_moe": 3, "qwen3_moe": 2, "deepseek": 3, "olmoe": 3}   # softmax routers (models.route)
ROUTER_MARGIN = 0.06   # router-logit gap below which bf16 rounding may legitimately flip top-k


def ours(path, ids=F.IDS, record=None, monkeypatch=None):
    model = load_pretrained(path)
    if record is None:
        return np.asarray(forward(model, jnp.asarray(ids)), np.float32)
    route = models.route   # eager run with the routing decisions recorded

    def recording_route(logits, top_k, norm):
        out = route(logits, top_k, norm)
        record.append(np.asarray(out[0]))
        return out
    monkeypatch.setattr(models, "route", recording_route)
    return np.asarray(model(jnp.asarray(ids)), np.float32)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_fp32(arch):
    ref, _ = F.reference_logits(arch, "float32")
    got = ours(F.converted(arch, "float32"))
    assert got.shape == ref.shape == (*F.IDS.shape, F.VOCAB)
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()


@pytest.mark.parametrize("arch", list(TOP_K))
def test_logits_match_transformers_bf16(arch, monkeypatch):
    """bf16 checkpoint -> bf16 model.  Routing-margin guard: where our top-k differs from the
    reference's, the reference's router gap there must be a near-tie (< ROUTER_MARGIN), and only
    positions before the first such token of each sequence are compared (attention carries a
    flip to later positions)."""
    ref, routers = F.reference_logits(arch, "bfloat16")
    ref32, _ = F.reference_logits(arch, "float32")
    record = []
    got = ours(F.converted(arch, "bfloat16"), record=record, monkeypatch=monkeypatch)
    assert len(record) == len(routers) >= 1
    b, s = F.IDS.shape
    valid = np.full((b, s), True)
    k = TOP_K[arch]
    for our_ids, logits in zip(record, routers):
        top = np.sort(logits, -1)[:, ::-1]
        gap = (top[:, k - 1] - top[:, k]).reshape(b, s)
        theirs = np.argsort(-logits, -1, kind="stable")[:, :k]
        same = np.array([set(a) == set(t) for a, t in zip(our_ids.reshape(-1, k), theirs)]).reshape(b, s)
        assert np.all(same | (gap < ROUTER_MARGIN)), f"routing differs at a clear margin: {gap[~same]}"
        first_flip = np.where((~same).any(1), np.argmax(~same, 1), s)
        valid &= np.arange(s)[None] < first_flip[:, None]
    assert valid.sum() >= b * s // 2, "too many near-tie flips for a meaningful comparison"
    err = np.abs(got - ref).max(-1)[valid]
    bf16_vs_fp32 = np.abs(ref - ref32).max(-1)[valid]
    # no further from transformers-bf16 than transformers-bf16 is from the fp32 result (+slack)
    assert err.max() < max(2 * bf16_vs_fp32.max(), 0.02), (err.max(), bf16_vs_fp32.max())
    assert np.mean(np.abs(got - ref).mean(-1)[valid]) < 0.01


def test_fused_layout_and_tied_embeddings():
    """v5 fused experts (save_original_format=False) and tie_word_embeddings=True."""
    ref, _ = F.reference_logits("qwen3_moe", "float32", tie=True)
    out = F.converted("qwen3_moe", "float32", fused=True, tie=True)
    model = load_pretrained(out)
    assert model.lm_head is None
    assert np.abs(ours(out) - ref).max() < 1e-4


def test_fused_and_hub_layouts_convert_identically():
    hub, fused = load_pretrained(F.converted("mixtral")), load_pretrained(F.converted("mixtral", fused=True))
    from puzzlemoe_jax.checkpoint import flat_params
    a, b = flat_params(hub), flat_params(fused)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_packed_model_equals_decoded_dense_model():
    """A packed layer computes exactly what dense experts holding ``unpack()`` compute."""
    packed = load_pretrained(F.converted("qwen2_moe", ratio=0.5), impl="reference")
    dense = load_pretrained(F.converted("qwen2_moe", ratio=0.5))
    for i, moe in dense.moe_layers().items():
        assert isinstance(moe.experts, models.PackedExpertsModule)
        dense.set_experts(i, moe.experts.weights().unpack(jnp.float32))
        assert isinstance(moe.experts, models.DenseExperts)
    ids = jnp.asarray(F.IDS)
    np.testing.assert_allclose(np.asarray(packed(ids)), np.asarray(dense(ids)), atol=1e-5)
    # merging changes the function, but not beyond recognition
    ref, _ = F.reference_logits("qwen2_moe", "float32")
    assert 1e-4 < np.abs(np.asarray(packed(ids)) - ref).max() < 0.5 * np.abs(ref).max()


def test_set_impl():
    m = load_pretrained(F.converted("mixtral", ratio=0.5))
    m.set_impl("reference")
    assert all(moe.impl == "reference" for moe in m.moe_layers().values())
    with pytest.raises(ValueError, match="impl must be one of"):
        m.set_impl("cuda")
    with pytest.raises(ValueError, match="backend is cpu"):   # never silently the CPU interpreter
        m.set_impl("mosaic")


# ---- config parsing ------------------------------------------------------------------------------


def test_v4_and_v5_config_spellings_agree():
    v5 = MixtralConfig(hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=160, num_local_experts=6, rope_theta=5e5).to_dict()
    assert "rope_parameters" in v5 and "rope_theta" not in v5
    v4 = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 88, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 160, "num_local_experts": 6,
          "num_experts_per_tok": 2, "rope_theta": 5e5, "rope_scaling": None, "torch_dtype": "bfloat16",
          "rms_norm_eps": v5["rms_norm_eps"], "sliding_window": None,
          "max_position_embeddings": v5["max_position_embeddings"]}
    assert ModelConfig.from_hf(v5) == ModelConfig.from_hf(v4)
    assert ModelConfig.from_hf(v4).rope_theta == 5e5
    q3 = Qwen3MoeConfig(num_experts=12, head_dim=24, num_hidden_layers=2).to_dict()   # v5: num_local_experts
    assert "num_experts" not in q3 or q3.get("num_local_experts") == 12
    c = ModelConfig.from_hf(q3)
    assert (c.num_experts, c.head_dim, c.qk_norm, c.shared_intermediate_size) == (12, 24, True, 0)
    q3_hub = {k: v for k, v in q3.items() if k not in ("num_local_experts", "rope_parameters")}
    q3_hub.update(num_experts=12, rope_theta=q3["rope_parameters"]["rope_theta"])
    assert ModelConfig.from_hf(q3_hub) == c


def test_layer_selection():
    q2 = ModelConfig.from_hf(Qwen2MoeConfig(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3],
                                            num_experts=4).to_dict())
    assert q2.moe_layers == (1, 5) and q2.shared_gate and q2.qkv_bias and not q2.o_bias
    ds = dict(model_type="deepseek", vocab_size=10, hidden_size=8, num_hidden_layers=7, num_attention_heads=2,
              intermediate_size=16, moe_intermediate_size=4, n_routed_experts=4, n_shared_experts=3,
              num_experts_per_tok=2, first_k_dense_replace=2, moe_layer_freq=2)
    c = ModelConfig.from_hf(ds)
    assert c.moe_layers == (2, 4, 6) and c.shared_intermediate_size == 12 and not c.shared_gate
    assert c.rope_theta == 10000.0 and not c.norm_topk_prob


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "unknown model_type 'llama'"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
    ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid'"),
    ({"topk_method": "group_limited_greedy", "n_group": 8}, "greedy top-k"),
])
def test_config_errors(change, message):
    base = dict(model_type="deepseek", vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=16, moe_intermediate_size=4, n_routed_experts=4, num_experts_per_tok=2)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf({**base, **change})


def test_fused_qkv_layout_and_round_trip():
    """``fuse_qkv`` groups each kv head's query heads with its key and value head (so a column split by
    kv heads keeps groups whole); ``split_qkv`` gives the stored tensors back, kernels and biases."""
    rng = np.random.default_rng(7)
    heads, kv, d = 6, 2, 4
    for lead in ((5,), ()):
        q, k, v = (rng.standard_normal((*lead, n * d)).astype(np.float32) for n in (heads, kv, kv))
        f = models.fuse_qkv(q, k, v, kv)
        assert f.shape == (*lead, (heads + 2 * kv) * d)
        group = (heads // kv + 2) * d
        np.testing.assert_array_equal(f[..., group:2 * group], np.concatenate(
            [q[..., 3 * d:6 * d], k[..., d:2 * d], v[..., d:2 * d]], -1))   # kv head 1: query heads 3-5
        for got, want in zip(models.split_qkv(f, heads, kv), (q, k, v)):
            np.testing.assert_array_equal(got, want)
