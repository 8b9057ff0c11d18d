"""Shared pieces of the kernel tests: random words and layers, the error check, abstract lowering."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from puzzlemoe_jax.compress import compress_layer
from puzzlemoe_jax.moe import dense_moe_ffn

TOL = 1e-2  # relative Frobenius error allowed for bf16 operands / bf16 outputs
SDS = jax.ShapeDtypeStruct


def rng_for(seed):
    return np.random.default_rng([seed, 20261124])


def random_words(rng, shape):
    return jnp.asarray(rng.integers(0, 1 << 16, size=shape, dtype=np.uint16))


def check(got, ref, what, tol=None):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    if ref.size == 0:
        return
    err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err < (tol or TOL), f"{what}: relative error {err:.2e}"


def random_layer(rng, e, h, i, ratio, drop=False):
    """A merged layer of random experts; ``drop``: keep 2 of its dense experts, drop the others."""
    w = {"w_gate": rng.standard_normal((e, h, i)) * 0.05, "w_up": rng.standard_normal((e, h, i)) * 0.05,
         "w_down": rng.standard_normal((e, i, h)) * 0.05}
    experts = compress_layer({n: jnp.asarray(v, jnp.bfloat16) for n, v in w.items()}, ratio)[0]
    if drop:
        keep = np.asarray(experts.dense_ids)[:2]
        experts = dataclasses.replace(experts, dense_ids=jnp.asarray(keep),
                                      dense={n: v[:2] for n, v in experts.dense.items()},
                                      dropped_ids=jnp.asarray(np.asarray(experts.dense_ids)[2:]))
    return experts


def random_routing(rng, t, e, k, h, dtype=jnp.bfloat16):
    x = jnp.asarray(rng.standard_normal((t, h)), dtype)
    ids = jnp.asarray(np.argsort(-rng.standard_normal((t, e)), 1)[:, :k], jnp.int32)
    tw = jnp.asarray(rng.random((t, k)), jnp.float32)
    return x, ids, tw


def layer_case(seed, t, ratio, drop=False, e=8, h=128, i=192, k=2, dtype=jnp.bfloat16):
    """A random merged layer (``random_layer``), a routing of ``t`` tokens to ``k`` of its ``e`` experts,
    and the dense layer's output on its decoded experts (the reference): ``(experts, x, ids, tw, ref)``."""
    rng = rng_for(seed)
    experts = random_layer(rng, e, h, i, ratio, drop)
    x, ids, tw = random_routing(rng, t, e, k, h, dtype)
    return experts, x, ids, tw, dense_moe_ffn(x, ids, tw, experts.unpack(dtype))


def lower_for_h100(fn, *args) -> str:
    """StableHLO text of ``fn`` lowered for an abstract H100 (no GPU needed): catches ops the real
    Pallas lowering rejects (the interpreter accepts far more), at full model shapes."""
    ad = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")
    am = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,), abstract_device=ad)
    with jax.sharding.use_abstract_mesh(am):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
