"""Where a packed model's compile time goes: one MoE layer and a stack of layers, packed (Mosaic or
Triton kernels) against uncompressed (our dense grouped kernel), per token count.

Per T and path, three fresh jits of the same arguments: ``first`` (one layer; the process has not yet
compiled this T's kernels), ``again`` (one layer, a new jit: what is left when the kernels' own
compilations are cached in the process) and ``stack`` (``--layers`` layers of the same weights in one
jit, as a model unrolls them).  Each is timed as jax reports it (trace, lower to MLIR, backend
compile) plus the wall clock of compile + first call; ``first`` - ``again`` is the per-process cost of
the layer's kernels.  Weights are zeros of the real shapes (compile time does not depend on values).

    PYTHONPATH=. python3 benchmarks/bench_compile.py --tokens 1,16 --out $OUT/bench_compile.json
"""
from __future__ import annotations

import argparse
import time

from bench_moe_layer import SHAPES
from common import device_info, write_json

import jax
import jax.numpy as jnp

import kernels as K
from kernels.mosaic_ffn import to_mosaic_words
from puzzlemoe_jax.experts import PackedExperts

STAGES = ("jaxpr_trace", "jaxpr_to_mlir_module", "backend_compile")


def layer_fns(shape: str, impl: str):
    """``{path: (ffn(x, ids, tw, w), w)}`` for the packed layer under ``impl`` and the dense one."""
    E, H, I, _ = SHAPES[shape]
    P = E // 2
    z = lambda *s, dt=jnp.bfloat16: jnp.zeros(s, dt)  # noqa: E731
    words = {"w_gate": z(P, H, I, dt=jnp.uint16), "w_up": z(P, H, I, dt=jnp.uint16), "w_down": z(P, I, H, dt=jnp.uint16)}
    pairs = jnp.stack([jnp.arange(P), jnp.arange(P) + P], 1).astype(jnp.int32)
    empty = {n: z(0, *w.shape[1:]) for n, w in words.items()}
    packed = PackedExperts(pairs, {}, jnp.zeros((0,), jnp.int32), empty, E, jnp.zeros((0,), jnp.int32))
    mosaic = to_mosaic_words(words) if impl == "mosaic" else None
    if impl != "mosaic":
        packed = PackedExperts(pairs, words, packed.dense_ids, empty, E, packed.dropped_ids)
    dense = {"w_gate": z(E, H, I), "w_up": z(E, H, I), "w_down": z(E, I, H)}
    return {
        f"packed {impl}": (lambda x, ids, tw, w: K.packed_moe_ffn(x, ids, tw, w[0], impl=impl, mosaic_words=w[1]),
                           (packed, mosaic)),
        "dense triton": (lambda x, ids, tw, w: K.dense_moe_ffn(x, ids, tw, w, impl="triton"), dense),
    }


def timed_compile(fn, layers: int, args, events: dict) -> dict:
    """Compile + first call of ``layers`` chained layers in a fresh jit, with jax's stage times."""
    def model(x, ids, tw, w):
        for _ in range(layers):
            x = x + fn(x, ids, tw, w)
        return x
    events.clear()
    t0 = time.perf_counter()
    jax.block_until_ready(jax.jit(model)(*args))
    return {"wall_s": time.perf_counter() - t0, **{s: events.get(s, 0.0) for s in STAGES}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--impl", default="mosaic", choices=["mosaic", "triton"])
    ap.add_argument("--out", default="benchmarks/results/bench_compile.json")
    args = ap.parse_args()
    events = {}

    def on_event(name, secs, **_):
        if name.startswith("/jax/core/compile/"):
            key = name.rsplit("/", 1)[-1].removesuffix("_duration")
            events[key] = events.get(key, 0.0) + secs
    jax.monitoring.register_event_duration_secs_listener(on_event)
    E, H, _, k = SHAPES[args.shape]
    fns = layer_fns(args.shape, args.impl)
    rows = []
    for T in map(int, args.tokens.split(",")):
        x = jnp.zeros((T, H), jnp.bfloat16)
        ids = (jnp.arange(T * k, dtype=jnp.int32) % E).reshape(T, k)
        tw = jnp.full((T, k), 1.0 / k, jnp.float32)
        for path, (fn, w) in fns.items():
            row = {"T": T, "path": path}
            for name, layers in (("first", 1), ("again", 1), ("stack", args.layers)):
                row[name] = timed_compile(fn, layers, (x, ids, tw, w), events)
            rows.append(row)
            print(" | ".join([f"T={T}", path] + [f"{n} {row[n]['wall_s']:.1f} s (" + " / ".join(
                f"{row[n][s]:.1f}" for s in STAGES) + ")" for n in ("first", "again", "stack")]), flush=True)
    write_json(args.out, {"command": "bench_compile.py", "args": vars(args), "device": device_info(), "rows": rows})
    print(table(rows, args.layers))


def table(rows, layers: int) -> str:
    out = [f"| T | path | first layer s (trace / lower / backend) | again s | {layers} layers s (backend) | kernels' own s |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        f, a, s = r["first"], r["again"], r["stack"]
        out.append(f"| {r['T']} | {r['path']} | {f['wall_s']:.1f} ({f['jaxpr_trace']:.1f} / {f['jaxpr_to_mlir_module']:.1f} / "
                   f"{f['backend_compile']:.1f}) | {a['wall_s']:.1f} | {s['wall_s']:.1f} ({s['backend_compile']:.1f}) | "
                   f"{f['wall_s'] - a['wall_s']:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
