import json
import math

import numpy as np
import pytest
import torch

from puzzlemoe_jax import evaluate
from puzzlemoe_jax.random_checkpoint import write_tiny_checkpoint
from tests import hf_fixtures


def transformers_window_losses(model, tokens, seq_len, n_windows):
    """Mean of transformers' per-window loss (labels = inputs), windows of equal length."""
    w = torch.as_tensor(tokens[: n_windows * seq_len].reshape(n_windows, seq_len).astype(np.int64))
    with torch.no_grad():
        return float(np.mean([model(w[i:i + 1], labels=w[i:i + 1]).loss.item() for i in range(n_windows)]))


def test_nll_matches_transformers_loss_and_json_is_written(tmp_path):
    out_dir = hf_fixtures.converted("mixtral")
    tokens = np.random.default_rng(1).integers(0, hf_fixtures.VOCAB, 100)
    np.save(tmp_path / "tokens.npy", tokens)
    assert evaluate.main(["--model", str(out_dir), "--tokens", str(tmp_path / "tokens.npy"), "--seq-len", "16",
                          "--max-windows", "5", "--batch-size", "2", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tokens"] == 5 * 15 and result["windows"] == 5
    expected = transformers_window_losses(hf_fixtures.model("mixtral")[0], tokens, 16, 5)
    assert result["nll_per_token"] == pytest.approx(expected, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    assert result["bits_per_byte"] is None   # vocabulary 160 is not byte-level


def test_byte_level_text_reports_bits_per_byte(tmp_path, capsys):
    src = write_tiny_checkpoint(tmp_path / "hf", "mixtral", vocab_size=256, num_layers=1)
    from convert import main as convert_main
    assert convert_main(["mixtral", "--src", str(src), "--out", str(tmp_path / "m"), "--ratio", "0.5", "--quiet"]) == 0
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    assert evaluate.main(["--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--seq-len", "32",
                          "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["windows"] == (45 * 8) // 32 and r["tokens"] == r["windows"] * 31
    assert r["bits_per_byte"] == pytest.approx(r["nll_per_token"] / math.log(2))
    assert 0 < r["nll_per_token"] < 10 and "bits/byte" in capsys.readouterr().out


def test_bad_inputs_exit_with_a_clear_error(tmp_path, capsys):
    out_dir = str(hf_fixtures.converted("mixtral"))
    np.save(tmp_path / "big.npy", np.array([1, 2, 500]))
    assert evaluate.main(["--model", out_dir, "--tokens", str(tmp_path / "big.npy"), "--seq-len", "2"]) == 2
    assert "token ids must be in [0, 160)" in capsys.readouterr().err
    np.save(tmp_path / "short.npy", np.arange(10))
    assert evaluate.main(["--model", out_dir, "--tokens", str(tmp_path / "short.npy"), "--seq-len", "16"]) == 2
    assert "fewer than one window" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("hello")
    assert evaluate.main(["--model", out_dir, "--text", str(tmp_path / "t.txt"), "--seq-len", "2"]) == 2
    assert "not byte-level" in capsys.readouterr().err
    assert evaluate.main(["--model", str(tmp_path), "--text", str(tmp_path / "t.txt"), "--seq-len", "2"]) == 2
    assert "config.json" in capsys.readouterr().err
