"""Launch settings of the packed Mosaic layer (gate+up, down) around ``mosaic_ffn.layer_configs``.

Per shape and token count T, on ``bench_moe_layer``'s routing and random layer, times the whole
packed layer step (CUPTI, every kernel summed, median of ``--iters``) for each variant and reads
each launch's own time by its kernel name, so one compiled variant measures one gate+up and one
down setting.  Variants override the defaults (``VARIANTS``: pairs of overrides); "old" is the
rule before the live-tile estimate (configs sized for every pair).  Settings that do not fit
shared memory or do not divide K are skipped.  ``--variants`` replaces ``VARIANTS`` (and drops
"old") with a JSON list of such pairs, e.g. the decode forms:
'[[{}, {}], [{"decode": "prmt"}, {"decode": "prmt"}]]'.  ``--block-m`` tries the default settings
at other token blocks instead (the layout's block follows the gate+up config's).  Every run is
checked against the f32 layer on the decoded experts (rel. err < 1e-2, finite).  Prints a table per
shape, writes JSON.

    PYTHONPATH=. python3 benchmarks/sweep_mosaic.py --out $OUT/sweep_mosaic.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from common import cupti_time, device_info, rel_err, sustained_time, write_json
from bench_moe_layer import SHAPES, random_weights
from peer_torch import load_routing_pool, routing

import jax
import jax.numpy as jnp
import numpy as np

import kernels as K
from kernels.gpu import smem_budget
from kernels.mosaic_ffn import SWIGLU_MAX_BLOCK_M, grouped_block_m, layer_configs, swiglu_in_kernel, to_mosaic_words
from kernels.mosaic_gemm import mosaic_config, stage_bytes
from puzzlemoe_jax.compress import compress_layer
from puzzlemoe_jax.moe import dense_moe_ffn

# (gate+up overrides, down overrides): one compiled layer per pair
VARIANTS = [
    ({}, {}),
    ({"num_stages": 3}, {"num_stages": 4}),
    ({"num_stages": 4}, {"num_stages": 6}),
    ({"block_k": 64, "num_stages": 4}, {"num_stages": 4, "split_k": 2}),
    ({"block_k": 256, "num_stages": 2}, {"num_stages": 4, "split_k": 4}),
    ({"block_n": 128, "block_k": 64, "num_stages": 4}, {"block_k": 64, "num_stages": 8}),
    ({"num_stages": 4, "split_k": 2}, {"block_k": 256, "num_stages": 3}),
    ({"num_stages": 4, "split_k": 4}, {"block_n": 128, "num_stages": 4}),
]


def smem_bytes(c, word_tiles: int) -> int:
    return c.num_stages * stage_bytes(c.block_k, c.block_n * c.consumer_wgs, c.block_m, word_tiles)


def variant_configs(base, over, block_m, H, I):
    """The variant's (gate+up, down) configs, or a reason to skip it."""
    # a variant that splits K without naming token_major_out gets the launch's transposed form
    pick = lambda c, o: dataclasses.replace(  # noqa: E731
        c, **{"token_major_out": c.token_major_out and o.get("split_k", c.split_k) == 1, **o})
    gu, dn = pick(base[0], over[0]), pick(base[1], over[1])
    fused = swiglu_in_kernel(block_m, gu)
    for c, k, tiles in ((gu, H, 2 if fused else 1), (dn, I, 1)):
        if smem_bytes(c, tiles) > smem_budget():
            return None, f"shared memory {smem_bytes(c, tiles)} > {smem_budget()}"
        if k % (c.block_k * c.split_k):
            return None, f"K={k} not a multiple of {c.block_k}*{c.split_k}"
        if c.token_major_out and c.split_k > 1:
            return None, "token_major_out takes split_k = 1"
    return (gu, dn), None


