"""Shard a loaded ``CausalLM`` over a ``jax.sharding.Mesh`` with axes ("expert", "model").

* routed experts: dense ``w_*`` ``[E, K, N]``, packed pair words ``packed_w_*`` ``[P, K, N]`` and
  the unmerged ``dense_w_*`` ``[D, K, N]`` are split over "expert" along their first axis (expert
  parallel over experts / pairs) where that count divides, and over "model" along the expert
  intermediate axis (N of gate/up, K of down) where that divides;
* attention q/k/v kernels are split over "model" by heads (columns), o_proj by rows, when the
  head counts divide; dense MLPs / shared experts likewise (gate/up columns, down rows);
* everything else (embeddings, norms, routers, lm_head, pair and id tables) is replicated.

``shard_model(model, mesh)`` places every variable with a ``NamedSharding``; ``jit`` (e.g.
``generate``) then runs the sharded model and XLA inserts the collectives.  The Pallas kernel
is a single-device custom call, so on a mesh of more than one device packed layers use the
reference path (decode the words, then ``ragged_dot``): ``shard_model`` sets ``impl="reference"``.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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


def partition_spec(path: Sequence, shape: tuple[int, ...], mesh: Mesh, heads: int, kv_heads: int) -> P:
    """PartitionSpec of the variable at ``path`` (a flat-state key) with ``shape``."""
    e, m = mesh.shape["expert"], mesh.shape["model"]
    names = [str(p) for p in path]
    leaf = names[-1]
    parent = names[-2] if len(names) > 1 else ""
    ex = lambda n: "expert" if _div(n, e) else None                       # noqa: E731
    md = lambda n: "model" if _div(n, m) else None                        # noqa: E731
    if "experts" in names and len(shape) == 3 and (leaf.startswith("w_") or leaf.startswith("packed_w_")
                                                   or leaf.startswith("dense_w_")):
        name = leaf.split("w_", 1)[1]
        if name == "down":                                                # [E, I, H]
            return P(ex(shape[0]), md(shape[1]), None)
        return P(ex(shape[0]), None, md(shape[2]))                        # [E, H, I]
    if "attn" in names and leaf in ("kernel", "bias"):
        if parent in ("q_proj", "k_proj", "v_proj"):
            nh = heads if parent == "q_proj" else kv_heads
            tp = "model" if _div(nh, m) else None
            return P(None, tp) if leaf == "kernel" else P(tp)
        if parent == "o_proj" and leaf == "kernel":
            return P("model" if _div(heads, m) else None, None)
        return P()
    if parent in ("gate", "up", "down") and leaf == "kernel" and len(shape) == 2:   # dense MLP / shared expert
        return P(None, md(shape[1])) if parent != "down" else P(md(shape[0]), None)
    return P()


def shard_model(model, mesh: Mesh, *, impl: str | None = None):
    """Place ``model``'s variables on ``mesh`` (in place; returns the model).  ``impl``: packed-layer
    implementation; default "reference" on a mesh of more than one device (see module docstring)."""
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"mesh axes must be {AXES}, got {mesh.axis_names}")
    cfg = model.config
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        spec = partition_spec(path, tuple(value.shape), mesh, cfg.num_heads, cfg.num_kv_heads)
        var.set_value(jax.device_put(value, NamedSharding(mesh, spec)))
    nnx.update(model, state)
    if impl is None and mesh.size > 1:
        impl = "reference"
    if impl is not None:
        model.set_impl(impl)
    return model


def sharding_summary(model) -> dict[str, str]:
    """Flat variable name -> its PartitionSpec as a tuple string, e.g. ``"('expert', None, 'model')"``."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        s = getattr(var.get_value(), "sharding", None)
        spec = getattr(s, "spec", None)
        out[".".join(map(str, path))] = repr(tuple(spec)) if spec is not None else str(s)
    return out
