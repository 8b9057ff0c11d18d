"""Demo: merge a tiny random Mixtral-shaped MoE block to 50 %, pack, decode, report.

    python -m puzzlemoe_jax.demo [--layers 2] [--experts 8] [--hidden 256] [--intermediate 448]

Experts are a shared base plus a per-expert deviation (as in upcycled or co-trained experts),
so merging has something to find.  Prints per-pair merge statistics, expert bytes before and
after, and the MoE block's output error against the original on random tokens.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from puzzlemoe_jax import merge, moe, report


def random_moe_layer(rng: np.random.Generator, experts: int, hidden: int, intermediate: int,
                     spread: float = 0.5) -> dict[str, jax.Array]:
    """bf16 expert weights ``{w_gate, w_up: [E,H,I], w_down: [E,I,H]}`` around a shared base."""
    def stack(k, n):
        base = rng.normal(0, 0.02, (k, n))
        return jnp.asarray(base[None] + rng.normal(0, 0.02 * spread, (experts, k, n)), jnp.bfloat16)
    return {"w_gate": stack(hidden, intermediate), "w_up": stack(hidden, intermediate),
            "w_down": stack(intermediate, hidden)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=448)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    config = merge.MergeConfig()
    print(f"puzzlemoe-jax demo on {jax.default_backend()}: {args.layers} layers x {args.experts} experts, "
          f"H={args.hidden}, I={args.intermediate}, ratio={args.ratio}, config={config}")
    rows, before, after = [], 0, 0
    for layer in range(args.layers):
        weights = random_moe_layer(rng, args.experts, args.hidden, args.intermediate)
        t0 = time.perf_counter()
        packed, stats = merge.compress_layer(weights, args.ratio, config)
        jax.block_until_ready(packed)
        seconds = time.perf_counter() - t0
        rows += report.pair_rows(stats, layer)
        before += sum(int(w.size) * w.dtype.itemsize for w in weights.values())
        after += packed.nbytes()

        x = jnp.asarray(rng.normal(0, 1, (args.tokens, args.hidden)), jnp.bfloat16)
        logits = rng.normal(0, 1, (args.tokens, args.experts))
        topk_ids = jnp.asarray(np.argsort(-logits, axis=1)[:, :args.top_k], jnp.int32)
        topk_w = jax.nn.softmax(jnp.take_along_axis(jnp.asarray(logits, jnp.float32), topk_ids, 1), -1)
        y_dense = moe.moe_ffn(x, topk_ids, topk_w, weights).astype(jnp.float32)
        y_packed = moe.moe_ffn(x, topk_ids, topk_w, packed, impl="reference").astype(jnp.float32)
        out_err = float(jnp.linalg.norm(y_packed - y_dense) / jnp.linalg.norm(y_dense))
        print(f"layer {layer}: merged {len(stats['pairs'])} pairs in {seconds:.2f} s, "
              f"MoE block output rel. error {out_err:.4f} on {args.tokens} random tokens")
    print(report.format_table(rows))
    print(f"expert bytes: {before:,} -> {after:,} ({100 * after / before:.1f} %)")


if __name__ == "__main__":
    main()
