"""Baselines (reap, naee, hc-smoe, wanda-2:4), the paper's settings and the extra pairings, each on a
planted case whose right answer is known; NaN never passes."""
import json

import numpy as np
import pytest
import torch

from convert import main as convert_main
from puzzlemoe_jax import baselines, calibrate, load_pretrained
from puzzlemoe_jax.compress import compress_layer
from puzzlemoe_jax.merge import MergeConfig, merge_rule
from puzzlemoe_jax.pairing import choose_pairs, coactivation_costs, pair_share
from puzzlemoe_jax.random_checkpoint import write_tiny_checkpoint
from tests import hf_fixtures as F

E, H, I = 8, 16, 8


def weights(seed=0, e=E):
    r = np.random.default_rng(seed)
    return {"w_gate": r.normal(size=(e, H, I)).astype(np.float32), "w_up": r.normal(size=(e, H, I)).astype(np.float32),
            "w_down": r.normal(size=(e, I, H)).astype(np.float32)}


def finite(*arrays):
    return all(np.all(np.isfinite(np.asarray(a, np.float64))) for a in arrays)


def test_reap_drops_the_lowest_scores_and_calibrate_computes_them():
    cal = {"reap": np.array([5.0, 0.1, 3.0, 0.2, 9.0, 4.0, 0.3, 7.0])}
    assert baselines.reap_drop(cal, 3).tolist() == [1, 3, 6]
    # calibrate's REAP score: mean over routed tokens of renormalised top-k weight x ||f_e(x)||, vs torch
    model = load_pretrained(F.converted("mixtral"), impl="reference")
    tokens = np.random.default_rng(3).integers(0, F.VOCAB, 2 * 16)
    stats = calibrate.calibrate(model, tokens, seq_len=16, batch_size=2)
    hf = F.model("mixtral")[0]
    captured = {}
    hooks = [l.mlp.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, i[0]))
             for k, l in enumerate(hf.model.layers)]
    with torch.no_grad():
        hf(torch.as_tensor(tokens.reshape(2, 16)))
        for h in hooks:
            h.remove()
        for layer, x in captured.items():
            mlp, x = hf.model.layers[layer].mlp, captured[layer].reshape(-1, captured[layer].shape[-1]).double()
            p = torch.softmax(x @ mlp.gate.weight.double().T, -1)
            w, top = torch.topk(p, hf.config.num_experts_per_tok, -1)
            w = w / w.sum(-1, keepdim=True)
            ref, coact = np.zeros(p.shape[1]), np.zeros((p.shape[1],) * 2)
            for e in range(p.shape[1]):
                rows = (top == e).any(-1)
                gu, down = mlp.experts.gate_up_proj[e].double(), mlp.experts.down_proj[e].double()
                n = gu.shape[0] // 2
                y = (torch.nn.functional.silu(x[rows] @ gu[:n].T) * (x[rows] @ gu[n:].T)) @ down.T
                ref[e] = (w[top == e] * y.norm(dim=-1)).mean().item() if rows.any() else 0.0
                for f in range(p.shape[1]):
                    coact[e, f] = ((top == e).any(-1) & (top == f).any(-1)).sum().item()
            np.testing.assert_allclose(stats[layer]["reap"], ref, rtol=2e-3, atol=1e-6)
            np.testing.assert_array_equal(stats[layer]["coactivation"], coact)
            assert finite(stats[layer]["mean_output"]) and stats[layer]["samples"]["x"].shape[0] == 32


@pytest.mark.parametrize("limit", [10_000, 1])   # exhaustive, greedy
def test_naee_drops_the_experts_whose_removal_leaves_the_output_unchanged(limit):
    w = weights(1)
    x = np.random.default_rng(2).normal(size=(64, H)).astype(np.float32)
    logits = np.random.default_rng(3).normal(size=(64, E))
    logits[:, [2, 5]] = -50.0    # never in any token's top-2: dropping them changes nothing
    cal = {"samples": {"x": x, "logits": logits}, "top_k": 2, "norm_topk_prob": True}
    dropped, info = baselines.naee_drop(w, cal, 2, limit=limit)
    assert dropped.tolist() == [2, 5] and info["error"] < 1e-6
    assert info["search"] == ("exhaustive" if limit > 28 else "greedy")
    # dropping a used expert costs something
    _, info3 = baselines.naee_drop(w, cal, 3, limit=limit)
    assert info3["error"] > 1e-3 and np.isfinite(info3["error"])


