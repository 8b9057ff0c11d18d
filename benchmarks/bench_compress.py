"""Time PuzzleMoE compression (pairing + merge + pack) of full-size MoE expert stacks on one device.

    python benchmarks/bench_compress.py --shape mixtral-8x7b [--layers N] [--json OUT]
    python benchmarks/bench_compress.py --shape deepseek-moe-16b
    python benchmarks/bench_compress.py --shape deepseek-v3 --memory-analysis   # any backend, nothing runs

Each layer's experts are drawn on the device (normal, std 0.02, bf16, like real expert weights;
experts independent, so similarity is low and the merge does its full work), then
``compress.compress_layer`` runs at ratio 0.5 and the packed result is waited for.  Generation time
is excluded; pairing (host matching on device-computed costs), merging, packing and the
statistics are included.  Reading the checkpoint from disk is not part of this figure.
``--memory-analysis``: instead, compile (not run) the device merge program of each matrix of one layer
(``merge.merge_layer_matrix``, the converter's path where jax runs) and print XLA's memory analysis of it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from puzzlemoe_jax import compress  # noqa: E402

SHAPES = {  # experts, hidden, expert intermediate, MoE layers
    "mixtral-8x7b": (8, 4096, 14336, 32),
    "deepseek-moe-16b": (64, 2048, 1408, 27),
    "qwen1.5-moe-a2.7b": (60, 2048, 1408, 24),
    "deepseek-v3": (256, 7168, 2048, 58),
}


def layer_weights(key, e, h, i):
    k1, k2, k3 = jax.random.split(key, 3)
    draw = lambda k, s: (0.02 * jax.random.normal(k, s, jnp.float32)).astype(jnp.bfloat16)
    return {"w_gate": draw(k1, (e, h, i)), "w_up": draw(k2, (e, h, i)), "w_down": draw(k3, (e, i, h))}


def memory_analysis(e, h, i, ratio, chunk_elems):
    """Bytes XLA plans for the device merge of each matrix (input, temporaries, output)."""
    from puzzlemoe_jax.merge import MergeConfig, _chunk_rows, _merge_layer_matrix  # noqa: PLC0415
    from puzzlemoe_jax.pairing import pairs_for_ratio  # noqa: PLC0415
    p, cfg, rows = pairs_for_ratio(e, ratio), MergeConfig(), {}
    for name, (k, n) in {"w_gate": (h, i), "w_up": (h, i), "w_down": (i, h)}.items():
        one = jnp.float32(1.0)
        compiled = _merge_layer_matrix.lower(
            jax.ShapeDtypeStruct((e, k, n), jnp.bfloat16), jnp.zeros((p, 2), jnp.int32),
            jnp.zeros((e - 2 * p,), jnp.int32), one, one, jnp.float32(cfg.max_threshold), jnp.full((1, 1), 0.5),
            method=cfg.method, rows=min(k, _chunk_rows(p, n, chunk_elems))).compile()
        m = compiled.memory_analysis()
        rows[name] = {"argument_bytes": m.argument_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
                      "output_bytes": m.output_size_in_bytes}
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, help="MoE layers to time (default: all of the model)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--json")
    ap.add_argument("--memory-analysis", action="store_true", help="compile, don't run: XLA's memory plan")
    ap.add_argument("--chunk-elems", type=int, default=1 << 26, help="row-chunk size (the converter's on a GPU)")
    args = ap.parse_args(argv)
    e, h, i, n_layers = SHAPES[args.shape]
    if args.memory_analysis:
        rows = memory_analysis(e, h, i, args.ratio, args.chunk_elems)
        print(f"| {args.shape} matrix | backend | input GiB | temporaries GiB | output GiB |\n|---|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {jax.default_backend()} | {r['argument_bytes'] / 2**30:.2f} | {r['temp_bytes'] / 2**30:.2f} | "
                  f"{r['output_bytes'] / 2**30:.2f} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"shape": args.shape, "backend": jax.default_backend(),
                                                   "chunk_elems": args.chunk_elems, "matrices": rows}, indent=2) + "\n")
        return
    n_layers = args.layers or n_layers
    dev = jax.devices()[0]
    times = []
    for layer in range(n_layers + 1):            # layer 0 is a warm-up (compilation), not counted
        w = layer_weights(jax.random.key(layer), e, h, i)
        jax.block_until_ready(w)
        t0 = time.perf_counter()
        packed, stats = compress.compress_layer(w, args.ratio)
        jax.block_until_ready(packed)
        dt = time.perf_counter() - t0
        if layer:
            times.append(dt)
        print(f"layer {layer}{' (warm-up)' if not layer else ''}: {dt:.3f} s, pairs {stats['pairs'].tolist()}",
              flush=True)
        del w, packed
    mem = dev.memory_stats() or {}
    result = {"device": dev.device_kind, "shape": args.shape, "experts": e, "hidden": h, "intermediate": i,
              "layers_timed": n_layers, "ratio": args.ratio, "seconds_total": sum(times),
              "seconds_per_layer_median": statistics.median(times),
              "peak_bytes_in_use": mem.get("peak_bytes_in_use"), "jax": jax.__version__}
    print(f"\n| shape | device | layers | total s | median s/layer | peak GPU memory |\n|---|---|---|---|---|---|\n"
          f"| {args.shape} (E={e}, H={h}, I={i}) | {dev.device_kind} | {n_layers} | {sum(times):.1f} | "
          f"{statistics.median(times):.3f} | {(mem.get('peak_bytes_in_use') or 0) / 2**30:.1f} GiB |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
