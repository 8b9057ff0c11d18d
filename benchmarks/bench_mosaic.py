"""Mosaic-GPU swap-AB pair kernel vs the Pallas-Triton pair kernel vs XLA's two bf16 dots (H100).

Same method as ``bench_kernel.py`` (CUPTI kernel times summed per call, median of ``--iters``,
R distinct weight buffers per launch so the weights streamed exceed L2; every timed variant's
output checked against the jnp reference on fresh random data).  The Mosaic kernel reads the
words stored transposed, ``[N, K]`` (``words.T``, prepared once, outside the timing).

    PYTHONPATH=. python3 benchmarks/bench_mosaic.py --out $OUT/bench_mosaic.json
    PYTHONPATH=. python3 benchmarks/bench_mosaic.py --variants energy --rotate 8 --sustained-s 1.0   # at the cap
"""
from __future__ import annotations

import argparse
import time

from common import bandwidth_ceilings, cupti_time, device_info, rel_err, sustained_time, write_json
from bench_kernel import SHAPES, SMOKE_SHAPES, make_buffers, rotation

import jax
import jax.numpy as jnp

import kernels as K
from kernels.gpu import k_splits, smem_budget
from kernels.mosaic_gemm import MosaicConfig, mosaic_pair_gemm, padded_tokens
from kernels.reference import pair_gemm_reference
from kernels.triton_gemm import triton_pair_gemm

SMEM_BYTES = smem_budget()

VARIANTS = [  # Mosaic kernel settings tried at every (shape, M)
    dict(block_n=64, block_k=128, steps=4), dict(block_n=128, block_k=64, steps=4),
    dict(block_n=64, block_k=64, steps=6), dict(block_n=64, block_k=128, steps=4, a_in_smem=True),
]
# --variants controls: where the time goes (no_decode / stream_only compute other functions)
CONTROL_VARIANTS = [
    dict(block_n=64, block_k=128, steps=4, decode="select"),
    dict(block_n=64, block_k=128, steps=4, _control="no_decode"),
    dict(block_n=64, block_k=128, steps=4, _control="stream_only"),
    dict(block_n=128, block_k=128, steps=4, _control="stream_only"),
    dict(block_n=64, block_k=256, steps=4, _control="stream_only"),
    dict(block_n=64, block_k=128, steps=8, _control="stream_only"),
    dict(block_n=64, block_k=64, steps=4, _control="stream_only"),
]
# --variants energy: the same launch with and without the decode and the MMAs, to time back to back
# (--sustained-s) where the board's power cap sets the clock: what each part costs in energy
ENERGY_VARIANTS = [dict(block_n=64, block_k=128, steps=2, decode="prmt"),
                   dict(block_n=64, block_k=128, steps=2, _control="no_decode"),
                   dict(block_n=64, block_k=128, steps=2, _control="stream_only")]
# --variants decode: one word per 16-bit op ("select") vs two per 32-bit op ("swar", "prmt")
DECODE_VARIANTS = [
    dict(block_n=64, block_k=128, steps=4, decode="select"), dict(block_n=64, block_k=128, steps=4, decode="swar"),
    dict(block_n=64, block_k=128, steps=4, decode="prmt"),
    dict(block_n=64, block_k=128, steps=4, _control="no_decode"),
    dict(block_n=128, block_k=64, steps=4, decode="swar"), dict(block_n=64, block_k=64, steps=6, decode="swar"),
]

# --variants split: the grid (K splits) and pipeline depth around mosaic_config's choice
SPLIT_VARIANTS = [dict(block_n=64, block_k=128, steps=st, split_k=sp, decode="swar")
                  for sp in (1, 2, 4) for st in (4, 6)]

# --variants large: many tokens per expert (M >= 64): token blocks over CTAs (block_m), shallower
# pipelines small enough for two CTAs per SM (<= ~113 KB shared memory), K splits
LARGE_VARIANTS = [dict(block_n=64, block_k=bk, block_m=bm, steps=st, split_k=sp, decode="swar")
                  for bm, bk, st, sp in ((128, 128, 2, 1), (128, 64, 4, 1), (128, 64, 3, 1), (64, 128, 2, 1),
                                         (64, 64, 4, 1), (64, 64, 3, 1), (64, 64, 3, 2), (32, 64, 4, 1))]