def test_hc_smoe_clusters_mean_outputs_and_frequency_averages_each_group():
    base = np.eye(3)[[0, 0, 0, 1, 1, 2, 2, 2]] * 5.0
    mean_out = base + np.random.default_rng(0).normal(scale=0.01, size=base.shape)
    cal = {"mean_output": mean_out}
    labels = baselines.hc_smoe_groups(cal, 3)
    assert len(set(labels[:3])) == len(set(labels[3:5])) == len(set(labels[5:])) == 1 and len(set(labels)) == 3
    w = weights(4)
    freq = np.array([1, 1, 2, 1, 3, 1, 1, 0], np.float64)
    merged = baselines.hc_smoe_weights(w, labels, freq)
    want = (w["w_up"][0] + w["w_up"][1] + 2 * w["w_up"][2]) / 4
    np.testing.assert_allclose(merged["w_up"][1], want, rtol=1e-5)
    np.testing.assert_allclose(merged["w_up"][4], (w["w_up"][3] + 3 * w["w_up"][4]) / 4, rtol=1e-5)
    packed, stats = compress_layer(w, 0.5, MergeConfig(method="hc-smoe"), calibration={**cal, "frequencies": freq})
    # 3 clusters asked for 4 groups: the target is E - ratio*E = 4 groups
    assert len(set(stats["groups"].tolist())) == 4 and packed.pairs.shape[0] == 0 and packed.dense_ids.size == E
    assert finite(*packed.dense.values())


def test_wanda_2_4_keeps_exactly_two_of_four_by_weight_times_activation_norm():
    w = {n: np.ones_like(v) for n, v in weights(0, e=1).items()}
    w["w_up"][0, :4, 0] = [4.0, 3.0, 2.0, 1.0]
    imp = {"w_gate": np.ones((1, H)), "w_up": np.ones((1, H)), "w_down": np.ones((1, I))}
    imp["w_up"][0, :4] = [1.0, 1.0, 100.0, 100.0]    # |W| sqrt(E x^2): 4, 3, 20, 10 -> keep rows 2, 3
    out = baselines.wanda_2_4(w, imp)
    assert out["w_up"][0, :4, 0].tolist() == [0.0, 0.0, 2.0, 1.0]
    for n, v in out.items():
        nz = (v != 0).reshape(1, -1, 4, v.shape[-1]).sum(2)
        assert np.all(nz == 2) and finite(v)


def test_paper_similarity_rule_equals_its_max_rule_threshold():
    cfg = MergeConfig.paper(seed=0)
    a, b = np.random.default_rng(0).uniform(0, 1, (2, 20000)).astype(np.float32)
    similar, _, _ = merge_rule(a, b, a, b, np.float32(cfg.max_threshold))
    want = np.abs(a - b) / (a + b) <= 0.4
    near = np.abs(np.abs(a - b) / (a + b) - 0.4) < 1e-5    # float ties
    assert np.array_equal(np.asarray(similar)[~near], want[~near])
    assert abs(cfg.max_threshold - 0.8 / 1.4) < 1e-12 and cfg.saliency == "wanda" and cfg.pairing == "random"


def test_wanda_saliency_weighs_by_the_tokens_routed_to_each_expert():
    w = {n: np.ones_like(v) for n, v in weights(0, e=2).items()}
    w["w_up"][1] *= 1.5                                  # expert 1 larger everywhere
    imp = {n: np.ones((2, v.shape[1])) for n, v in w.items()}
    cal = {"importance": imp, "counts": np.array([100.0, 1.0])}   # expert 0 saw 100x the tokens
    cfg = MergeConfig(similarity_threshold=0.0)
    _, st_act = compress_layer(w, 0.5, MergeConfig(similarity_threshold=0.0, saliency="activation"), calibration=cal)
    _, st_wanda = compress_layer(w, 0.5, MergeConfig(similarity_threshold=0.0, saliency="wanda"), calibration=cal)
    assert st_act["w_up"]["frac_salient_j"][0] == 1.0       # E[x^2] alone: the larger expert wins
    assert st_wanda["w_up"]["frac_salient_i"][0] == 1.0     # ||X||^2 = 100 vs 1: expert 0 wins
    assert cfg.similarity_threshold == 0.0


