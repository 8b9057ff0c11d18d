import json

import numpy as np
import pytest
import torch

from convert import main as convert_main
from puzzlemoe_jax import calibrate, load_pretrained
from puzzlemoe_jax.random_checkpoint import write_tiny_checkpoint
from tests import hf_fixtures as F


def torch_reference_stats(model, ids):
    """Per MoE layer (frequencies, E[x^2] per expert, E[h^2] per expert) from transformers' Mixtral."""
    captured = {}
    hooks = [layer.mlp.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(i, inp[0]))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(torch.as_tensor(ids))
    for h in hooks:
        h.remove()
    out = {}
    torch.set_grad_enabled(False)
    for i, x in captured.items():
        mlp = model.model.layers[i].mlp
        x = x.reshape(-1, x.shape[-1]).double()
        top = torch.topk(x @ mlp.gate.weight.double().T, model.config.num_experts_per_tok, dim=-1).indices
        e = model.config.num_local_experts
        freq, x2, h2 = np.zeros(e), [], []
        for k in range(e):
            rows = (top == k).any(-1)
            freq[k] = int((top == k).sum())
            xs = x[rows]
            gate_up = mlp.experts.gate_up_proj[k].double()          # [2I, H], gate rows first
            inter = gate_up.shape[0] // 2
            h = torch.nn.functional.silu(xs @ gate_up[:inter].T) * (xs @ gate_up[inter:].T)
            x2.append((xs ** 2).mean(0).numpy())
            h2.append((h ** 2).mean(0).numpy())
        out[i] = (freq / freq.sum(), np.stack(x2), np.stack(h2))
    torch.set_grad_enabled(True)
    return out


def test_calibration_statistics_match_transformers():
    model = load_pretrained(F.converted("mixtral"), impl="reference")
    tokens = np.random.default_rng(3).integers(0, F.VOCAB, 3 * 16)
    stats = calibrate.calibrate(model, tokens, seq_len=16, batch_size=2)
    ref = torch_reference_stats(F.model("mixtral")[0], tokens.reshape(3, 16))
    assert sorted(stats) == sorted(ref)
    for i, (freq, x2, h2) in ref.items():
        np.testing.assert_allclose(stats[i]["frequencies"], freq, atol=1e-12)
        np.testing.assert_allclose(stats[i]["importance"]["w_up"], x2, rtol=1e-4)
        np.testing.assert_allclose(stats[i]["importance"]["w_down"], h2, rtol=1e-3)


def test_drop_baseline_converts_and_never_routes_to_dropped_experts(tmp_path):
    src = write_tiny_checkpoint(tmp_path / "hf", "mixtral", vocab_size=256, num_experts=8)   # byte-level
    tokens = np.random.default_rng(4).integers(0, 128, 512)
    (tmp_path / "cal.txt").write_bytes(bytes(int(t) for t in tokens))
    out = tmp_path / "drop"
    assert convert_main(["mixtral", "--src", str(src), "--out", str(out), "--ratio", "0.5", "--method", "drop",
                         "--calibration-text", str(tmp_path / "cal.txt"), "--calibration-seq-len", "32",
                         "--quiet"]) == 0
    section = json.loads((out / "config.json").read_text())["puzzlemoe"]
    assert section["dropped_experts"] == {"0": 4, "1": 4} and section["packed_pairs"] == {"0": 0, "1": 0}
    model = load_pretrained(out, impl="reference")
    with pytest.raises(ValueError, match="dense"):   # a compressed model cannot be calibrated
        calibrate.calibrate(model, tokens, seq_len=32)
    for moe in model.moe_layers().values():   # route a batch and look at the chosen experts
        moe.capture = True
    routed = calibrate.routed_inputs(model, np.asarray(tokens[:64]).reshape(2, 32).astype(np.int32))
    for i, moe in model.moe_layers().items():
        _, ids = routed[i]
        dropped = set(np.asarray(moe.experts.dropped_ids).tolist())
        assert len(dropped) == 4 and not dropped & set(np.asarray(ids).ravel().tolist())


def test_methods_needing_calibration_refuse_to_run_without_text(tmp_path, capsys):
    assert convert_main(["mixtral", "--src", str(F.checkpoint("mixtral")), "--out", str(tmp_path / "o"),
                         "--ratio", "0.5", "--method", "frequency", "--quiet"]) == 2
    assert "needs --calibration-text" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
