"""Calibration statistics of a dense model's MoE layers, from a little text.

Only activation-aware saliency and the frequency/drop baselines need them; the default PuzzleMoE
merge is training- and data-free.  Per MoE layer:

* ``frequencies [E]``: share of (token, top-k slot) assignments routed to each expert;
* ``importance``: per-expert input second moments ``E[x_k**2]`` over the tokens routed to the
  expert: ``[E, H]`` for ``w_gate``/``w_up`` (the layer input) and ``[E, I]`` for ``w_down``
  (the expert's ``silu(x @ w_gate) * (x @ w_up)``).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels import routing
from puzzlemoe_jax import evaluate
from puzzlemoe_jax.checkpoint import convert_checkpoint, load_pretrained
from puzzlemoe_jax.models import CausalLM, DenseExperts


@nnx.jit
def routed_inputs(model: CausalLM, ids):
    """Each MoE layer's input tokens and top-k expert ids for ``ids`` (layers with ``capture`` set)."""
    _, captured = nnx.capture(lambda m, x: m(x), nnx.Intermediate)(model, ids)
    return {i: captured["layers"][i]["mlp"]["routed"].get_value()[0] for i in model.moe_layers()}


@jax.jit
def _layer_sums(x, ids, w_gate, w_up):
    """(assignment counts [E], sum x^2 [E, H], sum h^2 [E, I]) for one batch of routed tokens."""
    e = w_gate.shape[0]
    _, tokens, sizes, _ = routing.group_by_slot(ids.reshape(-1), ids.shape[-1], e)
    xs = x[tokens].astype(jnp.float32)
    expert = jnp.repeat(jnp.arange(e), sizes, total_repeat_length=xs.shape[0])
    dot = lambda a, w: jax.lax.ragged_dot(a, w.astype(jnp.float32), sizes, preferred_element_type=jnp.float32)
    h = jax.nn.silu(dot(xs, w_gate)) * dot(xs, w_up)
    seg = lambda v: jax.ops.segment_sum(v, expert, num_segments=e)
    return sizes, seg(xs * xs), seg(h * h)


def calibrate(model: CausalLM, tokens: np.ndarray, *, seq_len: int = 256, max_windows: int = 32,
              batch_size: int = 8) -> dict[int, dict]:
    """Run ``tokens`` (cut into windows as in ``evaluate``) through a dense model; stats per MoE layer."""
    layers = model.moe_layers()
    for i, m in layers.items():
        if not isinstance(m.experts, DenseExperts):
            raise ValueError(f"layer {i}: calibration needs the original (dense) experts")
    sums: dict[int, list] = {}
    w = evaluate.windows(tokens, seq_len, max_windows)
    for m in layers.values():
        m.capture = True
    try:
        for start in range(0, len(w), batch_size):
            routed = routed_inputs(model, jnp.asarray(w[start:start + batch_size]))
            for i, m in layers.items():
                x, ids = routed[i]
                weights = m.experts.weights()
                part = [np.asarray(a, np.float64) for a in _layer_sums(x, ids, weights["w_gate"], weights["w_up"])]
                sums[i] = part if i not in sums else [a + b for a, b in zip(sums[i], part)]
    finally:
        for m in layers.values():
            m.capture = False
    out = {}
    for i, (counts, x2, h2) in sums.items():
        per = np.maximum(counts, 1)[:, None]
        out[i] = {"frequencies": counts / counts.sum(),
                  "importance": {"w_gate": x2 / per, "w_up": x2 / per, "w_down": h2 / per}}
    return out


def calibrate_checkpoint(src, arch: str, text_path, *, dtype: str = "auto", seq_len: int = 256,
                         max_windows: int = 32) -> dict[int, dict]:
    """Calibration statistics for an HF checkpoint: convert it dense to a temporary directory,
    load it, and run ``text_path`` through it.  Holds the whole dense model in memory."""
    with tempfile.TemporaryDirectory(prefix="puzzlemoe-calib-") as tmp:
        dense = Path(tmp) / "dense"
        convert_checkpoint(src, dense, arch, ratio=0.0, dtype=dtype)
        model = load_pretrained(dense, impl="reference")
        tokens, _ = evaluate.load_tokens(Path(src), model.config.vocab_size, None, text_path)
        return calibrate(model, tokens, seq_len=seq_len, max_windows=max_windows)
