"""How fast are the attention projections of a decode step, and does one stored q|k|v weight help?

    PYTHONPATH=. python3 benchmarks/probe_attention_gemm.py --json OUT

Mixtral shapes (hidden 4096; q 4096, k and v 1024 columns each; o 4096 x 4096) at batch 1, 16 and 64:
XLA's GEMMs for q, k and v as three weights (joined after the dots, as a model that stores them apart),
as one weight of their 6144 columns (``models.Attention.qkv_proj``), and the o projection; the same
one-weight and o GEMMs in PyTorch (cuBLAS, CUDA graph, CUDA events) where torch is installed.
Eight weight copies are rotated per call, so the weights stream from HBM as in a 32-layer model.
Prints µs per GEMM and TB/s of weight bytes; writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cupti_time  # noqa: E402
from peer_torch import graph_time  # noqa: E402

H, ROT, BATCHES = 4096, 8, (1, 16, 64)


def jax_rows():
    rows = []
    for b in BATCHES:
        x = jax.random.normal(jax.random.key(1), (b, H), jnp.bfloat16)
        ws = {n: [jax.random.normal(jax.random.key(10 + r), (H, cols), jnp.bfloat16) * 0.02 for r in range(ROT)]
              for n, cols in (("q", 4096), ("k", 1024), ("v", 1024), ("qkv", 6144))}
        apart = lambda x, q, k, v: [jnp.concatenate([x @ q[r], x @ k[r], x @ v[r]], -1) for r in range(ROT)]  # noqa: E731
        one = lambda x, w: [x @ w[r] for r in range(ROT)]  # noqa: E731
        for name, fn, args, nbytes in (("qkv, three weights", apart, (x, ws["q"], ws["k"], ws["v"]), H * 6144 * 2),
                                       ("qkv, one weight", one, (x, ws["qkv"]), H * 6144 * 2),
                                       ("o", one, (x, ws["q"]), H * 4096 * 2)):
            _, ms, _, names = cupti_time(jax.jit(fn), args, iterations=30, per_call=ROT)
            rows.append({"impl": "xla", "batch": b, "gemm": name, "us": ms * 1e3,
                         "TBps": nbytes / (ms * 1e-3) / 1e12, "kernels": names})
    return rows


def torch_rows():
    import torch  # noqa: PLC0415 (only where torch is installed)
    rows = []
    for b in BATCHES:
        x = torch.randn(b, H, dtype=torch.bfloat16, device="cuda")
        for name, cols in (("qkv, one weight", 6144), ("o", 4096)):
            w = [torch.randn(cols, H, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(ROT)]
            med, _ = graph_time(torch, lambda: [torch.nn.functional.linear(x, w[r]) for r in range(ROT)], 50)
            us = med * 1e3 / ROT
            rows.append({"impl": "torch", "batch": b, "gemm": name, "us": us, "TBps": H * cols * 2 / (us * 1e-6) / 1e12})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = jax_rows()
    try:
        rows += torch_rows()
    except (ImportError, RuntimeError) as e:   # no torch or no CUDA device for it
        print(f"torch rows not run: {e}")
    print("| impl | batch | GEMM | µs | TB/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['batch']} | {r['gemm']} | {r['us']:.1f} | {r['TBps']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
