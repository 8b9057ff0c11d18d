"""Pair decode-GEMM sweep on the GPU: fused kernel vs XLA's two bf16 dots (uncompressed experts).

For each weight shape [K, N] and tokens per expert M: the baseline is ``A_i @ W_i, A_j @ W_j``
with bf16 W (two cuBLAS/XLA dots, 2*K*N*2 bytes of weights); the kernel reads the packed pair
once (K*N*2 bytes).  Timing: CUPTI kernel times (all kernels of a call summed, so padding and
split-K reductions count), median of ``--iters`` launches; each launch runs R calls over R
distinct weight buffers so the weights streamed per launch exceed L2 several times.
Every timed kernel variant's output is checked against the jnp reference (f32) on fresh random
data, NaN-free.

    PYTHONPATH=. python3 benchmarks/bench_kernel.py --out $OUT/bench_kernel.json
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time

from common import bandwidth_ceilings, cupti_time, device_info, rel_err, write_json, L2_BYTES

import jax
import jax.numpy as jnp
import numpy as np

import kernels as K
from kernels.reference import pair_gemm_reference
from kernels.triton_gemm import TritonConfig, pair_config, triton_pair_gemm
from puzzlemoe_jax.merge import merge_pairs

SHAPES = {  # name: (K, N) in the x @ W layout
    "mixtral_w1w3": (4096, 14336),
    "mixtral_w2": (14336, 4096),
    "deepseek_v2_lite_w1w3": (2048, 1408),   # also Qwen1.5-MoE-A2.7B
    "deepseek_v2_lite_w2": (1408, 2048),
    "qwen3_30b_a3b_w1w3": (2048, 768),
    "qwen3_30b_a3b_w2": (768, 2048),
}
SMOKE_SHAPES = {"tiny": (256, 128)}  # CPU smoke test only (--shapes tiny)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256]

SMALL_M_VARIANTS = [
    dict(block_k=64, num_warps=8), dict(block_n=128, block_k=64, num_warps=8), dict(block_k=64, num_stages=6),
    dict(block_n=32), dict(block_n=128, block_k=64), dict(block_k=64), dict(block_k=256), dict(num_warps=8),
    dict(num_stages=3), dict(num_stages=6), dict(swap_ab=True, block_n=128, block_k=64),
    dict(split="x2"), dict(split="/2"),
]
LARGE_M_VARIANTS = [
    dict(block_m=64, block_n=128, block_k=64, num_warps=8), dict(block_m=128, block_n=128, block_k=64, num_warps=8),
    dict(block_m=64, block_n=64, block_k=128), dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
    dict(block_m=64, block_n=128, block_k=64, num_warps=4), dict(swap_ab=True, block_m=64, block_n=128, block_k=64, num_warps=8),
]


def variant(base: TritonConfig, m: int, k: int, change: dict) -> TritonConfig | None:
    change = dict(change)
    split = change.pop("split", None)
    cfg = dataclasses.replace(base, **change)
    if split == "x2":
        cfg = dataclasses.replace(cfg, split_k=cfg.split_k * 2)
    elif split == "/2":
        if cfg.split_k == 1:
            return None
        cfg = dataclasses.replace(cfg, split_k=cfg.split_k // 2)
    if cfg.block_m > max(16, 2 * m) and cfg.block_m > base.block_m:
        return None
    if cfg.split_k > 1 and (k // cfg.block_k) % cfg.split_k:
        return None
    return cfg


def rotation(packed_bytes: int, cap: int) -> int:
    """Distinct weight buffers per launch: >= 2x L2 of packed words (4x for the bf16 baseline)."""
    return min(cap, max(2, math.ceil(2 * L2_BYTES / packed_bytes)))


def make_buffers(k, n, count, seed):
    """``count`` distinct merged pairs: (packed words, W_i bf16, W_j bf16) each."""
    bufs = []
    for r in range(count):
        key_i, key_j = jax.random.split(jax.random.key(seed * 1000 + r))
        w_i = (0.02 * jax.random.normal(key_i, (k, n), jnp.float32)).astype(jnp.bfloat16)
        w_j = (0.02 * jax.random.normal(key_j, (k, n), jnp.float32)).astype(jnp.bfloat16)
        words, _ = merge_pairs(w_i, w_j)
        bufs.append((words, w_i, w_j))
    return bufs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_kernel.json")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop the variant sweep after this")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--variants", default="mixtral", help="none | diag | mixtral | all")
    ap.add_argument("--max-rotate", type=int, default=32, help="cap on rotated weight buffers")
    args = ap.parse_args()
    t_start = time.time()
    res = {"info": device_info(), "command": " ".join(__import__("sys").argv),
           "ceilings": bandwidth_ceilings(), "rows": [], "variants": [], "checks": []}
    copy_bw = res["ceilings"]["copy_GBps"]
    print(res["info"], res["ceilings"], flush=True)
    ms = [int(x) for x in args.ms.split(",")]

    # --- correctness on the GPU: odd/zero token counts, transposed words, masked edges -------
    rng = np.random.default_rng(int(time.time()))
    for (mi, mj, k, n, tw) in [(0, 3, 256, 128, False), (1, 1, 2048, 1408, False),
                               (7, 13, 1408, 2048, True), (5, 2, 200, 96, False),
                               (33, 64, 4096, 512, False), (130, 256, 768, 2048, False)]:
        words = jnp.asarray(rng.integers(0, 1 << 16, size=(n, k) if tw else (k, n), dtype=np.uint16))
        words = words & jnp.uint16(0xF3FF)  # magnitudes <= 2**4: keeps sums far from overflow
        a_i = jnp.asarray(rng.standard_normal((mi, k)), jnp.bfloat16)
        a_j = jnp.asarray(rng.standard_normal((mj, k)), jnp.bfloat16)
        try:
            got = triton_pair_gemm(a_i, a_j, words, transposed=tw)
            ref = pair_gemm_reference(a_i, a_j, words, transposed=tw, out_dtype=jnp.float32)
            (ei, fi), (ej, fj) = rel_err(got[0], ref[0]), rel_err(got[1], ref[1])
            ok = fi and fj and ei < 1e-2 and ej < 1e-2
            res["checks"].append(dict(mi=mi, mj=mj, k=k, n=n, transpose_w=tw, err_i=ei, err_j=ej, ok=ok))
        except Exception as e:  # noqa: BLE001
            res["checks"].append(dict(mi=mi, mj=mj, k=k, n=n, transpose_w=tw, ok=False,
                                      error=f"{type(e).__name__}: {str(e)[:300]}"))
        print("check", res["checks"][-1], flush=True)

    def time_pair(fn, a_i, a_j, bufs, r):
        return cupti_time(jax.jit(fn), (a_i, a_j, *bufs), iterations=args.iters, per_call=r)

    for shape_name in args.shapes.split(","):
        k, n = {**SHAPES, **SMOKE_SHAPES}[shape_name]
        packed_bytes = k * n * 2
        r = rotation(packed_bytes, args.max_rotate)
        bufs = make_buffers(k, n, r, seed=len(res["rows"]))
        words = [b[0] for b in bufs]
        dense = [w for b in bufs for w in b[1:]]
        for m in ms:
            key = jax.random.key(m + 17 * k + n)
            a_i, a_j = (jax.random.normal(kk, (m, k), jnp.float32).astype(jnp.bfloat16)
                        for kk in jax.random.split(key))
            ref = pair_gemm_reference(a_i, a_j, words[0], out_dtype=jnp.float32)

            def base_fn(a_i, a_j, *ws):
                return [(a_i @ ws[2 * q], a_j @ ws[2 * q + 1]) for q in range(len(ws) // 2)]
            _, t_base, s_base, _ = time_pair(base_fn, a_i, a_j, dense, r)
            row = dict(shape=shape_name, k=k, n=n, m=m, rotate=r, packed_bytes=packed_bytes,
                       baseline_ms=t_base, baseline_spread_ms=s_base,
                       baseline_GBps=2 * packed_bytes / t_base / 1e6)

            def run_kernel(cfg, impl="triton"):
                fn = lambda a_i, a_j, *ws: [K.pair_gemm(a_i, a_j, w, config=cfg, impl=impl)
                                            for w in ws]
                out, t, s, names = time_pair(fn, a_i, a_j, words, r)
                (e_i, f_i), (e_j, f_j) = rel_err(out[0][0], ref[0]), rel_err(out[0][1], ref[1])
                ok = f_i and f_j and e_i < 1e-2 and e_j < 1e-2
                return dict(ms=t, spread_ms=s, err=max(e_i, e_j), finite=f_i and f_j, ok=ok,
                            kernels=names, GBps=packed_bytes / t / 1e6,
                            frac_copy_bw=packed_bytes / t / 1e6 / copy_bw, speedup=t_base / t)

            cfg = pair_config(m, k, n)
            row["config"] = dataclasses.asdict(cfg)
            try:
                row["kernel"] = run_kernel(cfg)
            except Exception as e:  # noqa: BLE001
                row["kernel"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}", ms=float("nan"),
                                     speedup=float("nan"), GBps=float("nan"),
                                     frac_copy_bw=float("nan"), ok=False, err=float("nan"))
            if m in (1, 64, 128, 256):
                row["decode_then_dots"] = run_kernel(None, impl="reference")
            res["rows"].append(row)
            kr = row["kernel"]
            print(f"{shape_name:24s} M={m:4d} base {t_base*1e3:8.1f}us  kernel {kr['ms']*1e3:8.1f}us "
                  f"x{kr['speedup']:.2f}  {kr['GBps']:.0f} GB/s ({kr['frac_copy_bw']:.0%} copy) "
                  f"err {kr['err']:.1e} ok={kr['ok']}", flush=True)
            write_json(args.out, res)

    # --- variant sweep (tile table tuning), within the time budget -------------------------
    if args.variants != "none":
        sweep_shapes = [s for s in args.shapes.split(",")
                        if args.variants == "all" or s.startswith(("mixtral", "tiny"))]
        order = [m for m in (16, 1, 64, 256, 4, 32, 128, 8, 2) if m in ms]
        if args.variants == "diag":
            order = [m for m in (16, 1, 256) if m in ms]
        for m in order:
            for shape_name in sweep_shapes:
                if time.time() - t_start > args.budget_s:
                    break
                k, n = {**SHAPES, **SMOKE_SHAPES}[shape_name]
                packed_bytes = k * n * 2
                r = rotation(packed_bytes, args.max_rotate)
                bufs = make_buffers(k, n, r, seed=99)
                words = [b[0] for b in bufs]
                a_i, a_j = (jax.random.normal(kk, (m, k), jnp.float32).astype(jnp.bfloat16)
                            for kk in jax.random.split(jax.random.key(m)))
                ref = pair_gemm_reference(a_i, a_j, words[0], out_dtype=jnp.float32)
                base = pair_config(m, k, n)
                changes = SMALL_M_VARIANTS if m <= 32 else LARGE_M_VARIANTS
                if args.variants == "diag":  # no_decode: same kernel streaming words as bf16
                    changes = [dict(evict_first=True), dict(no_decode=True)]
                for change in [{}] + changes:
                    if time.time() - t_start > args.budget_s:
                        break
                    change = dict(change)
                    no_decode = change.pop("no_decode", False)
                    cfg = variant(base, m, k, change)
                    if cfg is None:
                        continue
                    fn = lambda a_i, a_j, *ws, cfg=cfg, nd=no_decode: [
                        triton_pair_gemm(a_i, a_j, w, config=cfg, diagnostic="no_decode" if nd else None)
                        for w in ws]
                    try:
                        out, t, s, _ = time_pair(fn, a_i, a_j, words, r)
                        (e_i, f_i), (e_j, f_j) = rel_err(out[0][0], ref[0]), rel_err(out[0][1], ref[1])
                        v = dict(shape=shape_name, m=m, config=dataclasses.asdict(cfg), ms=t,
                                 spread_ms=s, err=max(e_i, e_j), ok=f_i and f_j and max(e_i, e_j) < 1e-2,
                                 GBps=packed_bytes / t / 1e6, no_decode=no_decode)
                        if no_decode:
                            v["ok"] = v["err"] = None  # diagnostic: computes another function
                    except Exception as e:  # noqa: BLE001  (a variant that fails to compile)
                        v = dict(shape=shape_name, m=m, config=dataclasses.asdict(cfg),
                                 error=f"{type(e).__name__}: {str(e)[:300]}")
                    res["variants"].append(v)
                    print("variant", {kk: vv for kk, vv in v.items() if kk != "config"},
                          {kk: vv for kk, vv in v.get("config", {}).items()}, flush=True)
                    write_json(args.out, res)
    res["elapsed_s"] = time.time() - t_start
    write_json(args.out, res)

    print("\nshape                      M   base_us  kernel_us  speedup  GB/s  %copy  dec+dots_us  ok")
    for row in res["rows"]:
        kr = row["kernel"]
        dd = row.get("decode_then_dots", {}).get("ms")
        print(f"{row['shape']:24s} {row['m']:4d} {row['baseline_ms']*1e3:9.1f} {kr['ms']*1e3:9.1f} "
              f"{kr['speedup']:7.2f} {kr['GBps']:6.0f} {kr['frac_copy_bw']:5.0%} "
              f"{(dd or float('nan'))*1e3:10.1f}  {kr['ok']}")
    print("ceilings", res["ceilings"])


if __name__ == "__main__":
    main()
