"""MoE layer decode step on the GPU: packed layer (fused kernels) vs the uncompressed XLA layer.

Mixtral-8x7B layer shapes (E=8, H=4096, I=14336, top-2), every expert pair merged (ratio 0.5,
4 packed pairs).  Baseline: ``moe.dense_moe_ffn`` on the original bf16 experts (grouped by
expert, ``jax.lax.ragged_dot``).  Packed: ``kernels.packed_moe_ffn`` (2 kernel launches + routing
glue).  Whole step timed with CUPTI (all kernels summed), median of ``--iters``; the layer's
weights (1.4 GB packed, 2.8 GB dense) are far larger than L2.  Every timed variant is checked
against ``dense_moe_ffn(x, ..., experts.unpack())`` (same merged function) on fresh random data.

    PYTHONPATH=. python3 benchmarks/bench_moe_layer.py --out $OUT/bench_moe_layer.json
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

from common import bandwidth_ceilings, cupti_time, device_info, rel_err, write_json

import jax
import jax.numpy as jnp
import numpy as np

import kernels as K
from puzzlemoe_jax.moe import dense_moe_ffn
from puzzlemoe_jax.compress import compress_layer

TOKENS = [1, 2, 4, 8, 16, 32, 64]


# --mosaic-sweep: (gate+up, down) overrides of the grouped Mosaic launches: the SwiGLU in XLA (the
# form before the fused epilogue), gate+up written in bf16 (where the SwiGLU is in XLA: token blocks
# over 64 rows), a deeper down pipeline, 64-row token blocks (the SwiGLU form's largest; the default
# is mosaic_pair.grouped_block_m's)
MOSAIC_TRIES = [({"swiglu": False}, {}), ({"out_dtype": "bfloat16"}, {}), ({}, {"steps": 4}), ({"block_m": 64}, {})]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_moe_layer.json")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.5, help="compress_layer ratio (0.5: all merged)")
    ap.add_argument("--sweep", default="1,16,64", help="token counts at which to try tile variants")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--no-ceilings", action="store_true")
    ap.add_argument("--reference-at", default="1,64",
                    help="token counts at which to time impl='reference' too (decode the layer + ragged_dot)")
    ap.add_argument("--mosaic", action="store_true",
                    help="also time impl='mosaic' (grouped Mosaic-GPU kernel, words transposed once beforehand)")
    ap.add_argument("--seed", type=int, default=None,
                    help="routing and activations seed (default: the clock; fix it to compare runs on equal routing)")
    ap.add_argument("--skew", type=float, default=0.0,
                    help="router bias from +skew (expert 0) to -skew (the last expert) added to the random logits: "
                         "uneven expert loads, as real routers give (0: all experts equally likely)")
    ap.add_argument("--mosaic-sweep", default="",
                    help="token counts at which to try pipeline depth / K split variants of the grouped Mosaic kernel")
    ap.add_argument("--mosaic-tries", default=None,
                    help="JSON list of [gate_up, down] override pairs for --mosaic-sweep (default: MOSAIC_TRIES)")
    args = ap.parse_args()
    t0 = time.time()
    E, H, I, k = args.experts, args.hidden, args.inter, args.topk
    res = {"info": device_info(), "command": " ".join(__import__("sys").argv),
           "shape": dict(E=E, H=H, I=I, topk=k, ratio=args.ratio, skew=args.skew), "rows": [], "variants": []}
    if not args.no_ceilings:
        res["ceilings"] = bandwidth_ceilings()
    keys = jax.random.split(jax.random.key(0), 3)
    weights = {
        "w_gate": (0.02 * jax.random.normal(keys[0], (E, H, I), jnp.float32)).astype(jnp.bfloat16),
        "w_up": (0.02 * jax.random.normal(keys[1], (E, H, I), jnp.float32)).astype(jnp.bfloat16),
        "w_down": (0.02 * jax.random.normal(keys[2], (E, I, H), jnp.float32)).astype(jnp.bfloat16),
    }
    experts, _ = compress_layer(weights, args.ratio)
    merged_dense = jax.block_until_ready(experts.unpack(jnp.bfloat16))  # reference weights
    mosaic_words = jax.block_until_ready(K.mosaic_layer_words(experts)) if args.mosaic else None
    res["bytes"] = dict(dense=sum(int(w.size) * 2 for w in weights.values()), packed=experts.nbytes())
    print(res["info"], res.get("ceilings"), res["bytes"], flush=True)

    dense_fn = jax.jit(dense_moe_ffn)
    res["seed"] = int(time.time()) if args.seed is None else args.seed
    rng = np.random.default_rng(res["seed"])
    for T in [int(t) for t in args.tokens.split(",")]:
        x = jnp.asarray(rng.standard_normal((T, H)), jnp.bfloat16)
        logits = rng.standard_normal((T, E)) + args.skew * np.linspace(1, -1, E)
        ids_np = np.argsort(-logits, 1)[:, :k]
        ids = jnp.asarray(ids_np, jnp.int32)
        sel = np.take_along_axis(logits, ids_np, 1)
        tw = jnp.asarray(np.exp(sel) / np.exp(sel).sum(1, keepdims=True), jnp.float32)
        active = sorted(set(ids_np.ravel().tolist()))
        pairs = np.asarray(experts.pairs)
        active_pairs = sum(1 for p in pairs if p[0] in active or p[1] in active)
        ref = dense_fn(x, ids, tw, merged_dense)
        _, t_dense, s_dense, n_dense = cupti_time(dense_fn, (x, ids, tw, weights), iterations=args.iters,
                                                  by_kernel=True)

        def run(cfg_gu=None, cfg_dn=None, impl="pallas", mosaic_settings=(None, None)):
            fn = jax.jit(lambda x, ids, tw, ex, mw: K.packed_moe_ffn(
                x, ids, tw, ex, impl=impl, gate_up_config=cfg_gu, down_config=cfg_dn, mosaic_words=mw,
                mosaic_settings=mosaic_settings))
            out, t, s, names = cupti_time(fn, (x, ids, tw, experts, mosaic_words), iterations=args.iters,
                                          by_kernel=True)
            err, finite = rel_err(out, ref)
            return dict(ms=t, spread_ms=s, err=err, finite=finite, ok=finite and err < 1e-2,
                        speedup=t_dense / t, kernels=names)

        row = dict(T=T, active_experts=len(active), active_pairs=active_pairs,
                   expert_rows=np.bincount(ids_np.ravel(), minlength=E).tolist(),
                   dense_ms=t_dense, dense_spread_ms=s_dense, dense_kernels=n_dense,
                   packed=run())
        P = int(experts.pairs.shape[0])
        row["packed"]["gate_up_config"] = dataclasses.asdict(K.layer_config(T * k, H, I, P, fused=True))
        row["packed"]["down_config"] = dataclasses.asdict(K.layer_config(T * k, I, H, P))
        if args.mosaic:
            row["packed_mosaic"] = run(impl="mosaic")
            m = row["packed_mosaic"]
            print(f"T={T:4d} impl='mosaic' {m['ms'] * 1e3:8.1f}us x{m['speedup']:.2f} err {m['err']:.1e} ok={m['ok']}",
                  flush=True)
            print("   per kernel (us):", {n: round(ms * 1e3, 1) for n, ms in sorted(m["kernels"].items(),
                                                                              key=lambda kv: -kv[1])}, flush=True)
        if args.mosaic and str(T) in args.mosaic_sweep.split(","):
            for gu, dn in (json.loads(args.mosaic_tries) if args.mosaic_tries else MOSAIC_TRIES):
                try:
                    v = run(impl="mosaic", mosaic_settings=(gu, dn))
                except Exception as e:  # noqa: BLE001 (a variant that does not compile is recorded)
                    v = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                v.update(T=T, gate_up=gu, down=dn)
                v.pop("kernels", None)
                res.setdefault("mosaic_variants", []).append(v)
                print("mosaic variant", T, gu, dn, {kk: v.get(kk) for kk in ("ms", "speedup", "ok", "error")}, flush=True)
        if str(T) in args.reference_at.split(","):
            row["packed_reference_impl"] = run(impl="reference")
            print(f"T={T:4d} impl='reference' {row['packed_reference_impl']['ms'] * 1e3:8.1f}us "
                  f"x{row['packed_reference_impl']['speedup']:.2f}", flush=True)
        res["rows"].append(row)
        p = row["packed"]
        print(f"T={T:3d} active experts {len(active)} pairs {active_pairs}: dense {t_dense*1e3:8.1f}us "
              f"packed {p['ms']*1e3:8.1f}us x{p['speedup']:.2f} err {p['err']:.1e} ok={p['ok']}",
              flush=True)
        write_json(args.out, res)

        if str(T) in args.sweep.split(","):
            base_gu = K.layer_config(T * k, H, I, 4, fused=True)
            base_dn = K.layer_config(T * k, I, H, 4)
            tries = [
                (dict(evict_first=True), dict(evict_first=True)), (dict(bn=32), {}),
                ({}, dict(bk=128)), ({}, dict(split_k=4)), (dict(num_stages=3), dict(num_stages=3)),
                # taller row tiles: each extra row tile of a pair decodes its weights again
                (dict(bm=32, num_warps=4), dict(bm=32, num_warps=4)),
                (dict(bm=64), dict(bm=64)), (dict(bm=64, num_warps=8), dict(bm=64, num_warps=8)),
                (dict(bm=128, num_warps=8), dict(bm=128, num_warps=8)),
                (dict(bm=128, bn=128, num_warps=8), dict(bm=128, bn=128, num_warps=8)),
            ]
            for gu, dn in tries:
                if time.time() - t0 > args.budget_s:
                    break
                cg, cd = dataclasses.replace(base_gu, **gu), dataclasses.replace(base_dn, **dn)
                try:
                    v = run(cg, cd)
                except Exception as e:  # noqa: BLE001
                    v = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                v.update(T=T, gate_up=dataclasses.asdict(cg), down=dataclasses.asdict(cd))
                res["variants"].append(v)
                print("variant", T, gu, dn, {kk: v.get(kk) for kk in ("ms", "speedup", "err", "ok", "error")},
                      flush=True)
                write_json(args.out, res)
    res["elapsed_s"] = time.time() - t0
    write_json(args.out, res)
    print("\n   T  experts pairs   dense_us  packed_us  speedup   err      ok  mosaic_us speedup ok  reference_us speedup")
    for row in res["rows"]:
        p, m, r = row["packed"], row.get("packed_mosaic", {}), row.get("packed_reference_impl", {})
        nan = float("nan")
        print(f"{row['T']:4d} {row['active_experts']:7d} {row['active_pairs']:5d} {row['dense_ms']*1e3:10.1f} "
              f"{p['ms']*1e3:10.1f} {p['speedup']:8.2f} {p['err']:.1e} {p['ok']}  "
              f"{m.get('ms', nan)*1e3:9.1f} {m.get('speedup', nan):6.2f} {m.get('ok')}  "
              f"{r.get('ms', nan)*1e3:10.1f} {r.get('speedup', nan):6.2f}")


if __name__ == "__main__":
    main()