# --variants occupancy: pipeline depth / K depth at mosaic_config's token block and K splits
# (split_k "auto"), from <= ~113 KB of shared memory (two CTAs per SM) to the 200 KB cap
OCCUPANCY_VARIANTS = [dict(block_n=64, block_k=bk, steps=st, split_k="auto", decode="swar")
                      for bk, st in ((128, 2), (128, 3), (128, 4), (64, 2), (64, 3), (64, 4), (64, 6))]


def main():
    ap = argparse.ArgumentParser(description="Mosaic-GPU pair kernel vs the Triton pair kernel vs two XLA dots")
    ap.add_argument("--out", default="bench_mosaic.json")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--shapes", default="mixtral_w1w3,mixtral_w2")
    ap.add_argument("--ms", default="1,4,16,32,64,128")
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--interpret", action="store_true", help="CPU smoke test (Mosaic interpreter)")
    ap.add_argument("--rotate", type=int, default=0,
                    help="weight buffers per call (default: enough to exceed L2); more keep a back-to-back call "
                         "longer than its host dispatch")
    ap.add_argument("--sustained-s", type=float, default=0.0,
                    help="also time each variant back to back after this many seconds of warm-up, with the SM "
                         "clock and board power (common.sustained_time)")
    ap.add_argument("--variants", default="main",
                    choices=["main", "controls", "energy", "decode", "default", "split", "large", "occupancy"],
                    help="default: only pair_gemm(impl='mosaic') with mosaic_config's settings")
    args = ap.parse_args()
    if args.rotate < 0 or args.sustained_s < 0:
        ap.error(f"--rotate and --sustained-s must be >= 0, got {args.rotate} and {args.sustained_s}")
    t0 = time.time()
    res = {"info": device_info(), "command": " ".join(__import__("sys").argv), "rows": []}
    if not args.interpret:
        res["ceilings"] = bandwidth_ceilings()
    copy_bw = res.get("ceilings", {}).get("copy_GBps", float("nan"))
    print(res["info"], res.get("ceilings"), flush=True)
    for shape in args.shapes.split(","):
        k, n = {**SHAPES, **SMOKE_SHAPES}[shape]
        nbytes = k * n * 2
        r = args.rotate or rotation(nbytes, 32)
        bufs = make_buffers(k, n, r, seed=5)
        words = [b[0] for b in bufs]
        words_t = [jax.block_until_ready(jnp.array(w.T)) for w in words]
        dense = [w for b in bufs for w in b[1:]]
        for m in [int(x) for x in args.ms.split(",")]:
            if time.time() - t0 > args.budget_s:
                res.setdefault("not_run", []).append(f"{shape} M={m}: time budget")
                continue
            a_i, a_j = (jax.random.normal(kk, (m, k), jnp.float32).astype(jnp.bfloat16)
                        for kk in jax.random.split(jax.random.key(m + k)))
            ref = pair_gemm_reference(a_i, a_j, words[0], out_dtype=jnp.float32)
            row = dict(shape=shape, k=k, n=n, m=m, rotate=r, packed_bytes=nbytes, timings={})

            def timed(name, fn, ws):
                try:
                    jitted = jax.jit(fn)
                    out, t, spread, kern = cupti_time(jitted, (a_i, a_j, *ws), iterations=args.iters, per_call=r)
                    (ei, fi), (ej, fj) = rel_err(out[0][0], ref[0]), rel_err(out[0][1], ref[1])
                    # two_dots multiplies the original (unmerged) weights: its err is not a check
                    checked = name != "two_dots" and "_control" not in name
                    row["timings"][name] = dict(ms=t, spread_ms=spread, err=max(ei, ej), ok=fi and fj and max(ei, ej) < 1e-2
                                                if checked else None,
                                                GBps=nbytes / t / 1e6, frac_copy_bw=nbytes / t / 1e6 / copy_bw,
                                                kernels=kern)
                    if args.sustained_s > 0:   # ms per launch, as the burst figure; about 1 s of calls timed
                        sus = sustained_time(jitted, (a_i, a_j, *ws), warm_s=args.sustained_s,
                                             calls=max(200, int(1000 / (t * r))))
                        row["timings"][name]["sustained"] = {**sus, "ms": sus["ms"] / r}
                except Exception as e:  # noqa: BLE001 (a variant that does not compile is recorded)
                    row["timings"][name] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
                print(shape, m, name, {kk: v for kk, v in row["timings"][name].items() if kk != "kernels"}, flush=True)

            if not args.interpret:
                timed("two_dots", lambda a_i, a_j, *ws: [(a_i @ ws[2 * q], a_j @ ws[2 * q + 1])
                                                         for q in range(len(ws) // 2)], dense)
                timed("triton", lambda a_i, a_j, *ws: [triton_pair_gemm(a_i, a_j, w) for w in ws], words)
            if args.variants in ("default", "large", "occupancy"):
                timed("mosaic_default", lambda a_i, a_j, *ws: [
                    K.pair_gemm(a_i, a_j, w, transposed=True, impl="mosaic", interpret=args.interpret)
                    for w in ws], words_t)
            for v in {"main": VARIANTS, "controls": CONTROL_VARIANTS, "energy": ENERGY_VARIANTS,
                      "decode": DECODE_VARIANTS, "default": [], "split": SPLIT_VARIANTS,
                      "large": LARGE_VARIANTS, "occupancy": OCCUPANCY_VARIANTS}[args.variants]:
                if args.interpret and v.get("decode") in ("swar", "prmt"):
                    continue   # the interpreter has no inline_mgpu
                bn, bk = v["block_n"], v["block_k"]
                # the rule of the runs recorded with these variant lists (>= 200 CTAs; mosaic_config now uses 128)
                mp, bm = padded_tokens(m, v.get("block_m"))
                split = v.get("split_k") or k_splits(k // bk, (n // bn) * (mp // bm), 200)
                if split == "auto":   # mosaic_config's rule
                    split = k_splits(k // bk, (n // bn) * (mp // bm), 128)
                if k % (bk * split):
                    continue
                smem = v["steps"] * 2 * bk * (bn + 2 * bm)
                if smem > SMEM_BYTES:
                    continue
                name = "mosaic_" + "_".join(f"{kk}{vv}" for kk, vv in v.items() if kk != "split_k") + f"_split{split}"
                cfg = MosaicConfig(block_m=bm, block_n=bn, block_k=bk, num_stages=v["steps"], split_k=split,
                                   decode=v.get("decode"), a_in_smem=v.get("a_in_smem"))
                timed(name, lambda a_i, a_j, *ws, cfg=cfg, diag=v.get("_control"): [
                    mosaic_pair_gemm(a_i, a_j, w, config=cfg, interpret=args.interpret, diagnostic=diag) for w in ws],
                    words_t)
            base = row["timings"].get("two_dots", {}).get("ms")
            for t in row["timings"].values():
                if base and "ms" in t:
                    t["speedup"] = base / t["ms"]
            res["rows"].append(row)
            write_json(args.out, res)
    res["elapsed_s"] = time.time() - t0
    write_json(args.out, res)
    print("\nshape          M  variant                                            us     GB/s  %copy  speedup ok")
    for row in res["rows"]:
        for name, t in row["timings"].items():
            if "ms" in t:
                print(f"{row['shape']:13s} {row['m']:3d}  {name:48s} {t['ms'] * 1e3:8.1f} {t['GBps']:7.0f} "
                      f"{t['frac_copy_bw']:6.0%} {t.get('speedup', float('nan')):6.2f}  {t['ok']}")
            else:
                print(f"{row['shape']:13s} {row['m']:3d}  {name:48s} {t['error'][:120]}")


if __name__ == "__main__":
    main()
