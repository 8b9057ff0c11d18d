"""GPU check of the packed layer paths against an f32 reference (no timing): for each token count,
the relative error of impl "mosaic" (defaults, and each of ``MOSAIC_VARIANTS``: 64- and 128-row
token blocks, whose down launch reads h^T as it comes; 128 rows put the SwiGLU in XLA), "triton",
the uncompressed grouped kernel (``kernels.dense_moe_ffn`` impl "triton") and the bf16 XLA layer
on the merged weights, each
against ``dense_moe_ffn`` in f32 (HIGHEST precision) on the same merged weights, and how many bf16
outputs the Mosaic path and the bf16 XLA layer disagree on.

    cd benchmarks && PYTHONPATH=.. python3 check_mosaic_layer.py --tokens 1,16,64,1024
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import kernels as K
from common import device_info, rel_err
from kernels.mosaic_ffn import to_mosaic_words
from kernels.mosaic_gemm import MosaicConfig
from puzzlemoe_jax.compress import compress_layer
from puzzlemoe_jax.moe import dense_moe_ffn

MOSAIC_VARIANTS = {"mosaic_block_m_64": 64, "mosaic_block_m_128": 128}


def main():
    ap = argparse.ArgumentParser(description="GPU check of the packed layer paths against an f32 reference")
    ap.add_argument("--tokens", default="1,16,64,1024")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--out", default="check_mosaic_layer.json")
    args = ap.parse_args()
    E, H, I, k = args.experts, args.hidden, args.inter, args.topk
    keys = jax.random.split(jax.random.key(1), 3)
    w = {n: (0.02 * jax.random.normal(kk, s, jnp.float32)).astype(jnp.bfloat16)
         for n, kk, s in (("w_gate", keys[0], (E, H, I)), ("w_up", keys[1], (E, H, I)), ("w_down", keys[2], (E, I, H)))}
    experts, _ = compress_layer(w, args.ratio)
    merged = experts.unpack(jnp.bfloat16)
    words = to_mosaic_words(experts.packed)
    rng = np.random.default_rng(7)
    res = {"info": device_info(), "rows": []}
    for T in [int(t) for t in args.tokens.split(",")]:
        x = jnp.asarray(rng.standard_normal((T, H)), jnp.bfloat16)
        ids = jnp.asarray(np.argsort(-rng.standard_normal((T, E)), 1)[:, :k], jnp.int32)
        tw = jnp.asarray(rng.random((T, k)), jnp.float32)
        with jax.default_matmul_precision("highest"):
            ref = dense_moe_ffn(x.astype(jnp.float32), ids, tw, {n: v.astype(jnp.float32) for n, v in merged.items()})
        mosaic = lambda cfgs: jax.jit(lambda *a: K.packed_moe_ffn(  # noqa: E731
            *a[:4], impl="mosaic", mosaic_words=a[4], configs=cfgs))(x, ids, tw, experts, words)
        outs = {
            "mosaic": mosaic((None, None)),
            **{name: mosaic((MosaicConfig(block_m=bm), MosaicConfig(block_m=bm))) for name, bm in MOSAIC_VARIANTS.items()},
            "triton": jax.jit(lambda *a: K.packed_moe_ffn(*a, impl="triton"))(x, ids, tw, experts),
            "dense_triton": jax.jit(lambda *a: K.dense_moe_ffn(*a, impl="triton"))(x, ids, tw, merged),
            "xla_bf16": jax.jit(dense_moe_ffn)(x, ids, tw, merged),
        }
        row = {"T": T, **{name: dict(zip(("err", "finite"), rel_err(o, ref))) for name, o in outs.items()},
               "mosaic_vs_xla_bf16_differing": int((np.asarray(outs["mosaic"], np.float32)
                                                    != np.asarray(outs["xla_bf16"], np.float32)).sum()),
               "outputs": T * H}
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
