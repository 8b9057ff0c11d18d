"""GPU check and timing of the routing layout launches: ``kernels.routing_kernel.pair_layout``
compiled for the GPU against the XLA layout it replaces (``mosaic_ffn.xla_pair_layout``), exactly,
on random routings of the benchmark shapes (all experts paired, some ids held by no pair, uneven
routings) at each token count; then, at ``--time-tokens``, CUPTI times (µs, all kernels summed) of
the launches at their default chunk and at each of ``--chunks``, of the XLA layout, and of
``--baseline`` (another ``routing_kernel.py``, e.g. main's, where it takes the size; its tables
may be sized otherwise, so ``baseline_same`` is informative only).  Every timed chunk is checked
too.  Exit status 1 on any difference of this tree's launches.

    PYTHONPATH=. python3 benchmarks/check_routing_kernel.py --baseline ../kernels/routing_kernel.py --out $OUT/check_routing_kernel.json
"""
import argparse
import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np

from common import cupti_time, device_info, write_json
from kernels import routing, routing_kernel
from kernels.mosaic_ffn import grouped_block_m, xla_pair_layout

SHAPES = {"mixtral": (8, 2), "deepseek-v2-lite": (64, 6), "qwen3-30b-a3b": (128, 8), "deepseek-v3": (256, 8)}
xla = jax.jit(lambda ids, pairs, block_m: xla_pair_layout(
    routing.group_packed(ids, pairs, jnp.zeros((0,), jnp.int32)), block_m), static_argnames="block_m")


def case(e, k, t, seed):
    """``(ids [t, k], pairs)``: seed 0 all experts paired, else ``2 * seed`` ids in no pair; seed 2 uneven."""
    rng = np.random.default_rng([seed, t, e])
    pairs = jnp.asarray(rng.permutation(e)[:e - 2 * seed].reshape(-1, 2), jnp.int32)
    ids = np.argsort(-rng.standard_normal((t, e)), 1)[:, :k]
    if seed == 2:                          # uneven: half the tokens on k + 2 experts
        ids[:max(1, t // 2)] = np.argsort(-rng.standard_normal((max(1, t // 2), k + 2)), 1)[:, :k]
    return jnp.asarray(ids, jnp.int32), pairs


def same(got, want) -> bool:
    return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want))


def main():
    ap = argparse.ArgumentParser(description="GPU check and timing of the routing layout against the XLA layout")
    ap.add_argument("--tokens", default="1,4,16,64,256")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--time-tokens", default="1,4,16,64,256", help="token counts timed (seed 0)")
    ap.add_argument("--chunks", default="32,64,128", help="chunk sizes timed besides the default")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--baseline", default=None, help="path of another routing_kernel.py to time (e.g. main's)")
    ap.add_argument("--out", default="check_routing_kernel.json")
    args = ap.parse_args()
    base = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("routing_kernel_baseline", args.baseline)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
    rows, timed, bad = [], [], 0
    for name, (e, k) in SHAPES.items():
        for t in (int(v) for v in args.tokens.split(",")):
            if t * k > routing_kernel.MAX_ROWS:
                continue
            bm = grouped_block_m(t * k, e, t)
            for seed in range(args.seeds):
                ids, pairs = case(e, k, t, seed)
                got = jax.jit(routing_kernel.pair_layout, static_argnames="block_m")(ids, pairs, block_m=bm)
                ok = same(got, xla(ids, pairs, block_m=bm))
                bad += not ok
                rows.append(dict(shape=name, T=t, seed=seed, block_m=bm, pairs=int(pairs.shape[0]), same=ok,
                                 layer_uses_it=routing_kernel.fits(t * k, int(pairs.shape[0]), 0, bm)))
                print(rows[-1], flush=True)
        for t in (int(v) for v in args.time_tokens.split(",")):
            if t * k > routing_kernel.MAX_ROWS:
                continue
            bm = grouped_block_m(t * k, e, t)
            ids, pairs = case(e, k, t, 0)
            want = xla(ids, pairs, block_m=bm)
            default = routing_kernel.default_chunk(t * k)
            row = dict(shape=name, T=t, block_m=bm, default_chunk=default)
            _, ms, _, names = cupti_time(lambda i, p: xla(i, p, block_m=bm), (ids, pairs), iterations=args.iters)
            row["xla_us"], row["xla_kernels"] = 1e3 * ms, len(names)
            for ch in sorted({default, *(int(c) for c in args.chunks.split(","))}):
                fn = jax.jit(lambda i, p, ch=ch: routing_kernel.pair_layout(i, p, block_m=bm, chunk=ch))
                out, ms, spread, names = cupti_time(fn, (ids, pairs), iterations=args.iters, by_kernel=True)
                ok = same(out, want)
                bad += not ok
                row[f"chunk{ch}_us"] = 1e3 * ms
                row[f"chunk{ch}_kernels"] = {n: 1e3 * v for n, v in names.items()}
                row[f"chunk{ch}_same"] = ok
            if base is not None and t * k <= base.MAX_ROWS:
                fn = jax.jit(lambda i, p: base.pair_layout(i, p, block_m=bm))
                out, ms, _, _ = cupti_time(fn, (ids, pairs), iterations=args.iters)
                row["baseline_us"], row["baseline_same"] = 1e3 * ms, same(out, want)
            timed.append(row)
            print({n: v for n, v in row.items() if not n.endswith("_kernels")}, flush=True)
    write_json(args.out, dict(device=device_info(), checked=len(rows), mismatched=bad, rows=rows, timed=timed))
    print(f"{len(rows)} layouts checked, {bad} mismatched", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
