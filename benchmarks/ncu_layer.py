"""One packed Mosaic layer call, for Nsight Compute.

The timing benchmarks use CUPTI in-process, which Nsight Compute cannot attach to (it segfaults), so
this script builds ``bench_moe_layer``'s random layer and routing and runs the packed layer once with
nothing else attached.  Run it under ``ncu``, e.g. (H200, the Mixtral T = 16 launches):

    XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --target-processes all -k regex:'mosaic_(gate_up|down)' -c 2 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \\
        --section InstructionStats env PYTHONPATH=. python3 benchmarks/ncu_layer.py --shape mixtral --tokens 16

ncu locks the SM clock to its base (1.3 GHz on the H200) unless given ``--clock-control none``, so its
durations are not the benchmarks' figures; read it for occupancy, issue and stall statistics.
"""
from __future__ import annotations

import argparse
import dataclasses

from bench_moe_layer import SHAPES, random_weights
from peer_torch import routing

import jax
import jax.numpy as jnp
import numpy as np

import kernels as K
from kernels.mosaic_ffn import grouped_block_m, layer_configs, to_mosaic_words
from puzzlemoe_jax.compress import compress_layer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--decode", default=None, choices=["swar", "prmt"], help="decode form (default: the kernels')")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    E, H, I, k = SHAPES[args.shape]
    experts, _ = compress_layer(random_weights(E, H, I), 0.5)
    words = to_mosaic_words(experts.packed)
    x, ids, tw = routing(np.random.default_rng(args.seed), args.tokens, E, H, k)
    x, ids, tw = jnp.asarray(x, jnp.bfloat16), jnp.asarray(ids, jnp.int32), jnp.asarray(tw, jnp.float32)
    configs = (None, None)
    if args.decode:
        bm = grouped_block_m(args.tokens * k, E, args.tokens)
        configs = tuple(dataclasses.replace(c, decode=args.decode)
                        for c in layer_configs(bm, args.tokens * k, experts.pairs.shape[0], H, I))
    fn = jax.jit(lambda x, ids, tw, ex, mw: K.packed_moe_ffn(x, ids, tw, ex, impl="mosaic", configs=configs,
                                                              mosaic_words=mw))
    out = jax.block_until_ready(fn(x, ids, tw, experts, words))
    print(f"{args.shape} T={args.tokens} decode={args.decode or 'default'}: finite={bool(jnp.isfinite(out).all())}")


if __name__ == "__main__":
    main()
