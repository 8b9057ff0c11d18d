"""MoE layer step on the GPU: the packed layer against the best uncompressed path.

Default shape Mixtral-8x7B (E=8, H=4096, I=14336, top-2), every expert pair merged (ratio 0.5).
Per token count T, on the same routing (``peer_torch.routing``, seeded):

* uncompressed, ours: ``kernels.dense_moe_ffn`` impl "triton" (grouped kernel, reads only the
  experts with tokens) and impl "reference" (XLA ``jax.lax.ragged_dot``, streams every expert);
* uncompressed, PyTorch (``--peer``, default on): ``peer_torch.py`` in a subprocess started before
  JAX takes the GPU (cuBLAS loop over routed experts and ``torch._grouped_mm``, CUDA graphs);
* packed: ``kernels.packed_moe_ffn`` with each of ``--impls`` (default triton and mosaic; "auto"
  is what a model gets here).

JAX paths are timed with CUPTI (every kernel of the step summed), median of ``--iters``; PyTorch
with CUDA events around graph replays.  Each JAX path is checked against an f32 reference of the
same function (the packed layer against the f32 layer on its decoded experts, the dense paths
against the f32 layer on the original experts) on the step's own random data; NaN fails.
Each row prints its byte-ratio limit: bytes an uncompressed path must read for that routing
(experts touched) over the bytes the packed layer must read (pairs touched + kept-dense experts
touched).  Speed-up = best uncompressed time / packed time; "of limit" = speed-up / limit.

    PYTHONPATH=. python3 benchmarks/bench_moe_layer.py --seed 5 --out $OUT/bench_moe_layer.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

# the references upcast whole layers inside their jit: let JAX pool most of the GPU's memory
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

from common import bandwidth_ceilings, cupti_time, device_info, rel_err, sustained_time, write_json
from peer_torch import load_routing_pool, routing

import jax
import jax.numpy as jnp
import numpy as np

import kernels as K
from kernels.mosaic_ffn import to_mosaic_words
from puzzlemoe_jax.compress import compress_layer
from puzzlemoe_jax.moe import dense_moe_ffn

TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SHAPES = {"mixtral": (8, 4096, 14336, 2), "deepseek-v2-lite": (64, 2048, 1408, 6), "qwen3-30b-a3b": (128, 2048, 768, 8),
          "deepseek-v3": (256, 7168, 2048, 8)}
# --sweep: (gate+up, down) overrides of the packed launches' configs at the swept token counts
TRITON_TRIES = [({"evict_first": True}, {"evict_first": True}), ({}, {"block_k": 128}), ({}, {"split_k": 4}),
                ({"block_m": 32}, {"block_m": 32}), ({"block_m": 64, "num_warps": 8}, {"block_m": 64, "num_warps": 8})]
MOSAIC_TRIES = [({"num_stages": 4}, {"num_stages": 4}), ({"block_m": 64}, {"block_m": 64})]


def random_weights(E: int, H: int, I: int) -> dict:
    """bf16 SwiGLU experts ``[E, K, N]``, std 0.02, drawn on the device one matrix at a time."""
    keys = jax.random.split(jax.random.key(0), 3)
    shapes = {"w_gate": (E, H, I), "w_up": (E, H, I), "w_down": (E, I, H)}
    return {n: (0.02 * jax.random.normal(kk, shapes[n], jnp.float32)).astype(jnp.bfloat16)
            for kk, n in zip(keys, shapes)}


def run_peer(args, shape, tokens) -> dict:
    """``peer_torch.py`` in a subprocess on the same routing (before JAX takes the GPU)."""
    out = os.path.splitext(args.out)[0] + "_peer_torch.json"
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_torch.py"),
           "--tokens", tokens, "--seed", str(args.seed), "--skew", str(args.skew), "--iters", str(max(args.iters, 20)),
           *(["--routing-ids", args.routing_ids, "--routing-layer", str(args.routing_layer)] if args.routing_ids else []),
           "--shape", ",".join(map(str, shape)), "--out", out]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.peer_timeout_s)
    if p.returncode:
        return {"error": p.stderr[-600:]}
    with open(out) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description="MoE layer step: packed vs the best uncompressed path")
    ap.add_argument("--out", default="benchmarks/results/bench_moe_layer.json")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--shape", default="mixtral", choices=sorted(SHAPES), help="layer shape (E, H, I, top-k)")
    ap.add_argument("--ratio", type=float, default=0.5, help="compress_layer ratio (0.5: all merged)")
    ap.add_argument("--impls", default="triton,mosaic",
                    help=f"packed implementations to time, from {', '.join(K.IMPL_CHOICES)}")
    ap.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer")
    ap.add_argument("--peer-timeout-s", type=float, default=300)
    ap.add_argument("--no-xla", action="store_true", help="skip the XLA ragged_dot baseline")
    ap.add_argument("--seed", type=int, default=5, help="routing and activations seed")
    ap.add_argument("--skew", type=float, default=0.0,
                    help="router bias from +skew (expert 0) to -skew (the last expert): uneven expert loads")
    ap.add_argument("--routing-ids", help="benchmarks/routing_spill.py --save-ids file: each T's expert ids are T "
                    "distinct rows of a trained router's (layer --routing-layer) instead of random logits' top-k")
    ap.add_argument("--routing-layer", type=int, default=0)
    ap.add_argument("--sweep", default="", help="token counts at which to try config variants of the packed launches")
    ap.add_argument("--no-ceilings", action="store_true")
    ap.add_argument("--sustained-s", type=float, default=0.0,
                    help="also time ours dense and each packed path back to back after this many seconds of "
                         "warm-up (common.sustained_time: the GPU at its power cap, as serving keeps it)")
    args = ap.parse_args()
    impls = [i for i in args.impls.split(",") if i]
    for i in impls:
        if i not in K.IMPL_CHOICES:
            ap.error(f"--impls: {i!r} is not one of {', '.join(K.IMPL_CHOICES)}")
    t0 = time.time()
    E, H, I, k = SHAPES[args.shape]
    pool = load_routing_pool(args.routing_ids, args.routing_layer, E, k)
    tokens = [int(t) for t in args.tokens.split(",")]
    res = {"command": " ".join(sys.argv), "shape": dict(name=args.shape, E=E, H=H, I=I, topk=k, ratio=args.ratio,
                                                        skew=args.skew, routing_ids=args.routing_ids, routing_layer=args.routing_layer), "seed": args.seed, "rows": [], "variants": []}
    res["peer"] = {"skipped": True} if args.no_peer else run_peer(args, (E, H, I, k), args.tokens)
    # the peer draws the same routings in the same order: a T listed twice gets its rows in turn
    peer_rows: dict[int, list] = {}
    for r in res["peer"].get("rows", []):
        peer_rows.setdefault(r["T"], []).append(r)
    res["info"] = device_info()
    if not args.no_ceilings:
        res["ceilings"] = bandwidth_ceilings()
    weights = random_weights(E, H, I)
    experts, _ = compress_layer(weights, args.ratio)
    merged = jax.block_until_ready(experts.unpack(jnp.bfloat16))   # decoded weights are bf16 values
    mosaic_words = jax.block_until_ready(to_mosaic_words(experts.packed)) if experts.pairs.shape[0] else None
    expert_bytes = 2 * (2 * H * I + I * H)
    res["bytes"] = dict(dense=sum(int(w.size) * 2 for w in weights.values()), packed=experts.nbytes(),
                        expert=expert_bytes)
    print(res["info"], res.get("ceilings"), res["bytes"], flush=True)
    pairs = np.asarray(experts.pairs)
    dense_ids = set(np.asarray(experts.dense_ids).tolist())
    # f32 copies of the weights only inside the reference's jit (DeepSeek-V3's would not fit beside the rest)
    ref_fn = jax.jit(lambda x, ids, tw, w: dense_moe_ffn(x.astype(jnp.float32), ids, tw,
                                                         {n: v.astype(jnp.float32) for n, v in w.items()},
                                                         out_dtype=jnp.float32))
    rng = np.random.default_rng(args.seed)

    def timed(fn, fargs, ref):
        try:
            out, t, s, names = cupti_time(jax.jit(fn), fargs, iterations=args.iters, by_kernel=True)
        except Exception as e:  # noqa: BLE001 (a path that cannot run here is recorded)
            return dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        err, finite = rel_err(out, ref)
        return dict(ms=t, spread_ms=s, err=err, finite=finite, ok=finite and err < 1e-2, kernels=names)

    def sustained(fn, fargs, v):
        if args.sustained_s > 0 and v.get("ok"):
            v["sustained"] = sustained_time(jax.jit(fn), fargs, warm_s=args.sustained_s)

    for T in tokens:
        x_np, ids_np, tw_np = routing(rng, T, E, H, k, args.skew, pool)
        x, ids, tw = jnp.asarray(x_np, jnp.bfloat16), jnp.asarray(ids_np, jnp.int32), jnp.asarray(tw_np, jnp.float32)
        active = set(ids_np.ravel().tolist())
        pairs_touched = sum(1 for p in pairs if p[0] in active or p[1] in active)
        dense_touched = len(active & dense_ids)
        packed_bytes = (pairs_touched + dense_touched) * expert_bytes
        row = dict(T=T, active_experts=len(active), active_pairs=pairs_touched, active_kept_dense=dense_touched,
                   limit=len(active) / max(pairs_touched + dense_touched, 1), packed_bytes=packed_bytes,
                   dense_bytes=len(active) * expert_bytes,
                   expert_rows=np.bincount(ids_np.ravel(), minlength=E).tolist())
        ref_dense = ref_fn(x, ids, tw, weights)
        ref_packed = ref_fn(x, ids, tw, merged)
        dense_fn = lambda *a: K.dense_moe_ffn(*a, impl="triton")  # noqa: E731
        unc = {"ours_dense": timed(dense_fn, (x, ids, tw, weights), ref_dense)}
        sustained(dense_fn, (x, ids, tw, weights), unc["ours_dense"])
        if not args.no_xla:
            unc["xla_ragged_dot"] = timed(lambda *a: K.dense_moe_ffn(*a, impl="reference"), (x, ids, tw, weights),
                                          ref_dense)
        peer_row = peer_rows[T].pop(0) if peer_rows.get(T) else {}
        for name in ("loop", "grouped"):
            v = peer_row.get(name)
            if v and "ms" in v:
                unc["torch_" + name] = dict(v, ok=v.get("finite", True) and v["err"] < 1e-2)
        row["uncompressed"] = unc
        best = min((v for v in unc.values() if v.get("ok")), key=lambda v: v["ms"], default=None)
        row["best_uncompressed"] = min((n for n, v in unc.items() if v.get("ok")), key=lambda n: unc[n]["ms"], default=None)
        row["packed"] = {}
        for impl in impls:
            try:
                packed_fn = lambda x, ids, tw, ex, mw, impl=impl: K.packed_moe_ffn(  # noqa: E731
                    x, ids, tw, ex, impl=impl, mosaic_words=mw if K.resolve_impl(impl) == "mosaic" else None)
                v = timed(packed_fn, (x, ids, tw, experts, mosaic_words), ref_packed)
                sustained(packed_fn, (x, ids, tw, experts, mosaic_words), v)
            except Exception as e:  # noqa: BLE001 (an implementation that cannot run here is recorded)
                v = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            if best and "ms" in v:
                v["speedup"] = best["ms"] / v["ms"]
                v["of_limit"] = v["speedup"] / row["limit"]
                v["read_GBps"] = packed_bytes / v["ms"] / 1e6
            if "sustained" in v and "sustained" in unc["ours_dense"]:   # both back to back, at the power cap
                v["sustained_speedup"] = unc["ours_dense"]["sustained"]["ms"] / v["sustained"]["ms"]
                v["sustained_of_limit"] = v["sustained_speedup"] / row["limit"]
            row["packed"][impl] = v
        res["rows"].append(row)
        print(f"T={T:4d} experts {len(active)} pairs {pairs_touched} limit {row['limit']:.2f}  "
              + "  ".join(f"{n} {v.get('ms', float('nan')) * 1e3:.1f}us{'' if v.get('ok') else ' (FAILED)'}" for n, v in unc.items())
              + "  " + "  ".join(f"packed-{n} {v.get('ms', float('nan')) * 1e3:.1f}us x{v.get('speedup', float('nan')):.2f}"
                                 f" err {v.get('err', float('nan')):.1e}{'' if v.get('ok') else ' (FAILED)'}"
                                 for n, v in row["packed"].items()), flush=True)
        write_json(args.out, res)
        if str(T) in args.sweep.split(","):
            for impl in impls:
                run = K.resolve_impl(impl)
                tries = MOSAIC_TRIES if run == "mosaic" else TRITON_TRIES
                for gu, dn in tries:
                    try:
                        if run == "mosaic":
                            from kernels.mosaic_ffn import grouped_block_m, layer_configs
                            bm = gu.get("block_m", grouped_block_m(T * k, E, T))
                            base = layer_configs(bm, T * k, int(pairs.shape[0]), H, I)
                            cfgs = (dataclasses.replace(base[0], **gu), dataclasses.replace(base[1], **dn))
                        else:
                            from kernels.triton_gemm import layer_config
                            cfgs = (dataclasses.replace(layer_config(T * k, H, I, swiglu=True), **gu),
                                    dataclasses.replace(layer_config(T * k, I, H), **dn))
                        v = timed(lambda x, ids, tw, ex, mw, impl=impl, cfgs=cfgs: K.packed_moe_ffn(
                            x, ids, tw, ex, impl=impl, configs=cfgs, mosaic_words=mw if run == "mosaic" else None),
                            (x, ids, tw, experts, mosaic_words), ref_packed)
                        v.pop("kernels", None)
                    except Exception as e:  # noqa: BLE001 (a variant that does not compile is recorded)
                        v = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                    v.update(T=T, impl=impl, gate_up=gu, down=dn)
                    res["variants"].append(v)
                    print("variant", T, impl, gu, dn, {kk: v.get(kk) for kk in ("ms", "err", "ok", "error")}, flush=True)
            write_json(args.out, res)
    res["elapsed_s"] = time.time() - t0
    write_json(args.out, res)
    print_table(res, impls)


def print_table(res, impls):
    nan = float("nan")
    unc_names = ["ours_dense", "xla_ragged_dot", "torch_loop", "torch_grouped"]
    print(f"\n{res['shape']}  {res['info']['device']}  seed {res['seed']}  (us; speed-up vs the best uncompressed)")
    print("   T  exp pairs limit | " + " ".join(f"{n:>14s}" for n in unc_names) + " | best           | "
          + " ".join(f"{'packed-' + i:>14s} {'x':>5s} {'of lim':>6s} {'TB/s':>5s}" for i in impls))
    for row in res["rows"]:
        u = row["uncompressed"]
        cells = [f"{u[n].get('ms', nan) * 1e3:14.1f}" if n in u else f"{'-':>14s}" for n in unc_names]
        best = row["best_uncompressed"] or "-"
        out = []
        for i in impls:
            p = row["packed"].get(i, {})
            out.append(f"{p.get('ms', nan) * 1e3:14.1f} {p.get('speedup', nan):5.2f} {p.get('of_limit', nan):6.2f} "
                       f"{p.get('read_GBps', nan) / 1e3:5.2f}{'' if p.get('ok') else '!'}")
        print(f"{row['T']:4d} {row['active_experts']:4d} {row['active_pairs']:5d} {row['limit']:5.2f} | "
              + " ".join(cells) + f" | {best:14s} | " + " ".join(out))
    rows = [r for r in res["rows"] if "sustained" in r["uncompressed"].get("ours_dense", {})]
    if rows:
        print("\nback to back (common.sustained_time): us per call, mean SM MHz / board W; packed vs ours dense")
        for row in rows:
            d = row["uncompressed"]["ours_dense"]["sustained"]
            cells = [f"ours dense {d['ms'] * 1e3:8.1f} ({d['sm_mhz'] or nan:.0f} / {d['power_w'] or nan:.0f})"]
            for i in impls:
                p = row["packed"].get(i, {})
                if "sustained" in p:
                    q = p["sustained"]
                    cells.append(f"packed-{i} {q['ms'] * 1e3:8.1f} ({q['sm_mhz'] or nan:.0f} / {q['power_w'] or nan:.0f}) "
                                 f"x {p['sustained_speedup']:.2f} of lim {p['sustained_of_limit']:.3f}")
            print(f"{row['T']:4d}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
