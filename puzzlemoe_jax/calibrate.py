"""Calibration statistics of a dense model's MoE layers, from a little text.

Only activation-aware saliency and the frequency/drop baselines need them; the default PuzzleMoE
merge is training- and data-free.  Per MoE layer:

* ``frequencies [E]``: share of (token, top-k slot) assignments routed to each expert;
* ``importance``: per-expert input second moments ``E[x_k**2]`` over the tokens routed to the
  expert: ``[E, H]`` for ``w_gate``/``w_up`` (the layer input) and ``[E, I]`` for ``w_down``
  (the expert's ``silu(x @ w_gate) * (x @ w_up)``).
* ``counts [E]``: (token, slot) assignments per expert (Wanda's ``||X||_2**2 = counts * E[x**2]``);
* ``coactivation [E, E]``: tokens whose top-k holds both experts (diagonal: ``counts``);
* ``reap [E]``: REAP's score, the mean over the tokens routed to the expert of its renormalised
  top-k router weight times ``||expert output||_2`` (0 for an expert never routed to);
* ``mean_output [E, H]``: each expert's mean output over *all* calibration tokens (HC-SMoE);
* ``samples``: the first ``sample_tokens`` layer inputs ``x [T, H]`` and router logits ``[T, E]``,
  with ``top_k``/``norm_topk_prob``, for output-reconstruction searches (NAEE).
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
from puzzlemoe_jax.checkpoint import load_pretrained
from puzzlemoe_jax.conversion import convert_checkpoint
from puzzlemoe_jax.models import CausalLM, DenseExperts


@nnx.jit
def routed_inputs(model: CausalLM, ids):
    """Each MoE layer's input tokens and top-k expert ids for ``ids`` (layers with ``capture`` set)."""
    _, captured = nnx.capture(lambda m, x: m(x), nnx.Intermediate)(model, ids)
    return {i: captured["layers"][i]["mlp"]["routed"].get_value()[0] for i in model.moe_layers()}


def routed_batches(model: CausalLM, rows: np.ndarray, batch_size: int = 8):
    """``(batch, routed_inputs(model, batch))`` for each ``batch_size`` rows of token ids ``rows``
    [N, S], with every MoE layer's ``capture`` set while it runs (unset again when it ends)."""
    layers = model.moe_layers()
    for m in layers.values():
        m.capture = True
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            yield batch, routed_inputs(model, jnp.asarray(batch, jnp.int32))
    finally:
        for m in layers.values():
            m.capture = False


@jax.jit
def _layer_sums(x, ids, logits, w_gate, w_up, w_down):
    """Sums over one batch of routed tokens: (assignment counts [E], sum x^2 [E, H], sum h^2 [E, I],
    coactivation [E, E], sum of REAP terms [E], sum of every expert's output over all tokens [E, H])."""
    e, k = w_gate.shape[0], ids.shape[-1]
    order, tokens, sizes, _ = routing.group_by_slot(ids.reshape(-1), k, e)
    xs = x[tokens].astype(jnp.float32)
    expert = jnp.repeat(jnp.arange(e), sizes, total_repeat_length=xs.shape[0])
    dot = lambda a, w: jax.lax.ragged_dot(a, w.astype(jnp.float32), sizes, preferred_element_type=jnp.float32)
    h = jax.nn.silu(dot(xs, w_gate)) * dot(xs, w_up)
    out_norm = jnp.linalg.norm(dot(h, w_down), axis=-1)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    gate = jnp.take_along_axis(probs, ids, axis=-1)
    gate = (gate / jnp.sum(gate, axis=-1, keepdims=True)).reshape(-1)[order]   # renormalised top-k weight
    seg = lambda v: jax.ops.segment_sum(v, expert, num_segments=e)
    onehot = jnp.sum(jax.nn.one_hot(ids, e, dtype=jnp.float32), axis=1)            # [T, E]
    xf, f32 = x.astype(jnp.float32), lambda w: w.astype(jnp.float32)
    hall = jax.nn.silu(jnp.einsum("th,ehi->eti", xf, f32(w_gate))) * jnp.einsum("th,ehi->eti", xf, f32(w_up))
    mean_out = jnp.einsum("eti,eih->eh", hall, f32(w_down))
    return sizes, seg(xs * xs), seg(h * h), onehot.T @ onehot, seg(gate * out_norm), mean_out


def calibrate(model: CausalLM, tokens: np.ndarray, *, seq_len: int = 256, max_windows: int = 32,
              batch_size: int = 8, sample_tokens: int = 2048) -> dict[int, dict]:
    """Run ``tokens`` (cut into windows as in ``evaluate``) through a dense model; stats per MoE layer."""
    layers = model.moe_layers()
    for i, m in layers.items():
        if not isinstance(m.experts, DenseExperts):
            raise ValueError(f"layer {i}: calibration needs the original (dense) experts")
    sums: dict[int, list] = {}
    samples: dict[int, list] = {i: [] for i in layers}
    n_tokens = 0
    w = evaluate.windows(tokens, seq_len, max_windows)
    for batch, routed in routed_batches(model, w, batch_size):
        for i, m in layers.items():
            x, ids = routed[i]
            weights = m.experts.weights()
            logits = m.router(x)
            part = [np.asarray(a, np.float64) for a in _layer_sums(x, ids, logits, weights["w_gate"],
                                                                   weights["w_up"], weights["w_down"])]
            sums[i] = part if i not in sums else [a + b for a, b in zip(sums[i], part)]
            if sum(len(a) for a, _ in samples[i]) < sample_tokens:
                samples[i].append((np.asarray(x, np.float32), np.asarray(logits, np.float32)))
        n_tokens += int(np.prod(batch.shape))
    out = {}
    for i, (counts, x2, h2, coact, reap, out_sum) in sums.items():
        per = np.maximum(counts, 1)[:, None]
        xs, lg = (np.concatenate([s[j] for s in samples[i]])[:sample_tokens] for j in (0, 1))
        out[i] = {"frequencies": counts / counts.sum(), "counts": counts,
                  "importance": {"w_gate": x2 / per, "w_up": x2 / per, "w_down": h2 / per},
                  "coactivation": coact, "reap": reap / per[:, 0], "mean_output": out_sum / max(n_tokens, 1),
                  "samples": {"x": xs, "logits": lg},
                  "top_k": layers[i].top_k, "norm_topk_prob": bool(layers[i].norm_topk_prob)}
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
