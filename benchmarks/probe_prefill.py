"""The serving engine's prefill call by prompts a call and bucket: packed vs uncompressed.

    PYTHONPATH=. python3 benchmarks/probe_prefill.py [--shape mixtral-8x7b] [--layers 8] [--sizes 1,8]
        [--buckets 32,128] [--iters 20] [--json OUT]

A random-weight model of a ``bench_e2e`` shape, packed (50 %) and uncompressed, one after the other, each
behind an ``Engine`` (batched decode, impl auto); its prefill (``Engine._prefill``, the call a server makes
when it admits requests) runs on random prompts filling the bucket.  Per shape: the median (and least)
of ``--iters`` wall times of the call with its readback of the first tokens, per call and per prompt
(wall time, as a server pays it; CUPTI's per-iteration kernel lists differed for this step).  Prints a
table, writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import device_info, write_json  # noqa: E402


def time_model(packed: bool, args, sizes, buckets) -> list[dict]:
    from bench_e2e import build_model  # noqa: PLC0415
    from puzzlemoe_jax.engine import Engine  # noqa: PLC0415
    model = build_model(args.shape, args.layers, packed, impl=args.impl)
    engine = Engine(model, max_len=args.max_len, max_batch=max(sizes), mode="batched", buckets=buckets)
    rng = np.random.default_rng(0)
    rows = []
    for bucket in buckets:
        for size in sizes:
            ids = rng.integers(3, model.config.vocab_size, (size, bucket)).astype(np.int32)
            call = (ids, [bucket] * size, [0] * size, [0.0] * size, [1.0] * size)
            engine._prefill(*call)   # compiled by the engine's own call, as a server makes it
            walls = []
            for _ in range(args.iters):
                t = time.perf_counter()
                toks, _, ok = engine._prefill(*call)
                np.asarray(toks), np.asarray(ok)
                walls.append((time.perf_counter() - t) * 1e3)
            rows.append(dict(model="packed" if packed else "uncompressed", bucket=bucket, prompts=size,
                             wall_ms=statistics.median(walls), wall_ms_min=min(walls)))
            r = rows[-1]
            print(f"| {r['model']} | {bucket} | {size} | {r['wall_ms']:.2f} | {r['wall_ms_min']:.2f} | "
                  f"{r['wall_ms'] / size:.2f} |", flush=True)
    del engine, model
    gc.collect()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--sizes", default="1,8", help="prompts a call")
    ap.add_argument("--buckets", default="32,128", help="padded prompt lengths")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default="benchmarks/results/probe_prefill.json")
    args = ap.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",")]
    buckets = [int(v) for v in args.buckets.split(",")]
    print("| model | bucket | prompts a call | wall ms (median, with readback) | wall ms (min) | wall ms per prompt |")
    print("|---|---|---|---|---|---|")
    rows = time_model(True, args, sizes, buckets) + time_model(False, args, sizes, buckets)
    write_json(args.json, {"command": " ".join(sys.argv), "info": device_info(), "devices": str(jax.devices()),
                           "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
