"""Router variants of the DeepSeek-V2/V3 and GLM-4.5 families (fp32, as transformers computes them).

``select_experts`` covers: softmax scores with plain top-k ("greedy"); DeepSeek-V2's
"group_limited_greedy" (experts of the ``topk_group`` groups with the highest max score); and
"noaux_tc" (DeepSeek-V3, GLM-4.5: sigmoid scores, ``e_score_correction_bias`` added for the
choice only, groups ranked by the sum of their two best).  The weights are the unbiased scores of
the chosen experts, optionally renormalised.  (Mixtral/Qwen/OLMoE use ``models.route``.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def select_experts(logits, *, top_k: int, scoring: str = "softmax", topk_method: str = "greedy", n_group: int = 1,
                   topk_group: int = 1, norm_topk_prob: bool = False, bias=None, blocked=None):
    """Router logits ``[T, E]`` -> (ids ``[T, k]`` int32, weights fp32).  ``bias``: the correction
    bias ``[E]`` (noaux_tc); ``blocked``: expert ids never chosen (dropped experts)."""
    logits = logits.astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    t, e = choice.shape
    if topk_method != "greedy" and n_group > 1:
        grouped = choice.reshape(t, n_group, e // n_group)
        group_scores = (jax.lax.top_k(grouped, 2)[0].sum(-1) if topk_method == "noaux_tc" else grouped.max(-1))
        _, gidx = jax.lax.top_k(group_scores, topk_group)
        keep = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], gidx].set(True)
        keep = jnp.repeat(keep, e // n_group, axis=1)
        choice = jnp.where(keep, choice, -jnp.inf if topk_method == "noaux_tc" else 0.0)
    if blocked is not None and blocked.shape[0]:
        choice = choice.at[:, blocked].set(-jnp.inf)
    _, ids = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + (1e-20 if scoring == "sigmoid" else 0.0))
    return ids.astype(jnp.int32), weights
