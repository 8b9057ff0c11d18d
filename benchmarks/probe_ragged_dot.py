"""Does XLA's ragged_dot read every expert's weights even when only a few have tokens?

    python benchmarks/probe_ragged_dot.py [--json OUT]

Times (CUPTI, median) one Mixtral-shaped up-projection ``[T*k, 4096] x [8, 4096, 14336]`` at batch 1
(top-2: 2 rows) with ``jax.lax.ragged_dot`` when 2 of 8 experts have tokens and when all 8 have, and
the same 2 rows as two separate dots on dynamically sliced experts (reading only those experts).
If ragged_dot's time does not depend on how many experts have tokens, the uncompressed baseline of
the end-to-end benchmark reads all experts at every decode step.  Weight buffers are rotated (4 x 0.9 GB).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

E, H, I, ROT = 8, 4096, 14336, 4


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from jax.experimental.mosaic.gpu import profiler  # noqa: PLC0415 (GPU only)
    keys = jax.random.split(jax.random.key(0), ROT + 1)
    ws = [(0.02 * jax.random.normal(k, (E, H, I), jnp.float32)).astype(jnp.bfloat16) for k in keys[:ROT]]
    x = jax.random.normal(keys[-1], (2, H), jnp.float32).astype(jnp.bfloat16)
    two = jnp.asarray([1, 0, 0, 0, 0, 1, 0, 0], jnp.int32)       # rows go to experts 0 and 5
    spread8 = jnp.asarray([8, 8, 8, 8, 8, 8, 8, 8], jnp.int32)    # 64 rows over all experts
    x64 = jnp.tile(x, (32, 1))

    def ragged(ws, x, sizes):
        return [jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32) for w in ws]

    def sliced(ws, x, ids):
        return [jnp.stack([x[r] @ jax.lax.dynamic_index_in_dim(w, ids[r], keepdims=False) for r in range(2)])
                for w in ws]

    ids = jnp.asarray([0, 5], jnp.int32)
    ref = jnp.stack([x[0] @ ws[0][0], x[1] @ ws[0][5]]).astype(jnp.float32)
    cases = {"ragged_dot, 2 of 8 experts used (batch 1, top-2)": (jax.jit(ragged), (ws, x, two)),
             "ragged_dot, 8 of 8 experts used (64 rows)": (jax.jit(ragged), (ws, x64, spread8)),
             "2 dots on dynamically sliced experts": (jax.jit(sliced), (ws, x, ids))}
    got = jax.jit(ragged)(ws, x, two)[0]
    err = float(jnp.linalg.norm(got[jnp.asarray([0, 1])] - ref) / jnp.linalg.norm(ref))
    assert err < 1e-2 and bool(jnp.isfinite(got).all()), err
    rows = {}
    for name, (f, a) in cases.items():
        _, per_iter = profiler.measure(f, iterations=30, aggregate=False)(*a)
        times = [sum(ms for _, ms in it) / ROT * 1e3 for it in per_iter]   # µs per weight buffer
        rows[name] = statistics.median(times)
    bytes_one = H * I * 2
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; one expert = {bytes_one / 1e6:.1f} MB; "
          f"check rel err {err:.1e}")
    print("| case | µs per call (median) | GB/s if 2 experts read | GB/s if 8 experts read |\n|---|---|---|---|")
    for name, us in rows.items():
        print(f"| {name} | {us:.1f} | {2 * bytes_one / us / 1e3:.0f} | {8 * bytes_one / us / 1e3:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": jax.devices()[0].device_kind, "us": rows}, indent=2))


if __name__ == "__main__":
    main()
