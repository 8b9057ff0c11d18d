"""GPU check of the one-launch routing layout (no timing): ``kernels.routing_kernel.pair_layout``
compiled for the GPU against the XLA layout it replaces (``mosaic_ffn.xla_pair_layout``), exactly,
on random routings of the benchmark shapes (all experts paired, some ids held by no pair, uneven
routings) at each token count.  Exit status 1 on any difference.

    PYTHONPATH=. python3 benchmarks/check_routing_kernel.py --out $OUT/check_routing_kernel.json
"""
import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kernels import routing, routing_kernel
from kernels.mosaic_ffn import grouped_block_m, xla_pair_layout

SHAPES = {"mixtral": (8, 2), "deepseek-v2-lite": (64, 6), "qwen3-30b-a3b": (128, 8), "deepseek-v3": (256, 8)}
kernel = jax.jit(routing_kernel.pair_layout, static_argnames="block_m")
xla = jax.jit(lambda ids, pairs, block_m: xla_pair_layout(
    routing.group_packed(ids, pairs, jnp.zeros((0,), jnp.int32)), block_m), static_argnames="block_m")


def main():
    ap = argparse.ArgumentParser(description="GPU check of the routing kernel against the XLA layout")
    ap.add_argument("--tokens", default="1,4,16,64")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="check_routing_kernel.json")
    args = ap.parse_args()
    rows, bad = [], 0
    for name, (e, k) in SHAPES.items():
        for t in (int(v) for v in args.tokens.split(",")):
            for seed in range(args.seeds):
                rng = np.random.default_rng([seed, t, e])
                unheld = 2 * seed                      # seed 0: all paired; else some ids in no pair
                pairs = jnp.asarray(rng.permutation(e)[:e - unheld].reshape(-1, 2), jnp.int32)
                ids = np.argsort(-rng.standard_normal((t, e)), 1)[:, :k]
                if seed == 2:                          # uneven: half the tokens on k + 2 experts
                    ids[:max(1, t // 2)] = np.argsort(-rng.standard_normal((max(1, t // 2), k + 2)), 1)[:, :k]
                ids = jnp.asarray(ids, jnp.int32)
                bm = grouped_block_m(t * k, e, t)
                if t * k > routing_kernel.MAX_ROWS:
                    continue
                got, want = kernel(ids, pairs, block_m=bm), xla(ids, pairs, block_m=bm)
                same = {n: bool(np.array_equal(np.asarray(a), np.asarray(b)))
                        for n, a, b in zip(("tiles", "src", "row"), got, want)}
                bad += not all(same.values())
                rows.append(dict(shape=name, T=t, seed=seed, block_m=bm, pairs=int(pairs.shape[0]),
                                 layer_uses_it=routing_kernel.fits(t * k, int(pairs.shape[0]), 0, bm), **same))
                print(rows[-1], flush=True)
    res = dict(device=str(jax.devices()[0]), checked=len(rows), mismatched=bad, rows=rows)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{len(rows)} layouts checked, {bad} mismatched", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
