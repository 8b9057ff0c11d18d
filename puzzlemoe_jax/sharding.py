"""Shard a loaded ``CausalLM`` over a ``jax.sharding.Mesh`` with axes ("expert", "model").

* routed experts: dense ``w_*`` ``[E, K, N]``, packed pair words ``packed_w_*`` ``[P, K, N]`` and
  the unmerged ``dense_w_*`` ``[D, K, N]`` are split over "expert" along their first axis (expert
  parallel over experts / pairs) where that count divides, and over "model" along the expert
  intermediate axis (N of gate/up, K of down) where that divides;
* the attention ``qkv_proj`` kernel is split over "model" by kv-head groups (columns) when the kv
  head count divides (MLA: q_proj / q_b_proj / kv_b_proj by heads; its latent projections are
  replicated), o_proj by rows when the head count divides; dense MLPs / shared experts likewise
  (gate/up columns, down rows);
* everything else (embeddings, norms, routers, lm_head, pair and id tables) is replicated.

``shard_model(model, mesh)`` places every variable with a ``NamedSharding`` and hands the mesh to
the MoE layers; ``jit`` (e.g. ``generate``) then runs the sharded model and XLA inserts the
collectives of attention and dense MLPs.  The routed experts run under ``shard_map``
(``sharded_moe_ffn``): every device takes all tokens of the step, computes the share of the experts
(pairs) it holds over its slice of the intermediate axis -- with the Pallas kernel on GPU, since a
Pallas call is a single-device program -- and one ``psum`` adds the shares up.
"""
from __future__ import annotations

import functools
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kernels import ImplError, resolve_impl
from puzzlemoe_jax.experts import PackedExperts
from puzzlemoe_jax.moe import moe_ffn

AXES = ("expert", "model")


def make_mesh(expert: int | None = None, model: int | None = None, devices: Sequence | None = None) -> Mesh:
    """A 2-D ("expert", "model") mesh over ``devices`` (default all); one size may be inferred."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if expert is None and model is None:
        expert = n
    if expert is None:
        expert = n // model
    if model is None:
        model = n // expert
    if expert < 1 or model < 1 or expert * model != n:
        raise ValueError(f"mesh {expert} x {model} does not use the {n} devices")
    return Mesh(np.asarray(devices).reshape(expert, model), AXES)


def _div(n: int, size: int) -> bool:
    return size > 1 and n > 0 and n % size == 0


def expert_weight_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Spec of routed-expert weights ``[E, K, N]`` (dense, packed words or unmerged): experts /
    pairs over "expert" where the count divides, the intermediate axis over "model" where it
    divides (N of gate/up, K of down)."""
    e, m = mesh.shape["expert"], mesh.shape["model"]
    ex = "expert" if _div(shape[0], e) else None
    if name == "down":                                                    # [E, I, H]
        return P(ex, "model" if _div(shape[1], m) else None, None)
    return P(ex, None, "model" if _div(shape[2], m) else None)            # [E, H, I]


def partition_spec(path: Sequence, shape: tuple[int, ...], mesh: Mesh, heads: int, kv_heads: int) -> P:
    """PartitionSpec of the variable at ``path`` (a flat-state key) with ``shape``."""
    m = mesh.shape["model"]
    names = [str(p) for p in path]
    leaf = names[-1]
    parent = names[-2] if len(names) > 1 else ""
    md = lambda n: "model" if _div(n, m) else None                        # noqa: E731
    if "experts" in names and len(shape) == 3 and (leaf.startswith("w_") or leaf.startswith("packed_w_")
                                                   or leaf.startswith("dense_w_")):
        return expert_weight_spec(leaf.split("w_", 1)[1], shape, mesh)
    if "attn" in names and leaf in ("kernel", "bias"):
        if parent in ("qkv_proj", "q_proj", "q_b_proj", "kv_b_proj"):   # (MLA: q_proj / q_b_proj, kv_b_proj per head)
            nh = kv_heads if parent == "qkv_proj" else heads   # qkv_proj: whole kv-head groups (models.fuse_qkv)
            tp = "model" if _div(nh, m) else None
            return P(None, tp) if leaf == "kernel" else P(tp)
        if parent == "o_proj" and leaf == "kernel":
            return P("model" if _div(heads, m) else None, None)
        return P()
    if parent in ("gate", "up", "down") and leaf == "kernel" and len(shape) == 2:   # dense MLP / shared expert
        return P(None, md(shape[1])) if parent != "down" else P(md(shape[0]), None)
    return P()


