"""GPU check: the expert-parallel path (``sharding.sharded_moe_ffn`` under ``shard_map``) with the Pallas
kernel inside, on the devices at hand (a 1-device mesh still runs shard_map + the kernel + psum), against
the single-device kernel path and the jnp reference, on a fresh random merged layer.

    PYTHONPATH=. python3 benchmarks/check_sharded_kernel.py [--experts 8 --hidden 4096 --inter 14336 --tokens 16]
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from puzzlemoe_jax import compress
from puzzlemoe_jax.moe import dense_moe_ffn, moe_ffn
from puzzlemoe_jax.sharding import make_mesh, sharded_moe_ffn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    e, h, i, t = args.experts, args.hidden, args.inter, args.tokens
    rng = np.random.default_rng()
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 5)
    w = {n: (0.02 * jax.random.normal(k, s, jnp.float32)).astype(jnp.bfloat16) for n, k, s in
         (("w_gate", keys[0], (e, h, i)), ("w_up", keys[1], (e, h, i)), ("w_down", keys[2], (e, i, h)))}
    experts, _ = compress.compress_layer(w, 0.5)
    del w
    x = jax.random.normal(keys[3], (t, h), jnp.float32).astype(jnp.bfloat16)
    ids = jnp.asarray(np.stack([rng.choice(e, 2, replace=False) for _ in range(t)]), jnp.int32)
    tw = jax.nn.softmax(jax.random.normal(keys[4], (t, 2)), -1)
    mesh = make_mesh(jax.device_count(), 1)
    ref = dense_moe_ffn(x, ids, tw, experts.unpack(jnp.bfloat16), jnp.float32)
    single = jax.jit(lambda *a: moe_ffn(*a, impl="triton", out_dtype=jnp.float32))(x, ids, tw, experts)
    lowered = jax.jit(lambda *a: sharded_moe_ffn(*a, mesh, impl="triton")).lower(x.astype(jnp.float32), ids, tw, experts)
    hlo = lowered.as_text()
    sharded = lowered.compile()(x.astype(jnp.float32), ids, tw, experts)
    rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))  # noqa: E731
    out = dict(devices=[d.device_kind for d in jax.devices()], mesh=dict(mesh.shape), tokens=t,
               shape=[e, h, i], rel_err_sharded_vs_reference=rel(sharded, ref),
               rel_err_single_kernel_vs_reference=rel(single, ref), rel_err_sharded_vs_single=rel(sharded, single),
               finite=bool(jnp.isfinite(sharded).all()), kernel_calls_in_hlo=hlo.count("__gpu$xla.gpu.triton"))
    out["ok"] = out["finite"] and out["rel_err_sharded_vs_reference"] < 1e-2 and out["kernel_calls_in_hlo"] >= 2
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
