"""OLMoE, GLM-4.5 and DeepSeek-V2/V3 (issue #20): parity with transformers, generation, the MLA
cache, the routers, FP8 checkpoints, merging and refused configs.

Reference models are native transformers ones (tests/hf_fixtures.FAMILIES), saved sharded in the
Hub layout and converted with ``python -m convert``.
"""
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from tests import hf_fixtures as F
from tests.test_generate import PROMPTS, hf_greedy
from puzzlemoe_jax import load_pretrained
from puzzlemoe_jax.checkpoint import flat_params
from puzzlemoe_jax.config import ConfigError, ModelConfig
from puzzlemoe_jax.generate import generate
from puzzlemoe_jax.mla import MLAttention
from puzzlemoe_jax.models import forward
from puzzlemoe_jax.random_checkpoint import tiny_config, write_tiny_checkpoint
from puzzlemoe_jax.safetensors_io import SafetensorsDir

FAMILIES = list(F.FAMILIES)


@pytest.mark.parametrize("arch", FAMILIES)
def test_logits_match_transformers_fp32(arch):
    ref, _ = F.reference_logits(arch)
    got = np.asarray(forward(load_pretrained(F.converted(arch)), jnp.asarray(F.IDS)))
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()


def test_deepseek_v3_rotate_half_rope(tmp_path):
    """rope_interleave=false: RoPE on halves instead of pairs, also equal to transformers."""
    import torch
    from convert import main
    cls, cfg = F.FAMILIES["deepseek_v3"](False)
    cfg.rope_interleave = False
    torch.manual_seed(0)
    m = cls(cfg).eval()
    src = F.save(m, None, tmp_path / "src")
    assert main(["deepseek_v3", "--src", str(src), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    ref, _ = F.reference(m, F.IDS)
    got = np.asarray(forward(load_pretrained(tmp_path / "out"), jnp.asarray(F.IDS)))
    assert np.abs(got - ref).max() < 1e-4


def test_kimi_k2_converts_as_deepseek_v3(tmp_path):
    """Kimi-K2's config.json names its DeepSeek-V3 architecture ``kimi_k2`` (one expert group, one
    dense first layer, routed_scaling_factor 2.827): ``python -m convert kimi_k2`` converts it, the
    logits equal transformers' DeepSeek-V3, and the converted checkpoint loads back."""
    import torch
    from convert import main
    cls, cfg = F.FAMILIES["deepseek_v3"](False)
    cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor = 1, 1, 2.827
    torch.manual_seed(11)
    m = cls(cfg).eval()
    with torch.no_grad():
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    src = F.save(m, None, tmp_path / "src")
    hf = json.loads((src / "config.json").read_text())
    hf["model_type"] = "kimi_k2"
    (src / "config.json").write_text(json.dumps(hf))
    assert main(["kimi_k2", "--src", str(src), "--out", str(tmp_path / "out"), "--ratio", "0.25", "--quiet"]) == 0
    assert main(["kimi_k2", "--src", str(src), "--out", str(tmp_path / "dense"), "--quiet"]) == 0
    ref, _ = F.reference(m, F.IDS)
    model = load_pretrained(tmp_path / "dense")
    assert model.config.model_type == "deepseek_v3"
    got = np.asarray(forward(model, jnp.asarray(F.IDS)))
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "kimi_k2"
    packed = np.asarray(forward(load_pretrained(tmp_path / "out"), jnp.asarray(F.IDS)))
    assert np.isfinite(packed).all() and packed.shape == ref.shape


def test_kimi_k2_checkpoint_refused_under_another_arch(tmp_path, capsys):
    """A kimi_k2 checkpoint converted as mixtral names the right command."""
    from convert import main
    src = F.converted("deepseek_v3")   # any DeepSeek-V3 source, relabelled in a copy of its config
    dst = tmp_path / "src"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / "config.json").unlink()
    hf = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(hf, model_type="kimi_k2")))
    assert main(["mixtral", "--src", str(dst), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "python -m convert kimi_k2" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", FAMILIES)
def test_greedy_matches_transformers(arch):
    model = load_pretrained(F.converted(arch))
    got = generate(model, PROMPTS, 10)
    assert got == hf_greedy(arch, PROMPTS, 10)


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_mla_cache_holds_latents_and_absorbed_decode_equals_plain(arch):
    """The cache is (latent, rope key) per token; the absorbed path (a 7-token prefill, then a one-token
    decode step) gives the plain path's logits, and both equal the uncached forward."""
    model = load_pretrained(F.converted(arch))
    cfg = model.config
    ids = jnp.asarray(F.IDS)
    b, s = ids.shape
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    valid = jnp.ones((b, s), bool)

    def cached(absorb):
        for layer in model.layers:
            assert isinstance(layer.attn, MLAttention)
            layer.attn.absorb = absorb
        cache = model.init_cache(b, s)
        assert cache[0][0].shape == (b, s, cfg.kv_lora_rank) and cache[0][1].shape == (b, s, cfg.qk_rope_head_dim)
        out, step = [], nnx.jit(lambda m, *args: m.forward_cached(*args))
        for a, z in ((0, 7), (7, 8)):
            logits, cache = step(model, ids[:, a:z], pos[:, a:z], valid, cache, jnp.int32(a))
            out.append(np.asarray(logits))
        return np.concatenate(out, 1)

    absorbed, plain = cached(True), cached(False)
    np.testing.assert_allclose(absorbed, plain, atol=2e-5)
    np.testing.assert_allclose(absorbed, np.asarray(forward(model, ids)), atol=2e-5)


@pytest.mark.parametrize("arch", FAMILIES)
def test_merge_on_family_expert_shapes(arch):
    """Ratio 0.25 here (0.5: tests/test_convert.py's round trip over every arch): each MoE layer
    gets E/4 packed pairs and computes what dense experts holding the decoded pairs compute."""
    out = F.converted(arch, ratio=0.25)
    section = json.loads((out / "config.json").read_text())["puzzlemoe"]
    packed, dense = load_pretrained(out, impl="reference"), load_pretrained(out)
    assert set(section["packed_pairs"]) == {str(i) for i in packed.config.moe_layers}
    assert all(v == packed.config.num_experts // 4 for v in section["packed_pairs"].values())
    for i, moe in dense.moe_layers().items():
        dense.set_experts(i, moe.experts.weights().unpack(jnp.float32))
    ids = jnp.asarray(F.IDS)
    got = np.asarray(packed(ids))
    np.testing.assert_allclose(got, np.asarray(dense(ids)), atol=1e-5)
    ref, _ = F.reference_logits(arch)
    assert np.isfinite(got).all() and np.abs(got - ref).max() > 1e-4


def test_fp8_block_scaled_checkpoint_is_dequantized(tmp_path):
    """e4m3 weights with 128x128 ``weight_scale_inv`` blocks (partial edge blocks included) convert
    to exactly ``fp8 * scale``; routers, norms and embeddings stay in the checkpoint's dtype."""
    src = write_tiny_checkpoint(tmp_path / "src", "deepseek_v3", hidden_size=192, num_heads=4,
                                moe_intermediate_size=136, num_experts=4, top_k=2, dtype="float32", vocab_size=160)
    ckpt = SafetensorsDir(src)
    rng = np.random.default_rng(0)
    want, quantized = {}, 0
    for f in sorted({i.file for i in ckpt.tensors.values()}):
        names = [n for n, i in ckpt.tensors.items() if i.file == f]
        out = {}
        for n in names:
            a = ckpt.read(n)
            if a.ndim == 2 and n.endswith("proj.weight"):
                m, k = a.shape
                scale = rng.uniform(1.0, 2.0, (-(-m // 128), -(-k // 128))).astype(np.float32) * np.abs(a).max() / 448
                full = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:m, :k]
                q = (a / full).astype(ml_dtypes.float8_e4m3fn)
                out[n], out[n + "_scale_inv"] = q, scale
                want[n] = q.astype(np.float32) * full
                quantized += 1
            else:
                out[n] = a
        if "model.embed_tokens.weight" in names:   # a multi-token-prediction layer past num_hidden_layers: ignored
            out["model.layers.2.eh_proj.weight"] = np.zeros((192, 384), np.float32)
        save_file(out, f)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update({n + "_scale_inv": index["weight_map"][n] for n in want})
    index["weight_map"]["model.layers.2.eh_proj.weight"] = ckpt.tensors["model.embed_tokens.weight"].file.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert quantized > 20 and any(SafetensorsDir(src).tensors[n].shape[0] > 128 for n in want)
    from convert import main
    assert main(["deepseek_v3", "--src", str(src), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    params = flat_params(load_pretrained(tmp_path / "out"))
    assert params["layers.1.mlp.router.kernel"].dtype == np.float32
    from puzzlemoe_jax.conversion import convert_checkpoint
    convert_checkpoint(src, tmp_path / "out_raw", "deepseek_v3", device_layout=True)   # the accelerators' read path
    raw_params = flat_params(load_pretrained(tmp_path / "out_raw"))
    for n, w in params.items():
        np.testing.assert_array_equal(raw_params[n], w, err_msg=n)
    checked = 0
    for n, w in want.items():   # model.layers.L.mlp.experts.E.gate_proj.weight
        if ".experts." in n:
            _, _, layer, _, _, e, proj, _ = n.split(".")
            mat = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}[proj]
            np.testing.assert_array_equal(params[f"layers.{layer}.mlp.experts.{mat}"][int(e)], w.T, err_msg=n)
            checked += 1
    kv_b = "model.layers.1.self_attn.kv_b_proj.weight"
    np.testing.assert_array_equal(params["layers.1.attn.kv_b_proj.kernel"], want[kv_b].T)
    assert checked == 4 * 3   # one MoE layer (layer 0 is dense), 4 experts
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_v4_hub_spelling_of_yarn_and_glm_rotary_default():
    """DeepSeek Hub config.json (``rope_scaling`` with ``type``, top-level rope_theta) parses like the
    v5 spelling; GLM's partial_rotary_factor defaults to 0.5 as in transformers."""
    v5 = F.FAMILIES["deepseek_v3"](False)[1].to_dict()
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    rp = dict(v5["rope_parameters"])
    v4.update(rope_theta=rp.pop("rope_theta"), rope_scaling={"type": rp.pop("rope_type"), **rp})
    assert ModelConfig.from_hf(v4) == ModelConfig.from_hf(v5)
    glm = tiny_config("glm4_moe")
    del glm["partial_rotary_factor"]
    assert ModelConfig.from_hf(glm).rotary_dim == glm["head_dim"] // 2


BAD = [
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
    ("glm4_moe", {"n_group": 3}, "n_group"),
    ("glm4_moe", {"topk_group": 5}, "topk_group"),
    ("glm4_moe", {"scoring_func": "softmax"}, "scoring_func"),
    ("glm4_moe", {"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ("glm4_moe", {"moe_layer_freq": 2}, "moe_layer_freq"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method"),
    ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("deepseek_v3", {"topk_method": "greedy"}, "topk_method"),
    ("deepseek_v3", {"num_key_value_heads": 2}, "num_key_value_heads"),
    ("deepseek_v3", {"attention_bias": True}, "attention_bias"),
    ("deepseek_v3", {"kv_lora_rank": None}, "kv_lora_rank"),
    ("deepseek_v3", {"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ("deepseek_v3", {"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope scaling 'longrope'"),
    ("deepseek_v3", {"rope_scaling": {"type": "yarn", "factor": "x"}}, "rope_scaling.factor"),
    ("glm4_moe", {"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope scaling 'yarn' is not supported for glm4_moe"),
]


@pytest.mark.parametrize("arch, change, msg", BAD)
def test_bad_config_refused(arch, change, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_hf({**tiny_config(arch), **change})