def launch_times(kernels: dict) -> dict:
    """{launch: ms} from CUPTI's per-kernel medians (the two launches by name, the rest summed)."""
    out = {"gate_up": 0.0, "down": 0.0, "other": 0.0}
    for name, ms in kernels.items():
        out["gate_up" if "mosaic_gate_up" in name else "down" if "mosaic_down" in name else "other"] += ms
    return out


def sweep_shape(args, shape, tokens, res, t0):
    E, H, I, k = SHAPES[shape]
    pool = load_routing_pool(args.routing_ids, args.routing_layer, E, k)
    weights = random_weights(E, H, I)
    experts, _ = compress_layer(weights, 0.5)
    del weights
    merged_f32 = jax.block_until_ready(experts.unpack(jnp.float32))
    words = jax.block_until_ready(to_mosaic_words(experts.packed))
    P = experts.pairs.shape[0]
    pairs = np.asarray(experts.pairs)
    expert_bytes = 2 * 3 * H * I
    ref_fn = jax.jit(lambda x, ids, tw, w: dense_moe_ffn(x.astype(jnp.float32), ids, tw, w, out_dtype=jnp.float32))
    rng = np.random.default_rng(args.seed)
    for T in tokens:
        draws = []   # (x, ids, tw, ref, touched pairs, most rows of an expert) per routing drawn
        for _ in range(args.draws):
            x_np, ids_np, tw_np = routing(rng, T, E, H, k, pool=pool)
            x, ids, tw = jnp.asarray(x_np, jnp.bfloat16), jnp.asarray(ids_np, jnp.int32), jnp.asarray(tw_np, jnp.float32)
            active = set(ids_np.ravel().tolist())
            touched = sum(1 for p in pairs if p[0] in active or p[1] in active)
            max_rows = int(np.bincount(ids_np.ravel(), minlength=E).max())   # over the block: a spill
            draws.append((x, ids, tw, ref_fn(x, ids, tw, merged_f32), touched, max_rows))
        bm = grouped_block_m(T * k, E, T)
        base = layer_configs(bm, T * k, P, H, I)
        fused = bm <= SWIGLU_MAX_BLOCK_M
        old = (mosaic_config(bm, H, 2 * I, m_blocks=P, word_tiles=2 if fused else 1),
               mosaic_config(bm, I, H, m_blocks=P))
        if args.block_m:   # the default settings at other token blocks (a block over T rows is no use)
            tries = [(f"b{b}", layer_configs(b, T * k, P, H, I), None) for b in args.block_m if b <= max(8, -(-T // 8) * 8)]
        else:
            tries = [] if args.variants else [("old", old, None)]
            tries += [(f"v{n}", *variant_configs(base, over, bm, H, I))
                      for n, over in enumerate(args.variants or VARIANTS)]
        seen = set()
        for name, cfgs, skip in tries:
            if cfgs is not None and not skip:
                skip = "same as an earlier variant" if cfgs in seen else None
                seen.add(cfgs)
            # one compiled function per variant, timed on every draw (same shapes: no recompile)
            fn = jax.jit(lambda x, ids, tw, ex, mw, cfgs=cfgs: K.packed_moe_ffn(
                x, ids, tw, ex, impl="mosaic", configs=cfgs, mosaic_words=mw))
            for d, (x, ids, tw, ref, touched, max_rows) in enumerate(draws):
                v = dict(shape=shape, T=T, variant=name, draw=d, block_m=cfgs[0].block_m if cfgs else bm,
                         active_pairs=touched, packed_bytes=touched * expert_bytes, max_rows=max_rows)
                if cfgs is not None:
                    v.update(gate_up=dataclasses.asdict(cfgs[0]), down=dataclasses.asdict(cfgs[1]))
                if skip:
                    v["skipped"] = skip
                elif time.time() - t0 > args.budget_s:
                    v["skipped"] = "time budget"
                else:
                    try:
                        out, ms, spread, kern = cupti_time(fn, (x, ids, tw, experts, words), iterations=args.iters,
                                                           by_kernel=True)
                        err, finite = rel_err(out, ref)
                        v.update(ms=ms, spread_ms=spread, err=err, ok=finite and err < 1e-2, launches=launch_times(kern),
                                 kernels=kern, read_TBps=touched * expert_bytes / ms / 1e9)
                        if args.sustained_s > 0:
                            v["sustained"] = sustained_time(fn, (x, ids, tw, experts, words), warm_s=args.sustained_s)
                    except Exception as e:  # noqa: BLE001 (a variant that does not compile is recorded)
                        v["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                res["rows"].append(v)
                print(row_line(v), flush=True)
        write_json(args.out, res)


def cfg_text(c: dict | None) -> str:
    if not c:
        return "-"
    form = f" {c['decode']}" if c.get("decode") else ""
    form += " tm" if c.get("token_major_out") else ""
    form += " ws" if c.get("consumer_wgs", 1) > 1 else ""
    form += f" sk{c['stream_k']}" if c.get("stream_k") else ""
    return f"n{c['block_n']} k{c['block_k']} st{c['num_stages']} s{c['split_k']}{form}"


def row_line(v) -> str:
    head = f"{v['shape']:16s} {v['T']:4d} {v['variant']:4s} d{v.get('draw', 0):<2d} bm{v['block_m']:<3d} max{v.get('max_rows', 0):<4d}"
    cfgs = f"{cfg_text(v.get('gate_up')):18s} {cfg_text(v.get('down')):18s}"
    if "ms" not in v:
        return f"{head} {cfgs} {v.get('skipped') or v.get('error', '')[:100]}"
    la = v["launches"]
    sus = v.get("sustained")
    sus = f"  back to back {sus['ms'] * 1e3:8.1f} ({sus['sm_mhz'] or float('nan'):.0f} MHz)" if sus else ""
    return (f"{head} {cfgs} {v['ms'] * 1e3:8.1f} {la['gate_up'] * 1e3:8.1f} {la['down'] * 1e3:8.1f} "
            f"{la['other'] * 1e3:6.1f} {v['read_TBps']:5.2f}{'' if v['ok'] else ' FAILED'}{sus}")


def main():
    ap = argparse.ArgumentParser(description="Mosaic layer launch settings sweep")
    ap.add_argument("--out", default="benchmarks/results/sweep_mosaic.json")
    ap.add_argument("--shapes", default="mixtral:1,2,4,16,64,256;deepseek-v2-lite:1,16,256",
                    help="shape:tokens;shape:tokens")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--draws", type=int, default=1, help="routings drawn per T, each variant timed on every one")
    ap.add_argument("--sustained-s", type=float, default=0.0,
                    help="also time each variant back to back after this many seconds of warm-up (at the power cap)")
    ap.add_argument("--routing-ids", help="routing_spill.py --save-ids file: each T's expert ids from a trained router")
    ap.add_argument("--routing-layer", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=270, help="variants after this many seconds are skipped")
    ap.add_argument("--variants", type=json.loads, default=None,
                    help="JSON list of [gate+up overrides, down overrides] pairs instead of VARIANTS")
    ap.add_argument("--block-m", type=lambda s: [int(b) for b in s.split(",")], default=None,
                    help="instead of the variants: the default settings at each of these token blocks")
    args = ap.parse_args()
    t0 = time.time()
    res = {"command": " ".join(sys.argv), "info": device_info(), "variants": args.variants or VARIANTS, "rows": []}
    for part in args.shapes.split(";"):
        shape, tokens = part.split(":")
        sweep_shape(args, shape, [int(t) for t in tokens.split(",")], res, t0)
    res["elapsed_s"] = time.time() - t0
    write_json(args.out, res)
    print("\nshape               T var  draw bm    max    gate_up            down               step us  g+u us  down us  other  TB/s")
    for v in res["rows"]:
        print(row_line(v))


if __name__ == "__main__":
    main()