def test_cosine_and_coactivation_pairings_find_planted_pairs():
    r = np.random.default_rng(0)
    base = weights(5, e=4)
    w = {n: np.stack([v[0], v[0] + 0.05 * r.normal(size=v[0].shape), v[2], v[2] + 0.05 * r.normal(size=v[0].shape)])
         .astype(np.float32)[[0, 2, 1, 3]] for n, v in base.items()}    # similar pairs: (0, 2) and (1, 3)
    assert choose_pairs(w, 2, MergeConfig(pairing="cosine")).tolist() == [[0, 2], [1, 3]]
    coact = np.array([[9, 1, 0, 8], [1, 9, 7, 0], [0, 7, 9, 1], [8, 0, 1, 9]])
    assert choose_pairs(w, 2, MergeConfig(pairing="coactivation"), coactivation=coact).tolist() == [[0, 3], [1, 2]]
    assert choose_pairs(w, 1, MergeConfig(pairing="coactivation"), coactivation=coact).tolist() == [[0, 3]]
    # weight 0: the merge error alone decides, as min_error does
    assert (choose_pairs(w, 2, MergeConfig(pairing="coactivation", coactivation_weight=0.0), coactivation=coact)
            .tolist() == choose_pairs(w, 2, MergeConfig()).tolist() == [[0, 2], [1, 3]])
    assert np.all(np.isfinite(coactivation_costs(coact)[~np.eye(4, dtype=bool)]))
    with pytest.raises(ValueError, match="coactivation"):
        choose_pairs(w, 2, MergeConfig(pairing="coactivation"))


def test_random_pairing_is_seeded_per_layer_and_disjoint():
    w = weights(0)
    p = lambda seed, layer, n=4: choose_pairs(w, n, MergeConfig(pairing="random", seed=seed), layer=layer)
    assert np.array_equal(p(0, 0), p(0, 0)) and not np.array_equal(p(0, 0), p(1, 0))
    assert not np.array_equal(p(0, 0), p(0, 1))
    for pairs in (p(3, 2), p(3, 2, 2)):
        assert len(set(pairs.ravel().tolist())) == pairs.size and np.all(pairs[:, 0] < pairs[:, 1])


def test_pair_share_counts_matrices_read_per_token():
    ids = np.array([[0, 1], [0, 2], [3, 2], [4, 5]])
    pairs = np.array([[0, 1], [2, 3]])
    s = pair_share(ids, pairs, 6)
    assert s["matrices_per_token"] == (1 + 2 + 1 + 2) / 4 and s["shared_fraction"] == 0.5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A byte-level tiny Mixtral checkpoint, its calibration text and statistics."""
    tmp = tmp_path_factory.mktemp("baselines")
    src = write_tiny_checkpoint(tmp / "hf", "mixtral", vocab_size=256, num_experts=8)
    tokens = np.random.default_rng(4).integers(0, 128, 512)
    (tmp / "cal.txt").write_bytes(bytes(int(t) for t in tokens))
    cal = calibrate.calibrate(load_pretrained(convert_checkpoint_dense(src, tmp / "dense"), impl="reference"),
                              tokens, seq_len=32)
    return src, tmp / "cal.txt", cal, tokens


def convert_checkpoint_dense(src, out):
    from puzzlemoe_jax.conversion import convert_checkpoint  # noqa: PLC0415
    convert_checkpoint(src, out, "mixtral")
    return out


@pytest.mark.parametrize("method", ["reap", "naee", "hc-smoe", "wanda-2:4"])
def test_baselines_convert_and_load(tmp_path, tiny, method):
    from puzzlemoe_jax.conversion import convert_checkpoint  # noqa: PLC0415
    src, _, cal, tokens = tiny
    out = tmp_path / "o"
    convert_checkpoint(src, out, "mixtral", ratio=0.5, merge=MergeConfig(method=method), calibration=cal)
    section = json.loads((out / "config.json").read_text())["puzzlemoe"]
    assert sum(section["dropped_experts"].values()) == (8 if method in ("reap", "naee") else 0)
    model = load_pretrained(out, impl="reference")
    assert finite(model(np.asarray(tokens[:64]).reshape(2, 32).astype(np.int32)))
    if method == "wanda-2:4":
        w = model.moe_layers()[0].experts.weights()["w_up"]
        assert np.all((np.asarray(w, np.float32) != 0).reshape(w.shape[0], -1, 4, w.shape[-1]).sum(2) <= 2)


def test_preset_paper_from_the_cli(tmp_path, tiny):
    src, text, _, _ = tiny
    out = tmp_path / "o"
    assert convert_main(["mixtral", "--src", str(src), "--out", str(out), "--ratio", "0.5", "--preset", "paper",
                         "--seed", "3", "--calibration-text", str(text),
                         "--calibration-seq-len", "32", "--quiet"]) == 0
    merge = json.loads((out / "config.json").read_text())["puzzlemoe"]["merge"]
    assert (merge["similarity_rule"], merge["similarity_threshold"], merge["saliency"], merge["pairing"],
            merge["seed"]) == ("sum", 0.4, "wanda", "random", 3)