def _owner_mask(expert_ids, split: bool, num_experts: int, owned=None):
    """[E + 1] bool: ``expert_ids`` (this device's slice) marked owned.  A group that is not split
    over "expert" is replicated there, so only the device of rank 0 on that axis owns it."""
    owned = jnp.zeros((num_experts + 1,), bool) if owned is None else owned
    return owned.at[expert_ids].set(True if split else lax.axis_index("expert") == 0)


@functools.cache
def _warn_mosaic_on_mesh(mesh: Mesh) -> None:
    warnings.warn(f"the Mosaic kernels run on one device: MoE layers on the {mesh.size}-device mesh run the "
                  "Triton kernels", stacklevel=3)


def sharded_moe_ffn(x, topk_ids, topk_weights, experts, mesh: Mesh, *, impl: str = "auto", interpret: bool = False):
    """``moe.moe_ffn`` expert parallel over ``mesh`` (``shard_map``; see the module docstring).

    Every device gets all T tokens and routes the assignments to experts it does not own to id E
    (in no group, weight 0), runs ``moe_ffn`` on its own weights (Pallas kernel on GPU for
    packed pairs) with an f32 result, and one ``psum`` over "expert" (and "model" where the intermediate
    axis is split) sums the shares.  Specs follow ``expert_weight_spec``, as ``shard_model`` places them.
    """
    if resolve_impl(impl, interpret=interpret) == "mosaic":   # "auto" on Hopper: Mosaic runs on one device
        _warn_mosaic_on_mesh(mesh)
        impl = "triton"

    def weight_specs(mats):
        return {n: expert_weight_spec(n.split("w_", 1)[1], tuple(w.shape), mesh) for n, w in mats.items()}

    packed = isinstance(experts, PackedExperts)
    specs = weight_specs(experts.packed if packed else experts)
    split = specs["w_gate"][0] == "expert"             # experts / pairs over "expert"
    inter_split = specs["w_gate"][2] == "model"        # the intermediate axis over "model"
    if packed:
        dense_specs = weight_specs(experts.dense)
        dense_split = dense_specs["w_gate"][0] == "expert"
        spec_tree = PackedExperts(P(specs["w_gate"][0]), specs, P(dense_specs["w_gate"][0]), dense_specs,
                                  experts.num_experts, P())
        num_experts = experts.num_experts
    else:
        spec_tree = specs
        num_experts = experts["w_gate"].shape[0]

    def local(x, ids, w, ex):
        if packed:
            owned = _owner_mask(ex.pairs.reshape(-1), split, num_experts)
            owned = _owner_mask(ex.dense_ids, dense_split, num_experts, owned)[ids]
            local_ids = jnp.where(owned, ids, num_experts)
        else:
            n_local = ex["w_gate"].shape[0]
            first = lax.axis_index("expert") * n_local if split else 0
            owned = _owner_mask(first + jnp.arange(n_local), split, num_experts)[ids]
            local_ids = jnp.where(owned, ids - first, n_local)
        y = moe_ffn(x, local_ids, jnp.where(owned, w, 0), ex, impl=impl, interpret=interpret, out_dtype=jnp.float32)
        return lax.psum(y, ("expert", "model") if inter_split else "expert")

    run = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), spec_tree), out_specs=P(), check_vma=False)
    return run(x, topk_ids, topk_weights, experts).astype(x.dtype)


def shard_model(model, mesh: Mesh, *, impl: str | None = None, interpret: bool = False):
    """Place ``model``'s variables on ``mesh`` and let its MoE layers run expert parallel on it
    (in place; returns the model).  ``impl``/``interpret``: as ``CausalLM.set_impl``."""
    if impl is not None and impl != "auto" and resolve_impl(impl, interpret=interpret) == "mosaic":
        raise ImplError('impl "mosaic" runs on one device; on a mesh use "auto" or "triton"')
    if mesh.size > 1:
        model.use_mosaic(False)   # layers held in the Mosaic layout go back to the [K, N] words
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"mesh axes must be {AXES}, got {mesh.axis_names}")
    cfg = model.config
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        spec = partition_spec(path, tuple(value.shape), mesh, cfg.num_heads, cfg.num_kv_heads)
        var.set_value(jax.device_put(value, NamedSharding(mesh, spec)))
    nnx.update(model, state)
    for moe in model.moe_layers().values():
        moe.mesh = mesh if mesh.size > 1 else None
    if impl is not None:
        model.set_impl(impl, interpret=interpret)
    return model


def sharding_summary(model) -> dict[str, str]:
    """Flat variable name -> its PartitionSpec as a tuple string, e.g. ``"('expert', None, 'model')"``."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        s = getattr(var.get_value(), "sharding", None)
        spec = getattr(s, "spec", None)
        out[".".join(map(str, path))] = repr(tuple(spec)) if spec is not None else str(s)
    return out
